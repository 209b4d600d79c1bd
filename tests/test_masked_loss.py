"""Masked loss (issue 30, `data.mask`): the loss weighted by a mask on the latent grid, normalised per sample
by the mask's mass (ldmkit.diffusion.objective), so masked-out cells do not train at all."""

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ldmkit.autoencoder import AutoencoderConfig
from ldmkit.conditioning import Conditioner, ConditionerConfig
from ldmkit.diffusion.objective import DiffusionObjective
from ldmkit.diffusion.schedules import make_schedule
from ldmkit.errors import LdmkitError
from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig
from ldmkit.rng import BatchRandom
from ldmkit.unet import UNetConfig


def _objective(prediction="eps", weighting="uniform"):
    return DiffusionObjective(make_schedule("linear", 1000), prediction, weighting)


def _pred(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("prediction,weighting", [("eps", "uniform"), ("v", "min_snr")])
def test_a_mask_of_ones_is_the_unmasked_loss_exactly(prediction, weighting):
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    pred = _pred(x0.shape)
    obj = _objective(prediction, weighting)
    plain = obj(lambda z, t: pred, x0, torch.Generator().manual_seed(7))
    ones = obj(lambda z, t: pred, x0, torch.Generator().manual_seed(7), loss_mask=torch.ones(4, 1, 8, 8))
    assert torch.equal(plain, ones)


def test_masked_out_cells_get_exactly_zero_gradient_and_the_rest_the_mean_over_kept_cells():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pred = _pred(x0.shape)
    mask = torch.ones(2, 1, 8, 8)
    mask[..., 4:] = 0  # the right half does not train
    obj = _objective()
    terms = obj.terms(lambda z, t: pred, x0, torch.Generator().manual_seed(3), loss_mask=mask)
    terms.loss.mean().backward()
    assert torch.equal(pred.grad[..., 4:], torch.zeros(2, 4, 8, 4))
    assert (pred.grad[..., :4] != 0).all()
    # the value: w(t)·mean of (ε − pred)² over the kept half, per sample (ε redrawn from the same generator)
    noise = obj.sample_noise(x0, BatchRandom.of(_draw_t(obj, x0), 2))
    want = (noise - pred.detach())[..., :4].pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms.loss.detach(), want, rtol=1e-6, atol=0)


def _draw_t(obj, x0):
    """The generator as `terms` leaves it after drawing t (noise is drawn next)."""
    g = BatchRandom.of(torch.Generator().manual_seed(3), x0.shape[0])
    g.randint(obj.schedule.num_timesteps)
    return g.generator


def test_an_all_zero_mask_trains_nothing_and_a_bad_shape_is_refused():
    x0 = torch.randn(2, 4, 8, 8)
    pred = _pred(x0.shape)
    loss = _objective()(lambda z, t: pred, x0, torch.Generator().manual_seed(0), loss_mask=torch.zeros(2, 1, 8, 8))
    loss.backward()
    assert loss.item() == 0 and torch.equal(pred.grad, torch.zeros_like(pred))
    with pytest.raises(LdmkitError, match="loss mask must be"):
        _objective()(lambda z, t: pred, x0, loss_mask=torch.ones(2, 1, 16, 16))


def _tiny_ldm() -> LatentDiffusion:
    ae = AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4, scaling_factor=0.7)  # factor 4
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(), num_heads=2, norm_groups=4)
    cond = ConditionerConfig(text_encoder=None, num_classes=0)
    torch.manual_seed(0)
    cfg = LatentDiffusionConfig(autoencoder=ae, unet=unet, conditioner=cond, image_size=16)
    return LatentDiffusion.from_config(cfg, conditioner=Conditioner(cond))


def test_pipeline_pools_a_pixel_mask_to_the_latent_grid_and_masked_cells_do_not_train():
    """A pixel mask zero on the left half (16 px, factor 4): latent columns 0-1 get exactly zero gradient on
    the U-Net's output; a pixel mask of ones is the unmasked loss exactly."""
    ldm = _tiny_ldm()
    z0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = []

    def unet(z, t, cond):
        out = ldm.unet(z, t, cond)
        out.retain_grad()
        outs.append(out)
        return out

    mask = torch.ones(2, 1, 16, 16)
    mask[..., :8] = 0
    ldm.loss(z0, generator=torch.Generator().manual_seed(1), unet=unet, loss_mask=mask).backward()
    grad = outs[-1].grad
    assert torch.equal(grad[..., :2], torch.zeros(2, 4, 4, 2)) and (grad[..., 2:] != 0).all()
    plain = ldm.loss(z0, generator=torch.Generator().manual_seed(1))
    ones = ldm.loss(z0, generator=torch.Generator().manual_seed(1), loss_mask=torch.ones(2, 1, 16, 16))
    assert torch.equal(plain, ones)
    # a cell half covered weighs half (the mean of its 4x4 pixels): pixels 8-9 of cell 2 are unmasked, so cell 2
    # weighs 0.5 and still trains, cells 0-1 get no gradient
    from ldmkit.pipeline import latent_loss_mask

    rim = torch.ones(2, 1, 16, 16)
    rim[..., :10] = 0
    pooled = latent_loss_mask(rim, (4, 4))
    assert torch.equal(pooled[..., 2], torch.full((2, 1, 4), 0.5)) and torch.equal(pooled[..., 3], torch.ones(2, 1, 4))
    outs.clear()
    ldm.loss(z0, generator=torch.Generator().manual_seed(1), unet=unet, loss_mask=rim).backward()
    grad = outs[-1].grad
    assert torch.equal(grad[..., :2], torch.zeros(2, 4, 4, 2)) and (grad[..., 2:] != 0).all()


@pytest.mark.slow
def test_train_reads_alpha_masks_from_a_folder(tmp_path):
    """`ldmkit train` with data.mask=alpha (and flips), captions from .txt files and shuffled, dropped tags on
    an RGBA folder trains and resumes exactly (every draw a function of (seed, step, row))."""
    import shutil

    from safetensors.torch import load_file

    from ldmkit.checkpoint import WEIGHTS, resolve
    from ldmkit.cli import main

    root = tmp_path / "rgba"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
        rgba[..., 3] = 0
        rgba[:, : 4 + i % 8, 3] = 255
        Image.fromarray(rgba, "RGBA").save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"noise {i % 3}, bright, square, small")  # a kohya caption file
    ae = tmp_path / "ae"
    assert main(["train-autoencoder", "--config", "tiny", "--quiet", "--data", str(root), "--out", str(ae),
                 "--set", "data.size=16", "--set", "optim.steps=2"]) == 0
    args = ["train", "--config", "tiny", "--quiet", "--data", str(root), "--set", f"autoencoder={ae}",
            "--set", "conditioner.num_classes=0", "--set", "unet.num_classes=0",
            "--set", "data.size=16", "--set", "data.mask=alpha", "--set", "data.shuffle_tags=true",
            "--set", "data.keep_tokens=1", "--set", "data.tag_dropout=0.3", "--set", "data.hflip=true", "--set", "optim.steps=5",
            "--set", "optim.batch_size=4", "--set", "logging.ckpt_every=1", "--set", "logging.keep_checkpoints=9"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*args, "--out", str(whole)]) == 0
    shutil.copytree(whole, part)
    for ck in (part / "checkpoints").iterdir():
        if int(ck.name.split("_")[1]) > 3:
            shutil.rmtree(ck)
    (part / "latest").write_text("step_00000003\n")
    assert main([*args, "--out", str(part), "--resume"]) == 0
    a, b = load_file(str(resolve(whole) / WEIGHTS)), load_file(str(resolve(part) / WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = yaml.safe_load((whole / "train_config.yaml").read_text())["data"]
    assert (saved["mask"], saved["shuffle_tags"], saved["keep_tokens"], saved["tag_dropout"]) == ("alpha", True, 1, 0.3)
    from ldmkit.checkpoint import read_config

    assert read_config(str(whole))[3]["mask"] == "alpha"  # what `ldmkit evaluate` weighs its held-out error by


def _masked_folder(root, n=9, mask_files=True):
    """n noise images with captions; every other one has NAME_mask.png (with `mask_files`); one is a GIF with a transparent colour
    (re-encoded by make-shards) and two are RGBA PNGs, so both data.mask modes have something to read."""
    root.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)  # not square: the crop's record matters
        if i == 0:
            Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(root / f"{i:02d}.gif", transparency=0)
        elif i in (1, 2):
            alpha = np.zeros((20, 24, 1), np.uint8)
            alpha[:, : 6 * i] = 255
            Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(root / f"{i:02d}.png")
        else:
            Image.fromarray(rgb).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"noise {i}")
        if i % 2 and mask_files:
            m = np.zeros((20, 24), np.uint8)
            m[2 * i % 20 :, 3:] = 200
            Image.fromarray(m).save(root / f"{i:02d}_mask.png")
    return root


@pytest.mark.parametrize("mode", ["files", "alpha"])
def test_make_shards_carries_the_masks_and_training_reads_the_same_masked_batches_as_the_folder(mode, tmp_path):
    """`ldmkit data make-shards --mask MODE`: the shards hold each image's mask (a KEY.mask.png; the alpha kept,
    also through a re-encoded GIF), so the shards' items (image, caption, loss mask) equal the folder's one for one,
    and the training stream's batches pair each image with the folder's mask for it."""
    from ldmkit.cli import main
    from ldmkit.data.folder import ImageFolderDataset
    from ldmkit.data.shards import ShardItems
    from ldmkit.train.config import DataConfig
    from ldmkit.train.data import open_train_data
    from ldmkit.train.distributed import Dist

    root = _masked_folder(tmp_path / "f", mask_files=mode == "files")
    assert main(["data", "make-shards", str(root), str(tmp_path / "s"), "--shard-size", "4", "--mask", mode,
                 "--quiet"]) == 0
    folder = ImageFolderDataset(str(root), size=16, split="all", mask=mode)
    shards = ShardItems(str(tmp_path / "s"), 16, "all", limit=-1, mask=mode)
    assert len(folder) == len(shards) == 9  # with files, the *_mask.png files are masks, not samples
    partial = 0
    for i in range(9):
        a, b = folder[i], shards[i]
        assert a["text"] == b["text"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["loss_mask"], b["loss_mask"]), i
        partial += bool((a["loss_mask"] < 1).any())
    assert partial == (4 if mode == "files" else 3)  # the masks are real, not all ones
    # training: the stream's batches (shards) and the folder's, matched by image, carry the same masks
    by_image = {folder[i]["image"].numpy().tobytes(): folder[i]["loss_mask"] for i in range(9)}
    seen = 0
    for spec in (str(root), str(tmp_path / "s")):
        d = DataConfig(dataset=spec, size=16, mask=mode, workers=0, in_memory=False)
        source = open_train_data(d, 4, 0, Dist(), 1, False, masked_loss=True)
        for step in range(3):
            batch = source.batch(step, 0, 4)
            for img, m in zip(batch["image"], batch["loss_mask"]):
                assert torch.equal(by_image[img.numpy().tobytes()], m)
                seen += 1
        source.close()
    assert seen == 24


class _HalfWrong(torch.nn.Module):
    """A stand-in U-Net predicting ε̂ = 0 in the left half of the latent grid and 10 in the right half."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, t, cond):
        out = torch.zeros_like(z)
        out[..., z.shape[-1] // 2 :] = 10.0
        return out


def test_the_heldout_error_of_a_masked_model_weighs_each_latent_cell_by_its_mask(tmp_path):
    """`ldmkit evaluate`'s held-out denoising error of a model trained with data.mask reads the held-out images'
    masks: alpha opaque on the left half only, and a predictor wrong by 10 on the right half only, gives exactly the
    mean of ε² over the left half (the seeded noise rebuilt here); without the mask the right half's error counts."""
    from ldmkit.evaluate.diffusion import HELDOUT_T, evaluate_diffusion

    root = tmp_path / "f"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        rgba = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
        rgba[..., 3] = 0
        rgba[:, :8, 3] = 255  # the left 8 pixel columns: latent columns 0-1 at factor 4
        Image.fromarray(rgba, "RGBA").save(root / f"{i:02d}.png")
    ldm = _tiny_ldm().eval()
    ldm.unet = _HalfWrong()
    kw = dict(seeds=1, steps=1, dataset=str(root), seed=0)
    masked = evaluate_diffusion(ldm, tmp_path / "m", mask="alpha", **kw)["heldout"]
    plain = evaluate_diffusion(ldm, tmp_path / "p", **kw)["heldout"]
    assert masked["masked"] and not plain["masked"] and masked["n"] == plain["n"] >= 1
    g = torch.Generator().manual_seed(0)  # heldout_error's noise: seed·1_000_003 + 0, one draw per timestep
    eps = torch.stack([torch.randn(masked["n"], 4, 4, 4, generator=g) for _ in HELDOUT_T])  # (T, n, c, h, w)
    want_masked = eps[..., :2].pow(2).mean((2, 3, 4)).mean().item()
    want_plain = torch.cat([eps[..., :2].pow(2), (10 - eps[..., 2:]).pow(2)], -1).mean((2, 3, 4)).mean().item()
    assert masked["eps_mse"] == pytest.approx(want_masked, rel=1e-5)
    assert plain["eps_mse"] == pytest.approx(want_plain, rel=1e-5) and plain["eps_mse"] > 40
