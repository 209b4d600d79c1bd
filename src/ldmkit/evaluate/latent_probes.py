"""Probes of a first stage's latent space that need no second stage: how smooth, how Gaussian, how
sharp its decodes are. They measure the claims made for the KL-regularised first stage (Rombach et
al., 2022, §3: a "slight KL-penalty towards a standard normal on the learned latent", so that the
latent space is well-behaved for the diffusion model) against a plain autoencoder's.

- `interpolation_roughness`: decode `steps` points on the straight line between two images'
  latents; the summed pixel distance between consecutive frames over the distance between the
  endpoints. 1.0 = the decoded path moves straight from A to B; larger = detours and artefacts.
- `prior_realism` (shapes): the fraction of decoded z ~ N(0, I) (through the stored scale/shift) the
  independent attribute checker reads as one shape in a palette colour. Only a latent space that
  matches its prior decodes its samples into images of the data.
- `latent_statistics`: mean, std, excess kurtosis of the raw and the normalised latents, and the
  mean |correlation| between channels: how close the second stage's input is to N(0, I).
- `sharpness`: the energy of the discrete Laplacian of decoded images over that of the originals,
  the fraction of the high-frequency detail a decoder keeps (blur < 1); the adversarial loss of
  the LDM first stage is there to keep it (Esser et al., 2021, §3.2: L2 alone gives blurry images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def interpolation_roughness(ae, x: torch.Tensor, pairs: int = 16, steps: int = 16) -> float:
    """Mean over `pairs` consecutive pairs of `x` (needs 2·pairs images) of path length / endpoint distance
    of the decoded straight line between their posterior means."""
    pairs = min(pairs, len(x) // 2)
    ratios = []
    s = torch.linspace(0, 1, steps)[:, None, None, None]
    for k in range(pairs):
        a, b = x[2 * k : 2 * k + 1], x[2 * k + 1 : 2 * k + 2]
        za, zb = ae.encode(a).mean, ae.encode(b).mean  # (1, c, h, w)
        frames = ae.decode((1 - s) * za + s * zb).clamp(-1, 1)  # (steps, 3, H, W)
        ratios.append(path_ratio(frames))
    return sum(ratios) / len(ratios)


def path_ratio(frames: torch.Tensor) -> float:
    """Σ ‖f_{i+1} − f_i‖ / ‖f_last − f_first‖ of a sequence of frames (N, ...); ≥ 1 by the triangle inequality."""
    path = (frames[1:] - frames[:-1]).flatten(1).norm(dim=1).sum()
    direct = (frames[-1] - frames[0]).flatten().norm().clamp_min(1e-6)
    return (path / direct).item()


def palette_shape(img: torch.Tensor) -> bool:
    """Whether the attribute checker reads `img` (3, H, W) in [-1, 1] as one shape whose colour is close
    (RGB distance < 40) to a palette entry; the checker alone always names the nearest colour."""
    from ldmkit.evaluate.attributes import PALETTE, check_attributes

    if check_attributes(img)["shape"] is None:
        return False
    fg = ((img.float() + 1) * 127.5).permute(1, 2, 0).reshape(-1, 3)
    bright = fg[fg.max(1).values > 80]
    if len(bright) == 0:
        return False
    med = bright.median(0).values
    return min((med - torch.tensor(p, dtype=torch.float32)).norm().item() for p in PALETTE.values()) < 40


@torch.no_grad()
def prior_samples(ae, n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n decodes (n, 3, size, size) in [-1, 1] of z' ~ N(0, I) in the normalised latent space."""
    c, f = ae.config.latent_channels, ae.config.downsample_factor
    z = torch.randn((n, c, size // f, size // f), generator=torch.Generator().manual_seed(seed))
    return ae.decode_latents(z).clamp(-1, 1)


@torch.no_grad()
def prior_realism(ae, n: int = 256, seed: int = 0, size: int = 32) -> float:
    """Fraction of decoded N(0, I) latents the shapes checker reads as a palette-coloured shape."""
    imgs = prior_samples(ae, n, size, seed)
    return sum(palette_shape(img) for img in imgs) / n


def excess_kurtosis(x: torch.Tensor) -> float:
    """E[(x − μ)⁴] / σ⁴ − 3 of all elements: 0 for a Gaussian, −1.2 for a uniform, > 0 for heavy tails."""
    x = x.double().flatten()
    d = x - x.mean()
    return (d.pow(4).mean() / d.pow(2).mean().pow(2) - 3).item()


def channel_correlation(z: torch.Tensor) -> float:
    """Mean |Pearson correlation| between distinct latent channels of z (N, C, h, w), over all positions."""
    c = z.shape[1]
    if c < 2:
        return 0.0
    flat = z.double().transpose(0, 1).reshape(c, -1)  # (C, N·h·w)
    corr = torch.corrcoef(flat).nan_to_num(0.0)
    off = corr[~torch.eye(c, dtype=torch.bool)]
    return off.abs().mean().item()


@torch.no_grad()
def latent_statistics(ae, x: torch.Tensor, batch_size: int = 64) -> dict:
    """Statistics of the posterior means of x: raw mean/std (what the KL term acts on), and the
    normalised latents' (what the second stage learns) std, excess kurtosis, channel correlation."""
    z = torch.cat([ae.encode(x[i : i + batch_size]).mean for i in range(0, len(x), batch_size)])
    zn = ae.normalize(z)
    return {"mean": z.mean().item(), "std": z.std().item(), "normalised_mean": zn.mean().item(),
            "normalised_std": zn.std().item(), "kurtosis": excess_kurtosis(zn),
            "channel_correlation": channel_correlation(zn)}


_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean squared 5-point Laplacian of images (B, C, H, W), per image (B,); borders excluded."""
    c = x.shape[1]
    w = _LAPLACE.to(x.device, x.dtype).expand(c, 1, 3, 3)
    return F.conv2d(x, w, groups=c).pow(2).flatten(1).mean(1)


@torch.no_grad()
def sharpness(decoded: torch.Tensor, reference: torch.Tensor) -> float:
    """Σ Laplacian energy of `decoded` over that of `reference` (same images): 1 = as much detail, < 1 blur."""
    return (laplacian_energy(decoded.float()).sum() / laplacian_energy(reference.float()).sum().clamp_min(1e-12)).item()
