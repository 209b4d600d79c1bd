"""`ldmkit evaluate` for a first-stage checkpoint: how well it reconstructs, and how smooth its
latent space is — the measurable side of "why a VAE and not a plain AE" (DESIGN.md, question 1).

- PSNR / SSIM of posterior-mode reconstructions on the held-out split;
- KL per latent element and the latent mean/std (how close q(z) is to N(0, I));
- linear interpolations between two images' latents, decoded (a smooth space gives plausible
  in-between images, an unstructured one gives artefacts);
- decoded samples z ~ N(0, I) mapped back through the stored scale/shift (only a latent space
  that matches its prior decodes these into image-like pictures).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldmkit.autoencoder import AutoencoderKL
from ldmkit.data import build_dataset
from ldmkit.evaluate.metrics import psnr, ssim
from ldmkit.imageio import save_grid
from ldmkit.data.tensors import materialize


@torch.no_grad()
def evaluate_autoencoder(
    model: AutoencoderKL, dataset: str, size: int, out: str | Path, n: int = 256, seed: int = 0, batch_size: int = 64
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = materialize(build_dataset(dataset, size, "val", seed=seed), n, "eval data")
    x_all = data.images
    ps, ss, kls, zs = [], [], [], []
    for i in range(0, len(x_all), batch_size):
        x = x_all[i : i + batch_size]
        post = model.encode(x)
        rec = model.decode(post.mode()).clamp(-1, 1)
        ps.append(psnr(rec, x))
        ss.append(ssim(rec, x))
        kls.append(post.kl() / post.mean[0].numel())
        zs.append(post.mode())
    z = torch.cat(zs)
    zn = model.normalize(z)  # what the second stage sees
    res = {
        "images": len(x_all),
        "psnr": torch.cat(ps).mean().item(),
        "ssim": torch.cat(ss).mean().item(),
        "kl_per_element": torch.cat(kls).mean().item(),
        "latent_mean": z.mean().item(),
        "latent_std": z.std().item(),
        "normalised_latent_mean": zn.mean().item(),
        "normalised_latent_std": zn.std().item(),
        "latent_shape": list(z.shape[1:]),
    }

    k = min(8, len(x_all))
    recon = model.decode(model.encode(x_all[:k]).mode()).clamp(-1, 1)
    save_grid(torch.cat([x_all[:k], recon]), out / "reconstructions.png", nrow=k, upscale=2)

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
        f"Held-out `{dataset}` at {size}x{size}, {res['images']} images; latent shape {res['latent_shape']}.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| PSNR (dB) | {res['psnr']:.2f} |",
        f"| SSIM | {res['ssim']:.4f} |",
        f"| KL per latent element (nats) | {res['kl_per_element']:.4f} |",
        f"| latent mean / std | {res['latent_mean']:.3f} / {res['latent_std']:.3f} |",
        f"| normalised latent mean / std | {res['normalised_latent_mean']:.3f} / {res['normalised_latent_std']:.3f} |",
        "",
        "Reconstructions (top: input, bottom: output):",
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
    return res
