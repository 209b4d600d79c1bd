"""The first stage: shapes, the KL term, the plain AE, parity with diffusers, losses, metrics."""

import numpy as np
import pytest
import torch

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.autoencoder.losses import AutoencoderLoss, AutoencoderLossConfig, PatchDiscriminator, hinge_d_loss
from ldmkit.errors import LdmkitError
from ldmkit.evaluate.metrics import psnr, ssim


def tiny(**kw) -> AutoencoderConfig:
    base = dict(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)
    base.update(kw)
    return AutoencoderConfig(**base)


@pytest.mark.parametrize("mult,f", [((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
@pytest.mark.parametrize("variational", [True, False])
def test_shapes_through_encoder_decoder(mult, f, variational):
    cfg = tiny(channel_mult=mult, latent_channels=3, variational=variational)
    assert cfg.downsample_factor == f
    m = AutoencoderKL(cfg)
    x = torch.randn(2, 3, 32, 48)
    moments = m.encoder(x)
    assert moments.shape == (2, 6 if variational else 3, 32 // f, 48 // f)
    post = m.encode(x)
    assert post.mean.shape == post.std.shape == (2, 3, 32 // f, 48 // f)
    assert post.sample().shape == (2, 3, 32 // f, 48 // f)
    assert m.decode(post.mean).shape == x.shape
    # every level of the encoder halves the resolution except the last
    h = m.encoder.conv_in(x)
    for i, level in enumerate(m.encoder.down_blocks):
        h = level(h)
        scale = 2 ** min(i + 1, len(mult) - 1)
        assert h.shape[-2:] == (32 // scale, 48 // scale)


def test_kl_matches_closed_form():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    from ldmkit.autoencoder import DiagonalGaussian

    post = DiagonalGaussian(mean, logvar)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), ref, rtol=1e-5, atol=1e-5)
    # KL of N(0, I) to itself is zero
    assert DiagonalGaussian(torch.zeros(1, 2), torch.zeros(1, 2)).kl().abs().max() < 1e-7


def test_sample_is_reparameterised_and_seeded():
    from ldmkit.autoencoder import DiagonalGaussian

    post = DiagonalGaussian(torch.full((1, 20000), 2.0), torch.full((1, 20000), np.log(0.25)))
    z = post.sample(torch.Generator().manual_seed(1))
    assert abs(z.mean().item() - 2.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    assert torch.equal(z, post.sample(torch.Generator().manual_seed(1)))


def test_plain_autoencoder_is_deterministic_and_has_no_kl():
    m = AutoencoderKL(tiny(variational=False)).eval()
    x = torch.randn(2, 3, 16, 16)
    post = m.encode(x)
    assert torch.equal(post.sample(torch.Generator().manual_seed(0)), post.sample(torch.Generator().manual_seed(1)))
    assert torch.equal(post.sample(), post.mean)
    assert post.kl().abs().max() == 0
    assert (post.std == 0).all()
    r1, _ = m(x)
    r2, _ = m(x)
    assert torch.equal(r1, r2)


def test_bad_input_sizes_are_refused():
    m = AutoencoderKL(tiny())
    with pytest.raises(LdmkitError, match="divisible"):
        m.encode(torch.randn(1, 3, 18, 16))
    with pytest.raises(LdmkitError, match="expects images"):
        m.encode(torch.randn(1, 1, 16, 16))


def test_latent_normalisation_round_trip():
    cfg = tiny(scaling_factor=0.5, shift_factor=0.3)
    m = AutoencoderKL(cfg).eval()
    x = torch.randn(1, 3, 16, 16)
    z = m.encode(x).mean
    zn = m.encode_latents(x, sample=False)
    torch.testing.assert_close(zn, (z - 0.3) * 0.5)
    torch.testing.assert_close(m.decode_latents(zn), m.decode(z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mult", [(1, 2, 2), (1, 2, 2, 2)])
def test_parity_with_diffusers_autoencoder(mult):
    diffusers = pytest.importorskip("diffusers")
    n = len(mult)
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(16 * m for m in mult), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    ).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():  # perturb every weight so nothing is trivially zero or one
            p.add_(0.05 * torch.randn_like(p))
    m = AutoencoderKL(tiny(base_channels=16, channel_mult=mult, norm_groups=8)).eval()
    m.load_state_dict(ref.state_dict())  # same names, same shapes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = ref.encode(x).latent_dist, m.encode(x)
        assert (a.mean - b.mean).abs().max() < 1e-4
        assert (a.logvar - b.logvar).abs().max() < 1e-4
        ya, yb = ref.decode(a.mean).sample, m.decode(b.mean)
    assert yb.abs().max() > 0.1
    assert (ya - yb).abs().max() < 1e-4


def test_losses_kl_weight_and_gan():
    cfg = AutoencoderLossConfig(kl_weight=0.5, disc_enabled=True, disc_start=0, disc_channels=8, disc_layers=2)
    loss = AutoencoderLoss(cfg)
    m = AutoencoderKL(tiny())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat, post = m(x)
    total, logs = loss.generator_loss(x, x_hat, post.kl(), step=0, last_layer=m.last_layer_weight())
    expected_base = (x - x_hat).abs().mean() + 0.5 * post.kl().mean()
    assert "g_loss" in logs and logs["d_weight"] > 0
    assert torch.isclose(total - logs["d_weight"] * logs["g_loss"], expected_base, atol=1e-4)
    total.backward()
    assert m.last_layer_weight().grad is not None
    # before disc_start the GAN term is off
    loss2 = AutoencoderLoss(cfg.model_copy(update={"disc_start": 10}))
    _, logs2 = loss2.generator_loss(x, x_hat.detach(), post.kl().detach(), step=3, last_layer=None)
    assert "g_loss" not in logs2


def test_hinge_loss_and_patch_discriminator():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # confident and right
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1.0
    d = PatchDiscriminator(3, 8, 3)
    assert d(torch.randn(2, 3, 32, 32)).shape[1] == 1


def test_perceptual_hook_loads_torchscript(tmp_path):
    class L2(torch.nn.Module):
        def forward(self, x, y):
            return (x - y).pow(2).flatten(1).mean(1)

    path = tmp_path / "p.pt"
    torch.jit.script(L2()).save(str(path))
    loss = AutoencoderLoss(AutoencoderLossConfig(perceptual_path=str(path), perceptual_weight=2.0))
    x, y = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    assert torch.isclose(loss.reconstruction(x, y), torch.tensor([1.0 + 2.0]))
    with pytest.raises(LdmkitError, match="not found"):
        AutoencoderLoss(AutoencoderLossConfig(perceptual_path=str(tmp_path / "missing.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(LdmkitError, match="TorchScript"):
        AutoencoderLoss(AutoencoderLossConfig(perceptual_path=str(tmp_path / "junk.pt")))


def test_metrics_against_references():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    for i in range(2):
        a = ((x[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        b = ((y[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        ref_ssim = structural_similarity(a, b, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=1.0)
        assert abs(ssim(x, y)[i].item() - ref_ssim) < 1e-4
        assert abs(psnr(x, y)[i].item() - peak_signal_noise_ratio(a, b, data_range=1.0)) < 1e-3
    assert ssim(x, x).min() > 0.9999


def test_bicubic_shortcut_starts_as_bicubic_down_up_and_learns_on_top(tmp_path):
    """With `bicubic_shortcut` the untrained codec is exactly bicubic down/up by f (antialiased
    down, plain up); the learned paths then add to it, the state survives save/load, and diffusers'
    AutoencoderKL (which has no shortcut) refuses it by name."""
    import torch.nn.functional as F

    from ldmkit.checkpoint import save_checkpoint
    from ldmkit.interop.diffusers import vae_config_to_diffusers

    cfg = AutoencoderConfig(base_channels=16, channel_mult=(1, 2, 2), norm_groups=8, bicubic_shortcut=True)
    torch.manual_seed(0)
    ae = AutoencoderKL(cfg).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    small = F.interpolate(x, scale_factor=1 / 4, mode="bicubic", antialias=True)
    post = ae.encode(x)
    assert torch.equal(post.mean[:, :3], small) and post.std.max() < 0.02  # logvar starts at -8
    assert torch.equal(ae.decode(post.mean), F.interpolate(small, scale_factor=4, mode="bicubic"))
    # one step of training moves it off bicubic, and the shortcut is still there after a round trip
    opt = torch.optim.Adam(ae.parameters(), 1e-2)
    loss = (ae.decode(ae.encode(x).mean) - x).pow(2).mean()
    loss.backward()
    opt.step()
    save_checkpoint(tmp_path, 1, "autoencoder", ae, cfg)
    import ldmkit

    back = ldmkit.load(tmp_path)
    assert back.config.bicubic_shortcut
    with torch.no_grad():
        assert torch.equal(back.decode(back.encode(x).mean), ae.decode(ae.encode(x).mean))
        assert not torch.equal(ae.decode(ae.encode(x).mean), F.interpolate(small, scale_factor=4, mode="bicubic"))
    with pytest.raises(LdmkitError, match="bicubic_shortcut"):
        vae_config_to_diffusers(cfg)
