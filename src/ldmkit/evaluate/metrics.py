"""Image-quality metrics on batches in [-1, 1]: PSNR and SSIM.

SSIM follows Wang et al. (2004, eq. 13) with their defaults: an 11x11 Gaussian window with σ = 1.5,
K1 = 0.01, K2 = 0.03, computed per channel on [0, 1] images and averaged. It agrees with
scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1)` (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to01(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,), images in [-1, 1] compared on the [0, 1] scale (peak 1)."""
    mse = (_to01(x) - _to01(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    w = g[:, None] * g[None, :]  # (size, size), separable Gaussian
    return w.expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image mean SSIM (B,), images in [-1, 1]. Windows that would cross the border are dropped
    ("valid" convolution), as scikit-image does, so tiny images need `window` ≤ their side."""
    x, y = _to01(x), _to01(y)
    c = x.shape[1]
    window = min(window, x.shape[-1], x.shape[-2])
    if window % 2 == 0:
        window -= 1
    w = _gaussian_window(window, sigma, c, x.device, x.dtype)
    c1, c2 = 0.01**2, 0.03**2

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))  # (B, C, h, w)
    return s.flatten(1).mean(1)
