"""Residual blocks and resolution changes shared by the autoencoder and the U-Net.

The block follows the "BigGAN-style" ResNet of DDPM (Ho et al., 2020, App. B) as used by Stable
Diffusion: GroupNorm → SiLU → 3x3 conv, twice, with an optional time embedding injected between the
two convolutions. Two ways to inject it (DESIGN.md, "timestep-embedding modulation"):

- "add"         h = conv1(...) + W·e                         (DDPM)
- "scale_shift" h = norm2(h) · (1 + s) + b, [s, b] = W·e     (FiLM / AdaGN; Dhariwal & Nichol, 2021, §3)

Parameter names follow diffusers' ``ResnetBlock2D`` so checkpoints map one-to-one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

TimeEmbeddingMode = Literal["add", "scale_shift"]


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with `groups` reduced to a divisor of `channels` so tiny test configs work."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=eps, affine=True)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; optionally modulated by an embedding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        emb_channels: int | None = None,
        emb_mode: TimeEmbeddingMode = "add",
        dropout: float = 0.0,
        groups: int = 32,
        eps: float = 1e-6,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.emb_mode = emb_mode
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if emb_channels is not None:
            mult = 2 if emb_mode == "scale_shift" else 1
            self.time_emb_proj = nn.Linear(emb_channels, mult * out_channels)
        else:
            self.time_emb_proj = None
        self.norm2 = group_norm(out_channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the channel count changes (identity otherwise).
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # In place where nothing needs the old values: conv outputs (a conv's backward needs only its input)
        # always, norm outputs before SiLU only without autograd (inference), where it bounds the live
        # activations of the block to x and two more: lower sampling / decoding peak memory.
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))  # (B, C_out, H, W)
        scale_shift = None
        if self.time_emb_proj is not None and emb is not None:
            e = self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out or 2*C_out, 1, 1)
            if self.emb_mode == "add":
                h += e
            else:
                scale_shift = e.chunk(2, dim=1)
        h = self.norm2(h)
        if scale_shift is not None:
            scale, shift = scale_shift
            h = h * (1 + scale) + shift  # FiLM / AdaGN
        h = self.conv2(self.dropout(F.silu(h, inplace=inplace)))  # (B, C_out, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip)  # (B, C_out, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv.

    `asymmetric=True` pads only right/bottom then convolves without padding, as the LDM
    autoencoder does (CompVis `Downsample`, diffusers `Downsample2D(padding=0)`); the U-Net pads
    symmetrically. Both give H/2 for even H; the weights are not interchangeable.
    """

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:  # odd resolutions in the U-Net: match the skip connection exactly
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)  # (B, C, 2H, 2W)
