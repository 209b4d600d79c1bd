"""Timestep embeddings.

Sinusoidal features of the (integer or continuous) timestep, as in the Transformer's positional
encoding (Vaswani et al., 2017, §3.5) and DDPM (Ho et al., 2020, App. B), followed by a 2-layer MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> torch.Tensor:
    """(B,) timesteps → (B, dim) features [cos(t·ω_i), sin(t·ω_i)], ω_i = max_period^(−i/(half − shift)).

    `flip_sin_to_cos=True, freq_shift=0` is Stable Diffusion's choice; other codebases put sin first.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, 2*half)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) guidance strengths → (B, dim) features [sin(1000·w·ω_i), cos(1000·w·ω_i)], ω_i = 10000^(−i/(half − 1)):
    the w-embedding of a consistency student that takes the guidance scale as an input (LCM, Luo et al. 2023,
    eq. 10, after Meng et al. 2023's guided distillation). w is the strength beyond the conditional model, so
    ldmkit's scale g (1 = off) enters as g − 1, as diffusers' LCM pipeline passes guidance_scale − 1."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    args = 1000.0 * w.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, 2·half)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal features: Linear → SiLU → Linear. With `cond_dim`, a bias-free projection of
    a condition (the w-embedding of a guidance-distilled student) is added to the features first."""

    def __init__(self, in_dim: int, emb_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_proj is not None and condition is not None:
            x = x + self.cond_proj(condition.to(x.dtype))  # (B, in_dim)
        return self.linear_2(F.silu(self.linear_1(x)))  # (B, emb_dim)
