"""`ldmkit evaluate` for a first-stage checkpoint: how well it reconstructs, and how smooth its
latent space is — the measurable side of "why a VAE and not a plain AE" (DESIGN.md, question 1).

- PSNR / SSIM of posterior-mode reconstructions on the held-out split, beside the same figures for
  bicubic down/up sampling by the model's factor f (a trivial codec keeping 3 values per f×f block,
  where the latent keeps c): a first stage that only remembers its training images is no better
  than bicubic on images it never saw, one that compresses is well above it;
- the same at several image sizes (`sizes`; the network is fully convolutional), decoding in tiles
  when the latent is larger than 64 cells a side;
- KL per latent element and the latent mean/std (how close q(z) is to N(0, I));
- linear interpolations between two images' latents, decoded (a smooth space gives plausible
  in-between images, an unstructured one gives artefacts);
- decoded samples z ~ N(0, I) mapped back through the stored scale/shift (only a latent space
  that matches its prior decodes these into image-like pictures).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import torch.nn.functional as F

from ldmkit.autoencoder import AutoencoderKL
from ldmkit.data import build_dataset
from ldmkit.data.tensors import materialize
from ldmkit.errors import LdmkitError
from ldmkit.evaluate.metrics import psnr, ssim
from ldmkit.imageio import save_grid


def bicubic_down_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x (B, 3, H, W) in [-1, 1] shrunk by `factor` (antialiased bicubic) and blown back up (bicubic)."""
    small = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def reconstruction_figures(model: AutoencoderKL, x_all: torch.Tensor, batch_size: int = 64) -> tuple[dict, list]:
    """PSNR/SSIM of the posterior mode's reconstruction and of bicubic down/up at the model's factor,
    KL per element; and the per-batch latents (posterior modes)."""
    f, device = model.downsample_factor, next(model.parameters()).device
    ps, ss, bp, bs, kls, zs = [], [], [], [], [], []
    for i in range(0, len(x_all), batch_size):
        x = x_all[i : i + batch_size].to(device)
        post = model.encode(x)
        rec = model.decode(post.mode()).clamp(-1, 1)
        ps.append(psnr(rec, x))
        ss.append(ssim(rec, x))
        cheap = bicubic_down_up(x, f)
        bp.append(psnr(cheap, x))
        bs.append(ssim(cheap, x))
        kls.append(post.kl() / post.mean[0].numel())
        zs.append(post.mode())
    mean = lambda parts: torch.cat(parts).mean().item()  # noqa: E731
    figures = {"images": len(x_all), "psnr": mean(ps), "ssim": mean(ss), "bicubic_psnr": mean(bp),
               "bicubic_ssim": mean(bs), "kl_per_element": mean(kls)}
    figures["psnr_over_bicubic"] = figures["psnr"] - figures["bicubic_psnr"]
    return figures, zs


@torch.no_grad()
def evaluate_autoencoder(
    model: AutoencoderKL, dataset: str, size: int | list[int], out: str | Path, n: int = 256, seed: int = 0,
    batch_size: int = 64, split: str = "val",
) -> dict:
    """Held-out figures at `size` (the first of several sizes: grids and latent statistics there, PSNR
    / SSIM / bicubic baseline at each, in res["by_size"]). `split` "all" takes every image of a folder
    the model never trained on."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [size] if isinstance(size, int) else list(size)
    f = model.downsample_factor
    bad = [s for s in sizes if s % f]
    if bad:
        raise LdmkitError(f"image size {bad[0]} is not a multiple of the autoencoder's factor {f}")
    by_size: dict[int, dict] = {}
    tiling = model.tiling
    try:
        for s in sizes:
            if s // f > 64 and model.tiling is None:
                model.enable_tiling(tile_latent=64, overlap_latent=16)
            data = materialize(build_dataset(dataset, s, split, seed=seed), n, "eval data")
            figures, zs = reconstruction_figures(model, data.images, max(1, batch_size * 64 * 64 // (s * s)))
            figures["tiled"] = model.tiling is not None
            by_size[s] = figures
            if s == sizes[0]:
                x_all, z = data.images, torch.cat(zs)
            model.tiling = tiling
    finally:
        model.tiling = tiling
    size = sizes[0]
    zn = model.normalize(z)  # what the second stage sees
    res = {
        **{k: v for k, v in by_size[size].items() if k != "tiled"},
        "latent_mean": z.mean().item(),
        "latent_std": z.std().item(),
        "normalised_latent_mean": zn.mean().item(),
        "normalised_latent_std": zn.std().item(),
        "latent_shape": list(z.shape[1:]),
        "size": size,
        "by_size": {str(s): v for s, v in by_size.items()},
    }

    k = min(8, len(x_all))
    recon = model.decode(model.encode(x_all[:k]).mode()).clamp(-1, 1)
    save_grid(torch.cat([x_all[:k], recon, bicubic_down_up(x_all[:k], f)]), out / "reconstructions.png", nrow=k,
              upscale=max(1, 128 // size))

    # Interpolation: 4 pairs, 8 steps each, linear in the latent (mode) space.
    steps = torch.linspace(0, 1, 8)
    rows = []
    for a in range(min(4, len(x_all) // 2)):
        za, zb = z[2 * a : 2 * a + 1], z[2 * a + 1 : 2 * a + 2]
        zi = torch.cat([(1 - s) * za + s * zb for s in steps])
        rows.append(model.decode(zi).clamp(-1, 1))
    if rows:
        save_grid(torch.cat(rows), out / "interpolations.png", nrow=len(steps), upscale=2)

    # Prior samples: z' ~ N(0, I) in the normalised space, mapped back with the stored scale/shift.
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn((16, *z.shape[1:]), generator=g)
    save_grid(model.decode_latents(zp).clamp(-1, 1), out / "prior_samples.png", nrow=8, upscale=2)

    lines = [
        "# Autoencoder evaluation",
        "",
        f"{'Every image of' if split == 'all' else 'Held-out'} `{dataset}` at {size}x{size}, {res['images']} images; "
        f"latent shape {res['latent_shape']}.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| PSNR (dB) | {res['psnr']:.2f} |",
        f"| SSIM | {res['ssim']:.4f} |",
        f"| bicubic {f}x down/up: PSNR (dB) / SSIM | {res['bicubic_psnr']:.2f} / {res['bicubic_ssim']:.4f} |",
        f"| KL per latent element (nats) | {res['kl_per_element']:.4f} |",
        f"| latent mean / std | {res['latent_mean']:.3f} / {res['latent_std']:.3f} |",
        f"| normalised latent mean / std | {res['normalised_latent_mean']:.3f} / {res['normalised_latent_std']:.3f} |",
        "",
        "By image size (the same held-out source; tiled: decoded in overlapping tiles):",
        "",
        "| size | images | PSNR (dB) | bicubic PSNR (dB) | difference (dB) | SSIM | bicubic SSIM | tiled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {s} | {v['images']} | {v['psnr']:.2f} | {v['bicubic_psnr']:.2f} | {v['psnr_over_bicubic']:+.2f} | "
          f"{v['ssim']:.4f} | {v['bicubic_ssim']:.4f} | {'yes' if v['tiled'] else 'no'} |" for s, v in by_size.items()],
        "",
        f"Reconstructions (top: input, middle: output, bottom: bicubic {f}x down/up):",
        "",
        "![reconstructions](reconstructions.png)",
        "",
        "Linear interpolations between latents:",
        "",
        "![interpolations](interpolations.png)",
        "",
        "Decoded samples from N(0, I) in the normalised latent space:",
        "",
        "![prior samples](prior_samples.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res
