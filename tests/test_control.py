"""ControlNet and T2I-Adapter: a no-op at initialisation, control only through the control image,
injection shapes for many U-Nets, several ControlNets summed, control-image conversion and errors,
parameter counts and parity with diffusers' ControlNetModel / T2IAdapter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldmkit.conditioning.cond import Cond, cat_conds
from ldmkit.control.adapter import Adapter, AdapterConfig
from ldmkit.control.control_image import prepare_control_image
from ldmkit.control.controlnet import (
    ControlNet,
    ControlNetConfig,
    MultiControlNet,
    controlled_unet,
    default_hint_widths,
    sum_residuals,
)
from ldmkit.errors import LdmkitError
from ldmkit.unet import UNET_PRESETS, UNet, UNetConfig

B, H, W = 2, 8, 8
HINT = {8: (4, 8, 8, 8), 4: (4, 8, 8), 2: (4, 8)}  # small hint encoders for CPU tests


def tiny(**kw) -> UNetConfig:
    base = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                norm_groups=8, zero_init=False)  # fmt: skip
    return UNetConfig(**(base | kw))


def inputs(cfg: UNetConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw: dict = {"x": torch.randn(B, cfg.in_channels, H, W, generator=g), "t": torch.tensor([10, 500])}
    if cfg.context_dim:
        kw["context"] = torch.randn(B, 5, cfg.context_dim, generator=g)
        kw["context_mask"] = torch.tensor([[True, True, True, False, False], [True] * 5])
    if cfg.num_classes:
        kw["class_labels"] = torch.tensor([0, cfg.num_classes])
    if cfg.concat_channels:
        kw["concat"] = torch.randn(B, cfg.concat_channels, H, W, generator=g)
    return kw


def image(f: int, channels: int = 3, seed: int = 1, batch: int = B) -> torch.Tensor:
    """A control image in [0, 1] with structure at the latent scale (f×f blocks with a little texture)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(batch, channels, H, W, generator=g).repeat_interleave(f, 2).repeat_interleave(f, 3)
    return 0.8 * blocks + 0.2 * torch.rand(batch, channels, f * H, f * W, generator=g)


def control_kw(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k not in ("x", "t")}


def perturb(params, seed: int = 2, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn(p.shape, generator=g))


def zero_initialised(net: ControlNet) -> list[torch.nn.Parameter]:
    mods = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    return [p for m in mods for p in m.parameters()]


CONFIGS = {  # (U-Net config, latent factor f)
    "two_levels_f8": (tiny(), 8),
    "context_labels_f4": (tiny(context_dim=12, num_classes=3), 4),
    "three_levels_concat_f8": (tiny(channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                                    context_dim=12, concat_channels=3), 8),  # fmt: skip
    "scale_shift_everything_f4": (tiny(context_dim=12, num_classes=4, concat_channels=2, emb_mode="scale_shift"), 4),
    "no_multiscale_f2": (tiny(multiscale=False, channel_mult=(1, 2, 2), attention_levels=(2,)), 2),
    "no_attention_no_time_f8": (tiny(use_attention=False, use_time_modulation=False), 8),
}


def build(name: str):
    cfg, f = CONFIGS[name]
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    net = ControlNet.from_unet(unet, latent_factor=f, hint_widths=HINT[f]).eval()
    adapter = Adapter.from_unet(unet, latent_factor=f).eval()
    return unet, net, adapter, f


# ---- a no-op at initialisation


@pytest.mark.parametrize("name", list(CONFIGS))
def test_at_init_the_base_output_is_unchanged(name):
    unet, net, adapter, f = build(name)
    kw = inputs(unet.config)
    with torch.no_grad():
        base = unet(**kw)
        down, mid = net(**kw, control_image=image(f))
        feats = adapter(image(f), kw["x"])
        assert all(torch.equal(r, torch.zeros_like(r)) for r in [*down, mid, *feats])
        assert torch.equal(unet(**kw, down_residuals=down, mid_residual=mid), base)
        assert torch.equal(unet(**kw, adapter_residuals=feats), base)


def test_from_unet_copies_the_encoder():
    unet, net, _, _ = build("three_levels_concat_f8")
    for name, module in unet.encoder_modules().items():
        ours, theirs = getattr(net, name).state_dict(), module.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].data_ptr() != theirs[k].data_ptr() for k in ours)


# ---- control enters only through the control image


@pytest.mark.parametrize("name", ["context_labels_f4", "three_levels_concat_f8"])
def test_control_image_steers_the_output(name):
    unet, net, adapter, f = build(name)
    perturb([*zero_initialised(net), *net.controlnet_cond_embedding.parameters()], std=0.5)  # as if trained
    perturb(adapter.parameters(), std=0.5)
    kw = inputs(unet.config)
    with torch.no_grad():
        base = unet(**kw)
        for fn in (controlled_unet(unet, net), controlled_unet(unet, adapter)):
            a, again = fn(**kw, control=image(f)), fn(**kw, control=image(f))
            assert torch.equal(a, again) and (a - base).abs().max() > 1e-3  # deterministic, and it does steer
        out = {s: [controlled_unet(unet, c)(**kw, control=image(f, seed=s)) for c in (net, adapter)] for s in (1, 5)}
        for a, b in zip(out[1], out[5]):
            print(f"{name}: output change from another control image {(a - b).abs().max():.3f}")
            assert (a - b).abs().max() > 1e-2  # a different control image changes the output
        down, mid = net(**kw, control_image=image(f), scale=0.0)
        assert torch.equal(unet(**kw, down_residuals=down, mid_residual=mid), base)
        assert torch.equal(unet(**kw, adapter_residuals=adapter(image(f), kw["x"], scale=0.0)), base)
        half, full = net(**kw, control_image=image(f), scale=0.5), net(**kw, control_image=image(f))
        assert all(torch.allclose(2 * h, g) for h, g in zip([*half[0], half[1]], [*full[0], full[1]]))


def test_training_from_zero_init_reaches_every_parameter():
    """Zhang et al. §3.2: the zero convs get gradients at step 0; after one step everything does."""
    unet, net, adapter, f = build("context_labels_f4")
    unet.requires_grad_(False)
    kw = inputs(unet.config)
    for control in (net, adapter):
        control.train()
        opt = torch.optim.SGD(control.parameters(), lr=0.1)
        fn = controlled_unet(unet, control)
        for step in range(3):  # step 0: zero convs; 1: the copy and the hint's conv_out; 2: the rest of the hint
            opt.zero_grad()
            fn(**kw, control=image(f)).square().mean().backward()
            moved = {n for n, p in control.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
            if step == 0 and control is net:
                zero_convs = ("controlnet_down", "controlnet_mid")
                assert moved == {n for n, _ in net.named_parameters() if n.startswith(zero_convs)}
            opt.step()
        assert moved == {n for n, _ in control.named_parameters()}, set(dict(control.named_parameters())) - moved
        assert all(p.grad is None for p in unet.parameters())


# ---- shapes of every injection point


@pytest.mark.parametrize("name", list(CONFIGS))
def test_injection_shapes(name):
    unet, net, adapter, f = build(name)
    perturb(zero_initialised(net))
    perturb(adapter.parameters())
    kw = inputs(unet.config)
    with torch.no_grad():
        down, mid = net(**kw, control_image=image(f))
        feats = adapter(image(f))
        assert [tuple(r.shape) for r in down] == [(B, c, H // s, W // s) for c, s in unet.skip_channels()]
        last = unet.skip_channels()[-1][1]
        assert tuple(mid.shape) == (B, unet.config.widths[-1], H // last, W // last)
        assert [tuple(r.shape) for r in feats] == [(B, c, H // s, W // s) for c, s in unet.level_channels()]
        out = unet(**kw, down_residuals=down, mid_residual=mid, adapter_residuals=feats)  # both routes at once
    assert out.shape == (B, unet.config.out_channels, H, W) and torch.isfinite(out).all()
    assert len(net.controlnet_cond_embedding.blocks) == 2 * {8: 3, 4: 2, 2: 1}[f]  # one stride-2 conv per halving


def test_default_hint_widths_follow_the_latent_factor():
    assert default_hint_widths(8) == (16, 32, 96, 256)  # diffusers' (three stride-2 convs)
    assert default_hint_widths(4) == (16, 32, 96)
    assert default_hint_widths(1) == (16,) and default_hint_widths(16) == (16, 32, 96, 256, 256)
    cfg = ControlNetConfig(unet=tiny(), latent_factor=4)
    assert cfg.hint_widths == (16, 32, 96)
    assert ControlNetConfig.model_validate(cfg.model_dump()) == cfg
    for bad, match in [(dict(latent_factor=6), "power of two"), (dict(latent_factor=4, hint_widths=(8, 8, 8, 8)),
                       "needs 3"), (dict(unet=tiny(use_skip_connections=False)), "skip connections"),
                       (dict(unet=tiny(), oops=1), "oops")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            ControlNetConfig(**({"unet": tiny()} | bad))
    with pytest.raises(ValueError, match="power of two"):
        AdapterConfig(channels=(16, 32), latent_factor=3)


# ---- several ControlNets


def test_multi_controlnet_sums_scaled_residuals():
    unet, net1, _, f = build("context_labels_f4")
    net2 = ControlNet.from_unet(unet, latent_factor=f, hint_widths=HINT[f], conditioning_scale=0.3).eval()
    perturb(zero_initialised(net1), seed=3)
    perturb(zero_initialised(net2), seed=4)
    kw = inputs(unet.config)
    img1, img2 = image(f, seed=1), image(f, seed=2)
    multi = MultiControlNet([net1, net2])
    with torch.no_grad():
        d1, m1 = net1(**kw, control_image=img1, scale=0.7)
        d2, m2 = net2(**kw, control_image=img2, scale=-1.5)
        down, mid = multi(**kw, control_images=[img1, img2], scales=[0.7, -1.5])
        assert all(torch.allclose(d, a + b, atol=1e-6) for d, a, b in zip(down, d1, d2))
        assert torch.allclose(mid, m1 + m2, atol=1e-6)
        s_down, s_mid = sum_residuals([(d1, m1), (d2, m2)])
        assert all(torch.equal(a, b) for a, b in zip([*down, mid], [*s_down, s_mid]))
        # default scales: each net's own conditioning_scale (1.0 and 0.3)
        down, _ = multi(**kw, control_images=[img1, img2])
        d2, _ = net2(**kw, control_image=img2)
        assert torch.allclose(down[0], net1(**kw, control_image=img1)[0][0] + d2[0], atol=1e-6)
        assert torch.allclose(d2[0], 0.3 * net2(**kw, control_image=img2, scale=1.0)[0][0], atol=1e-6)
        both = controlled_unet(unet, multi, [0.7, -1.5])(**kw, control=[img1, img2])
        d1, m1 = net1(**kw, control_image=img1, scale=0.7)
        d2, m2 = net2(**kw, control_image=img2, scale=-1.5)
        ref = unet(**kw, down_residuals=[a + b for a, b in zip(d1, d2)], mid_residual=m1 + m2)
    assert torch.allclose(both, ref, atol=1e-5)
    with pytest.raises(LdmkitError, match="2 control images"):
        multi(**kw, control_images=[img1])
    other = ControlNet.from_unet(UNet(tiny(channel_mult=(1, 2, 2))), latent_factor=f, hint_widths=HINT[f])
    with pytest.raises(LdmkitError, match="differently shaped"):
        MultiControlNet([net1, other])


# ---- control images: converted or refused in one line


def test_control_images_are_converted():
    unet, net, adapter, f = build("context_labels_f4")
    perturb(zero_initialised(net))
    perturb(adapter.parameters())
    kw = inputs(unet.config)
    rgb = image(f)
    with torch.no_grad():
        ref = net(**kw, control_image=rgb)

        def same(other) -> bool:
            return all(torch.allclose(a, b, atol=1e-6) for a, b in zip([*ref[0], ref[1]], [*other[0], other[1]]))

        assert same(net(**kw, control_image=torch.cat([rgb, torch.ones_like(rgb[:, :1])], 1)))  # RGBA: alpha dropped
        gray = rgb[:, :1]
        a, b = net(**kw, control_image=gray.repeat(1, 3, 1, 1)), net(**kw, control_image=gray)  # gray: repeated
        assert all(torch.equal(p, q) for p, q in zip([*a[0], a[1]], [*b[0], b[1]]))
        one = net(**kw, control_image=rgb[:1].repeat(B, 1, 1, 1))
        assert all(torch.equal(a, b) for a, b in zip(one[0], net(**kw, control_image=rgb[0])[0]))  # (C,H,W) → batch
        big = F.interpolate(rgb, scale_factor=2, mode="nearest")  # same aspect ratio, twice the size
        resized = F.interpolate(big, size=rgb.shape[2:], mode="bilinear", antialias=True)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(net(**kw, control_image=big)[0],
                                                                   net(**kw, control_image=resized)[0]))  # fmt: skip
        assert torch.allclose(resized, rgb, atol=0.35)  # 2x nearest then antialiased halving ≈ the original
        feats, ref_feats = adapter(big, kw["x"]), adapter(resized)
        assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(feats, ref_feats))
    # RGB → gray (BT.601 luma) for a 1-channel hint, and a float64 image follows the latent's dtype
    g = prepare_control_image(rgb.double(), 1, (f * H, f * W), B, like=kw["x"])
    assert g.dtype == torch.float32 and g.shape == (B, 1, f * H, f * W)
    assert torch.allclose(g[:, 0], 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2], atol=1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(B, 3, 32, 64), r"aspect ratios differ"),
        (torch.rand(B, 5, 32, 32), r"5 channels; expected \(2, 3, 32, 32\)"),
        (torch.rand(3, 3, 32, 32), r"must be \(2, 3, 32, 32\) \(or a batch of 1\)"),
        (torch.rand(32, 32), r"must be \(2, 3, 32, 32\)"),
        ((torch.rand(B, 3, 32, 32) * 255).to(torch.uint8), "divide 8-bit images by 255"),
        ([[0.0]], "needs a control image tensor"),
    ],
)
def test_bad_control_images_are_one_clear_error(bad, match):
    unet, net, adapter, f = build("context_labels_f4")
    kw = inputs(unet.config)
    with pytest.raises(LdmkitError, match=match):
        net(**kw, control_image=bad)
    with pytest.raises(LdmkitError, match=match.replace("ControlNet", "adapter")):
        adapter(bad, kw["x"])


def test_other_errors_are_one_clear_line():
    unet, net, adapter, f = build("context_labels_f4")
    kw = inputs(unet.config)
    with pytest.raises(LdmkitError, match="pass context"):  # the U-Net's own input checks
        net(**(kw | {"context": None, "context_mask": None}), control_image=image(f))
    with pytest.raises(LdmkitError, match="multiples of 2"):
        net(torch.randn(1, 4, 7, 7), 1, image(f, batch=1)[..., :28, :28], context=kw["context"][:1],
            class_labels=kw["class_labels"][:1])  # fmt: skip
    with pytest.raises(LdmkitError, match="multiples of 8"):  # f=4 × 2 levels, no x to resize to
        adapter(torch.rand(1, 3, 36, 36))
    gray_net = ControlNet.from_unet(unet, hint_channels=1, latent_factor=f, hint_widths=HINT[f])
    with pytest.raises(LdmkitError, match=r"expected \(2, 1, 32, 32\)"):
        gray_net(**kw, control_image=torch.rand(B, 5, 32, 32))
    with pytest.raises(LdmkitError, match="adapter_residuals needs 2 tensors"):
        unet(**kw, adapter_residuals=[torch.zeros(B, 16, H, W)])
    with pytest.raises(LdmkitError, match=r"adapter_residuals\[1\] must be \(2, 32, 4, 4\)"):
        unet(**kw, adapter_residuals=[torch.zeros(B, 16, H, W), torch.zeros(B, 32, H, W)])


def test_low_precision_base_model():
    """from_unet follows the base model's dtype; a float32 (or resized) control image follows the latent's."""
    unet, _, _, f = build("context_labels_f4")
    unet = unet.to(torch.bfloat16)
    net = ControlNet.from_unet(unet, latent_factor=f, hint_widths=HINT[f]).eval()
    adapter = Adapter.from_unet(unet, latent_factor=f).eval()
    assert {p.dtype for p in [*net.parameters(), *adapter.parameters()]} == {torch.bfloat16}
    kw = inputs(unet.config)
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
    big = image(f).repeat_interleave(2, 2).repeat_interleave(2, 3)  # float32, twice the size
    with torch.no_grad():
        for control in (net, adapter):
            out = controlled_unet(unet, control)(**kw, control=big)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_checkpoint_round_trip(tmp_path):
    """ControlNet and Adapter register checkpoint kinds: saved folders load back as the same module."""
    from ldmkit.checkpoint import kind_of, load, save_checkpoint

    unet, net, adapter, f = build("scale_shift_everything_f4")
    perturb(zero_initialised(net))
    for module, kind in ((net, "controlnet"), (adapter, "adapter")):
        assert kind_of(module) == kind
        folder = save_checkpoint(tmp_path / kind, 0, kind, module, module.config)
        back = load(folder)
        assert type(back) is type(module) and back.config == module.config
        a, b = module.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cond_carries_adapter_residuals():
    feats = [torch.randn(B, 16, H, W), torch.randn(B, 32, H // 2, W // 2)]
    cond = Cond(adapter_residuals=feats)
    assert Cond.of(cond, class_labels=torch.zeros(B)).adapter_residuals is feats
    assert [f.shape[0] for f in cond.repeat(3).adapter_residuals] == [3 * B, 3 * B]
    assert [f.shape[0] for f in cat_conds(cond, cond).adapter_residuals] == [2 * B, 2 * B]
    unet, net, adapter, f = build("context_labels_f4")
    perturb(adapter.parameters())
    kw = inputs(unet.config)
    c = Cond(context=kw["context"], context_mask=kw["context_mask"], labels=kw["class_labels"],
             adapter_residuals=adapter(image(f)))  # fmt: skip
    with torch.no_grad():
        assert torch.equal(unet(kw["x"], kw["t"], c), controlled_unet(unet, adapter)(**kw, control=image(f)))
        # a ControlNet on top of a Cond that already carries adapter features: both routes apply
        perturb(zero_initialised(net))
        d, m = net(**kw, control_image=image(f))
        both = unet(kw["x"], kw["t"], c, down_residuals=d, mid_residual=m)
        assert torch.equal(controlled_unet(unet, net)(kw["x"], kw["t"], Cond.of(c, control=image(f))), both)


# ---- size


def test_adapter_is_much_smaller_than_controlnet():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    unet, _, _, _ = build("three_levels_concat_f8")
    assert count(Adapter.from_unet(unet)) < count(ControlNet.from_unet(unet)) / 4
    with torch.device("meta"):  # Stable Diffusion 1.x size, no memory or time
        sd1 = UNET_PRESETS["sd1"]()
        cn, ad = ControlNet(ControlNetConfig(unet=sd1)), Adapter(AdapterConfig(channels=tuple(sd1.widths)))
    assert count(cn) == 361_279_120 and count(ad) == 77_369_280  # = diffusers' ControlNetModel / T2IAdapter (below)
    assert count(ad) < count(cn) / 4


# ---- parity with diffusers

try:
    import diffusers
except ImportError:  # only the parity tests below need it; the rest run without
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")


def _randomised(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Perturb every parameter, zero convs included, so nothing is trivially 0."""
    perturb(model.parameters(), seed=seed, std=0.05)
    return model.eval()


def _plain(config) -> dict:
    """A diffusers config for comparison: lists and tuples alike (JSON gives lists), no bookkeeping keys."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k != "_use_default_values"}


CN_PARITY = {
    # SD v1 layout, class embeddings, f = 8 (diffusers' three stride-2 convs)
    "sd1_like_f8": (dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=2,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8, num_class_embeds=5,
        conditioning_embedding_out_channels=(8, 16, 16, 32)), 0),
    # SD v2 layout, scale-shift, inpainting input (4 + 5 concat), f = 4 hint encoder, 1-channel hint
    "sd2_like_f4": (dict(
        block_out_channels=(32, 64, 64), in_channels=9, conditioning_channels=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
        cross_attention_dim=24, attention_head_dim=(2, 4, 4), norm_num_groups=8, use_linear_projection=True,
        transformer_layers_per_block=2, resnet_time_scale_shift="scale_shift", freq_shift=1, flip_sin_to_cos=False,
        upcast_attention=True, conditioning_embedding_out_channels=(8, 16, 32)), 5),
}  # fmt: skip


def _cn_pair(name: str):
    from ldmkit.interop.diffusers_controlnet import controlnet_from_diffusers

    dkw, concat = CN_PARITY[name]
    torch.manual_seed(0)
    theirs = _randomised(diffusers.ControlNetModel(**dkw))
    return theirs, controlnet_from_diffusers(theirs, concat_channels=concat).eval()


@needs_diffusers
@pytest.mark.parametrize("name", list(CN_PARITY))
def test_controlnet_parity_with_diffusers(name):
    theirs, ours = _cn_pair(name)
    cfg = ours.config
    kw = inputs(cfg.unet, seed=3)
    kw.pop("context_mask")  # diffusers' ControlNetModel masks self-attention with it (module docstring)
    hint = image(cfg.latent_factor, cfg.hint_channels, seed=4)
    x = kw["x"] if "concat" not in kw else torch.cat([kw["x"], kw["concat"]], dim=1)
    with torch.no_grad():
        ref_down, ref_mid = theirs(x, kw["t"], kw["context"], hint, conditioning_scale=0.7,
                                   class_labels=kw.get("class_labels"), return_dict=False)  # fmt: skip
        down, mid = ours(**kw, control_image=hint, scale=0.7)
    assert len(down) == len(ref_down)
    diff = max((a - b).abs().max().item() for a, b in zip([*down, mid], [*ref_down, ref_mid]))
    print(f"{name}: residual std {torch.stack([r.std() for r in ref_down]).mean():.3f}, max |diff| {diff:.2e}")
    assert min(r.std() for r in [*ref_down, ref_mid]) > 0.05
    assert diff <= 1e-4


@needs_diffusers
@pytest.mark.parametrize("name", list(CN_PARITY))
def test_controlnet_round_trip_is_lossless(name):
    from ldmkit.interop.diffusers_controlnet import controlnet_from_diffusers, controlnet_to_diffusers

    theirs, ours = _cn_pair(name)
    back = controlnet_to_diffusers(ours, upcast_attention=theirs.config.upcast_attention)
    a, b = theirs.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _plain(back.config) == _plain(theirs.config)
    again = controlnet_from_diffusers(back, concat_channels=ours.config.unet.concat_channels)
    assert again.config == ours.config


@needs_diffusers
def test_controlnet_from_sd_unet_matches_diffusers_from_unet():
    """diffusers' ControlNetModel.from_unet and ldmkit's, from the same U-Net: identical weights."""
    from ldmkit.interop.diffusers_controlnet import controlnet_to_diffusers
    from ldmkit.interop.diffusers_unet import unet_from_diffusers

    dkw = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
               norm_num_groups=8)  # fmt: skip
    d_unet = _randomised(diffusers.UNet2DConditionModel(**dkw))
    ref = diffusers.ControlNetModel.from_unet(d_unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    ours = ControlNet.from_unet(unet_from_diffusers(d_unet), hint_widths=(8, 16, 16, 32))
    a, b = ref.state_dict(), controlnet_to_diffusers(ours).state_dict()
    assert a.keys() == b.keys()
    copied = [k for k in a if not k.startswith("controlnet_")]
    assert all(torch.equal(a[k], b[k]) for k in copied)
    zeros = [k for k in a if k.startswith(("controlnet_down", "controlnet_mid", "controlnet_cond_embedding.conv_out"))]
    assert all(not a[k].any() and not b[k].any() for k in zeros)


@needs_diffusers
def test_controlnet_full_size_key_map():
    from ldmkit.interop.diffusers_controlnet import controlnet_from_diffusers, controlnet_to_diffusers

    with torch.device("meta"):
        theirs = diffusers.ControlNetModel(cross_attention_dim=768)  # control_v11 for SD 1.5
        ours = controlnet_from_diffusers(theirs)
        back = controlnet_to_diffusers(ours)
    assert ours.config.unet == UNET_PRESETS["sd1"](zero_init=False, out_channels=4)
    assert ours.config.hint_widths == (16, 32, 96, 256) and ours.config.latent_factor == 8
    assert sum(p.numel() for p in theirs.parameters()) == 361_279_120
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@needs_diffusers
def test_unsupported_diffusers_controlnets_are_named():
    from ldmkit.interop.diffusers_controlnet import adapter_from_diffusers, controlnet_config_from_diffusers

    base = diffusers.ControlNetModel(**CN_PARITY["sd1_like_f8"][0]).config
    for key, value in [("controlnet_conditioning_channel_order", "bgr"), ("global_pool_conditions", True),
                       ("class_embed_type", "timestep"), ("mid_block_type", "UNetMidBlock2D")]:  # fmt: skip
        with pytest.raises(LdmkitError, match=key):
            controlnet_config_from_diffusers(dict(base) | {key: value})
    with pytest.raises(LdmkitError, match="light_adapter"):
        adapter_from_diffusers(diffusers.T2IAdapter(channels=[16, 32], adapter_type="light_adapter"))


T2I_UNETS = {  # U-Net layouts where every level but the last has attention, as in SD 1.x / 2.x
    "two_levels_f8": (dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2), 8),
    "three_levels_f4": (dict(block_out_channels=(32, 64, 64),
                             down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                             up_block_types=("CrossAttnUpBlock2D",) * 3, layers_per_block=1), 4),
}  # fmt: skip


@needs_diffusers
@pytest.mark.parametrize("name", list(T2I_UNETS))
def test_t2i_adapter_parity_with_diffusers(name):
    """Features of diffusers' T2IAdapter and ldmkit's Adapter, then the U-Net with them added
    (diffusers' `down_intrablock_additional_residuals` vs ldmkit's `adapter_residuals`)."""
    from ldmkit.interop.diffusers_controlnet import adapter_from_diffusers, adapter_to_diffusers
    from ldmkit.interop.diffusers_unet import unet_from_diffusers

    ukw, f = T2I_UNETS[name]
    torch.manual_seed(0)
    d_unet = _randomised(diffusers.UNet2DConditionModel(**ukw, cross_attention_dim=16, attention_head_dim=2,
                                                        norm_num_groups=8))  # fmt: skip
    d_adapter = _randomised(diffusers.T2IAdapter(channels=list(ukw["block_out_channels"]), downscale_factor=f))
    unet, adapter = unet_from_diffusers(d_unet).eval(), adapter_from_diffusers(d_adapter).eval()
    kw = inputs(unet.config, seed=3)
    hint = image(f, seed=4)
    with torch.no_grad():
        ref_feats, feats = d_adapter(hint), adapter(hint)
        ref = d_unet(kw["x"], kw["t"], kw["context"], encoder_attention_mask=kw["context_mask"],
                     down_intrablock_additional_residuals=list(ref_feats)).sample  # fmt: skip
        out, plain = unet(**kw, adapter_residuals=feats), unet(**kw)
    feat_diff = max((a - b).abs().max().item() for a, b in zip(ref_feats, feats))
    diff = (ref - out).abs().max().item()
    print(f"{name}: feature max |diff| {feat_diff:.2e}, U-Net output max |diff| {diff:.2e}")
    assert feat_diff <= 1e-4 and diff <= 1e-4 and (out - plain).abs().max() > 1e-2
    back = adapter_to_diffusers(adapter)
    a, b = d_adapter.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _plain(back.config) == _plain(d_adapter.config)


def test_vector_route_reaches_controlnet_and_multicontrolnet():
    """A base model with a vector condition (pooled text) under a ControlNet: the vector reaches the
    encoder copy too. Before `Cond` was passed down whole, the ControlNet path's keyword list lacked
    `vector` and this raised "this U-Net takes a (2, 6) vector condition"."""
    torch.manual_seed(0)
    unet = UNet(tiny(vector_dim=6)).eval()
    net = ControlNet.from_unet(unet, latent_factor=4, hint_widths=HINT[4]).eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(B, 4, H, W, generator=g), torch.tensor([10, 500])
    cond = Cond(vector=torch.randn(B, 6, generator=g), control=image(4))
    with torch.no_grad():
        plain = unet(x, t, vector=cond.vector)
        two = Cond.of(cond, control=[cond.control] * 2)
        for control, c in ((net, cond), (MultiControlNet([net, net]), two)):
            assert torch.equal(controlled_unet(unet, control)(x, t, c), plain)  # zero convs: the base model
        perturb([*zero_initialised(net), *net.controlnet_cond_embedding.parameters()], std=0.5)
        down, mid = net(x, t, cond=cond)  # the image comes from cond.control
        other = net(x, t, cond=Cond.of(cond, vector=cond.vector + 1))
        assert (mid - other[1]).abs().max() > 1e-3  # the encoder copy reads the vector
        ref = unet(x, t, vector=cond.vector, down_residuals=[2 * d for d in down], mid_residual=2 * mid)
        torch.testing.assert_close(controlled_unet(unet, MultiControlNet([net, net]))(x, t, two), ref)
        with pytest.raises(LdmkitError, match="control image"):
            unet(x, t, cond)  # a raw control image needs a ControlNet to read it


def test_old_conditioning_names_still_find_the_control_package():
    """ControlNet and the adapter moved from ldmkit.conditioning to ldmkit.control (issue 28); code written
    before the move imports the same classes through the old names."""
    import ldmkit.conditioning as old
    import ldmkit.control as new

    for name in new.__all__:
        assert getattr(old, name) is getattr(new, name), name
