"""The U-Net's three block types: an encoder level, the middle, a decoder level."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldmkit.layers import Downsample, ResBlock, Upsample
from ldmkit.layers.transformer import SpatialTransformer
from ldmkit.unet.config import UNetConfig



def _res_block(cfg: UNetConfig, in_ch: int, out_ch: int) -> ResBlock:
    emb = cfg.time_embed_dim if cfg.use_time_modulation else None
    return ResBlock(in_ch, out_ch, emb, cfg.emb_mode, cfg.dropout, cfg.norm_groups, cfg.norm_eps)


def _transformer(cfg: UNetConfig, channels: int, level: int) -> SpatialTransformer:
    heads = cfg.heads_at(level)
    return SpatialTransformer(
        channels, heads, channels // heads, cfg.depth_at(level), cfg.context_dim, cfg.use_linear_projection,
        cfg.norm_groups,
    )  # fmt: skip


class DownBlock(nn.Module):
    """Encoder level: [ResBlock (→ transformer)] × num_res_blocks, then halve the resolution."""

    def __init__(self, cfg: UNetConfig, level: int, in_ch: int):
        super().__init__()
        ch, n = cfg.widths[level], cfg.num_res_blocks
        self.resnets = nn.ModuleList(_res_block(cfg, in_ch if j == 0 else ch, ch) for j in range(n))
        attend = cfg.has_attention(level)
        self.attentions = nn.ModuleList(_transformer(cfg, ch, level) for _ in range(n)) if attend else None
        if level == cfg.num_levels - 1:
            self.downsamplers = None
        else:  # without multiscale the level transition stays (same skips) but is the identity
            self.downsamplers = nn.ModuleList([Downsample(ch) if cfg.multiscale else nn.Identity()])

    def forward(
        self,
        h: torch.Tensor,
        emb: torch.Tensor | None,
        context: torch.Tensor | None,
        mask: torch.Tensor | None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, emb)  # (B, C_i, H_i, W_i)
            if self.attentions is not None:
                h = self.attentions[j](h, context, mask)  # (B, C_i, H_i, W_i)
            if residual is not None and j == len(self.resnets) - 1:
                h = h + residual  # (B, C_i, H_i, W_i) adapter feature: into the skip and the next level
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)  # (B, C_i, H_i/2, W_i/2)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """Lowest resolution: ResBlock → transformer → ResBlock."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch, last = cfg.widths[-1], cfg.num_levels - 1
        self.resnets = nn.ModuleList([_res_block(cfg, ch, ch), _res_block(cfg, ch, ch)])
        attend = cfg.use_attention and cfg.mid_attention
        self.attentions = nn.ModuleList([_transformer(cfg, ch, last)]) if attend else None

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor | None, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.resnets[0](h, emb)  # (B, C_last, H_last, W_last)
        if self.attentions is not None:
            h = self.attentions[0](h, context, mask)  # (B, C_last, H_last, W_last)
        return self.resnets[1](h, emb)  # (B, C_last, H_last, W_last)


class UpBlock(nn.Module):
    """Decoder level: [concat skip → ResBlock (→ transformer)] × (num_res_blocks + 1), then double
    the resolution. `skip_channels[j]` is the width of the skip ResBlock j consumes (0 = none)."""

    def __init__(self, cfg: UNetConfig, level: int, in_ch: int, skip_channels: Sequence[int]):
        super().__init__()
        ch = cfg.widths[level]
        self.resnets = nn.ModuleList(
            _res_block(cfg, (in_ch if j == 0 else ch) + s, ch) for j, s in enumerate(skip_channels)
        )
        n, attend = len(skip_channels), cfg.has_attention(level)
        self.attentions = nn.ModuleList(_transformer(cfg, ch, level) for _ in range(n)) if attend else None
        if level == 0:
            self.upsamplers = None
        else:
            self.upsamplers = nn.ModuleList([Upsample(ch) if cfg.multiscale else nn.Identity()])

    def forward(
        self,
        h: torch.Tensor,
        skips: Sequence[torch.Tensor] | None,
        emb: torch.Tensor | None,
        context: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """`skips`: this level's skips in encoder order (num_res_blocks + 1 of them), or None."""
        for j, resnet in enumerate(self.resnets):
            if skips is not None:
                h = torch.cat([h, skips[-1 - j]], dim=1)  # (B, C + C_skip, H_i, W_i), last skip first
            h = resnet(h, emb)  # (B, C_i, H_i, W_i)
            if self.attentions is not None:
                h = self.attentions[j](h, context, mask)  # (B, C_i, H_i, W_i)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)  # (B, C_i, 2 H_i, 2 W_i)
        return h
