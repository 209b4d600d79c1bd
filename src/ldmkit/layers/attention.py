"""Attention: multi-head (self or cross) attention, the transformer block of the LDM U-Net, and the
single-head spatial self-attention of the autoencoder's middle block.

All of them call `F.scaled_dot_product_attention`, which picks a fused kernel (flash / memory
efficient on GPU, a blocked kernel on CPU) instead of materialising the N×N matrix by hand.
Parameter names follow diffusers (`to_q`, `to_k`, `to_v`, `to_out.0`) so checkpoints map directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.layers.resnet import group_norm


class Attention(nn.Module):
    """Attention(Q = x W_q, K = c W_k, V = c W_v) with `heads` heads (Vaswani et al., 2017, eq. 1).

    Self-attention when `context` is None, cross-attention on `context` (B, M, context_dim)
    otherwise: this is how text tokens enter the U-Net (Rombach et al., 2022, eq. 3).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        qkv_bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, M, d)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, M, d)
        if mask is not None and bool(mask.all()):
            mask = None  # nothing to hide: let SDPA take its unmasked (faster) kernel
        if mask is not None:  # (B, M) True = attend; padding tokens of a text encoder are False
            mask = mask[:, None, None, :].to(torch.bool)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, d)
        h = h.transpose(1, 2).reshape(b, n, -1)  # (B, N, heads*d)
        return self.to_out[1](self.to_out[0](h))  # (B, N, query_dim)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H·W positions with a residual connection.

    Used in the autoencoder's middle block (Esser et al., 2021; Rombach et al., 2022), where it
    gives the otherwise local convolutional encoder/decoder a global receptive field.
    """

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = group_norm(channels, groups, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(t)[:, None], self.to_k(t)[:, None], self.to_v(t)[:, None]  # (B, 1, HW, C)
        a = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        a = self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + a
