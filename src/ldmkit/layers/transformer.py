"""The spatial transformer of the LDM U-Net: how attention, and with it text, enters the denoiser.

Rombach et al. (2022, §3.3 and App. F) put a small transformer after the ResBlocks of the
high-resolution U-Net levels: the feature map (B, C, H, W) is normalised, projected and flattened
into H·W tokens, each token attends to all others (self-attention, global structure) and then to
the conditioning tokens (cross-attention, eq. 3: Q = h W_q, K = V = τ(y) W_k,v), passes a GEGLU
feed-forward layer, and the result is projected back and added to the input.

Parameter names follow diffusers' `Transformer2DModel` / `BasicTransformerBlock`
(`norm`, `proj_in`, `transformer_blocks.k.{norm1, attn1, norm2, attn2, norm3, ff.net.0.proj,
ff.net.2}`, `proj_out`) so Stable Diffusion checkpoints map one-to-one. Weight initialisation
(including the optional zero-init of `proj_out`) lives with the model that owns the transformer
(`ldmkit.unet.init_weights`), not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.layers.attention import Attention
from ldmkit.layers.resnet import group_norm


class GEGLU(nn.Module):
    """x ↦ a · GELU(g) with [a, g] = x W + b: the gated GELU unit of Shazeer (2020), eq. 5."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, dim_out) each
        return a * F.gelu(gate)  # (B, N, dim_out)


class FeedForward(nn.Module):
    """GEGLU(dim → mult·dim) → dropout → Linear(mult·dim → dim). `net` indices match diffusers."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x  # (B, N, dim)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, feed-forward, each residual.

    Without `context_dim` the block has no cross-attention sub-layer at all (norm1/attn1 and
    norm3/ff only), exactly like diffusers' `BasicTransformerBlock(cross_attention_dim=None)`;
    every parameter is then still used in every forward pass (DDP-safe).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim, dropout=dropout)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, context_dim, heads, head_dim, dropout=dropout)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=4, dropout=dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, dim) self-attention over the H·W tokens
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, context_mask)  # (B, N, dim) attend to (B, M, context_dim)
        return x + self.ff(self.norm3(x))  # (B, N, dim)


class SpatialTransformer(nn.Module):
    """GroupNorm → proj_in → `depth` TransformerBlocks on H·W tokens → proj_out → + input.

    `use_linear_projection=False` (SD v1) projects with 1x1 convolutions before flattening;
    `True` (SD v2) flattens first and projects with Linear layers. The two are the same function
    with differently shaped weights ((C, C, 1, 1) vs (C, C)).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        depth: int = 1,
        context_dim: int | None = None,
        use_linear_projection: bool = False,
        groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = group_norm(channels, groups, eps=1e-6)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth)
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.norm(x)  # (B, C, H, W)
        if self.use_linear_projection:
            t = self.proj_in(t.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, inner)
        else:
            t = self.proj_in(t)  # (B, inner, H, W)
            t = t.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, inner)
        for block in self.transformer_blocks:
            t = block(t, context, context_mask)  # (B, HW, inner)
        if self.use_linear_projection:
            t = self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        else:
            # contiguous: a permuted (channels-last-strided) input sends the 1x1 conv, and the
            # ResBlocks after it, down a slower layout path on CPU
            t = self.proj_out(t.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())  # (B, C, H, W)
        return x + t  # (B, C, H, W)
