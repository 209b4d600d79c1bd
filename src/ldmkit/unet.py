"""The denoiser: a time-conditioned U-Net over latents with every conditioning route built in.

Architecture (Ronneberger et al., 2015; Ho et al., 2020, App. B; Rombach et al., 2022, §3.3):

    x ⊕ concat ─conv_in─> level 0 ─down─> … ─> level L-1 ─> middle ─> level L-1 ─up─> … ─> level 0 ─conv_out─> out
                             │                                                                ▲
                             └──────────  skip connections (channel concatenation)  ──────────┘

Each level is `num_res_blocks` ResBlocks (timestep embedding injected in each), optionally each
followed by a spatial transformer (self-attention + cross-attention on `context`); the decoder
levels have one more ResBlock, which consumes the skip produced by the resolution change.
Conditioning routes (DESIGN.md table): concatenation (`concat`), timestep-embedding modulation
(`emb_mode`), cross-attention (`context`), label embedding added to the time embedding
(`class_labels`), ControlNet residuals (`down_residuals`, `mid_residual`) and T2I-Adapter features
(`adapter_residuals`, added at the end of each encoder level).

Module and parameter names mirror diffusers' `UNet2DConditionModel` (conv_in, time_embedding,
class_embedding, down_blocks.i.{resnets, attentions, downsamplers}, mid_block, up_blocks.i.{…,
upsamplers}, conv_norm_out, conv_out), so Stable Diffusion weights map one-to-one
(`ldmkit.interop.diffusers_unet`), but the blocks are three plain classes, not string-chosen types.

The FAQ's "why does the U-Net work" answers are switches here, so each can be ablated:
`multiscale`, `use_skip_connections`, `use_time_modulation`, `use_attention`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmkit.errors import LdmkitError
from ldmkit.layers import Downsample, ResBlock, TimestepEmbedding, Upsample, group_norm, timestep_embedding
from ldmkit.layers.transformer import SpatialTransformer


class UNetConfig(BaseModel):
    """Architecture of the denoiser. Level i has width model_channels · channel_mult[i] and works at
    1/2^i of the latent resolution (all at full resolution when `multiscale` is off)."""

    model_config = ConfigDict(extra="forbid")

    # ---- inputs and outputs
    in_channels: int = Field(4, ge=1, description="latent channels of x (SD: 4)")
    out_channels: int = Field(4, ge=1, description="predicted channels (usually = in_channels)")
    concat_channels: int = Field(
        0, ge=0, description="spatial condition channels concatenated to x (SD inpainting: 5 = mask + masked latent)"
    )
    # ---- width and depth
    model_channels: int = Field(320, ge=1, description="width of level 0; the time embedding is 4x this")
    channel_mult: tuple[int, ...] = Field((1, 2, 4, 4), description="width multiplier per level")
    num_res_blocks: int = Field(2, ge=1, description="ResBlocks per encoder level (the decoder has one more)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout in ResBlocks (not in attention, as in SD)")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups (reduced to a divisor for tiny widths)")
    norm_eps: float = Field(1e-5, gt=0.0, description="GroupNorm eps of ResBlocks and the output norm")
    # ---- attention (spatial transformers)
    attention_levels: tuple[int, ...] = Field((0, 1, 2), description="levels with transformers (SD: 0,1,2 of 4)")
    mid_attention: bool = Field(True, description="a transformer between the two middle ResBlocks")
    num_heads: int | tuple[int, ...] | None = Field(
        8, description="heads per transformer, one for all levels or one per level (SD1: 8); unused with head_dim"
    )
    head_dim: int | None = Field(None, ge=1, description="channels per head; heads = width // head_dim (SD2: 64)")
    transformer_depth: int = Field(1, ge=1, description="transformer blocks per spatial transformer")
    context_dim: int | None = Field(None, ge=1, description="width of cross-attention context tokens; None = none")
    use_linear_projection: bool = Field(False, description="Linear instead of 1x1-conv proj_in/out (SD2)")
    # ---- timestep and label embeddings
    flip_sin_to_cos: bool = Field(True, description="sinusoid order [cos, sin] (SD) instead of [sin, cos]")
    freq_shift: float = Field(0.0, description="frequency shift of the sinusoids (SD: 0, DDPM: 1)")
    emb_mode: Literal["add", "scale_shift"] = Field(
        "add", description="how ResBlocks take the embedding: add a bias (SD) or FiLM/AdaGN scale-shift"
    )
    num_classes: int = Field(
        0, ge=0, description="labels embedded and added to the time embedding; 0 = none; label num_classes = null"
    )
    vector_dim: int = Field(
        0, ge=0, description="a (B, vector_dim) condition (pooled text, scalars) through an MLP into the time embedding"
    )
    # ---- ablation switches (all True = the standard LDM U-Net)
    use_skip_connections: bool = Field(True, description="off: the decoder gets no encoder features")
    use_attention: bool = Field(True, description="off: no transformer anywhere (so no cross-attention)")
    use_time_modulation: bool = Field(True, description="off: no time embedding; the network is time-agnostic")
    multiscale: bool = Field(True, description="off: no down/upsampling; every level at full latent resolution")
    # ---- initialisation
    zero_init: bool = Field(
        True, description="zero the last conv of each residual branch and conv_out (guided-diffusion's zero_module)"
    )

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        levels = len(self.channel_mult)
        if not levels or any(m < 1 for m in self.channel_mult):
            raise ValueError("channel_mult must be a non-empty list of positive integers")
        bad = [i for i in self.attention_levels if not 0 <= i < levels]
        if bad:
            raise ValueError(f"attention_levels {bad} out of range: there are {levels} levels (0..{levels - 1})")
        if len(set(self.attention_levels)) != len(self.attention_levels):
            raise ValueError(f"attention_levels has duplicates: {self.attention_levels}")
        if self.head_dim is not None and self.num_heads is not None:
            if "num_heads" in self.model_fields_set:
                raise ValueError("set num_heads or head_dim, not both")
            self.num_heads = None  # head_dim given: the default head count does not apply
        if isinstance(self.num_heads, tuple) and len(self.num_heads) != levels:
            raise ValueError(f"num_heads has {len(self.num_heads)} entries for {levels} levels")
        if self.has_any_attention:
            if self.num_heads is None and self.head_dim is None:
                raise ValueError("attention is on: set num_heads (SD1: 8) or head_dim (SD2: 64)")
            attended = sorted(set(self.attention_levels) | ({levels - 1} if self.mid_attention else set()))
            for i in attended:
                heads, width = self.heads_at(i), self.widths[i]
                if heads < 1 or width % heads:
                    raise ValueError(f"level {i}: width {width} is not divisible into {heads} attention heads")
        if self.context_dim is not None and not self.has_any_attention:
            what = "use_attention is off" if not self.use_attention else "no level or middle block has attention"
            raise ValueError(f"context_dim is set but {what}: text/context would have no route into the model")
        if self.num_classes and not self.use_time_modulation:
            raise ValueError("num_classes > 0 needs use_time_modulation: labels are added to the time embedding")
        if self.vector_dim and not self.use_time_modulation:
            raise ValueError("vector_dim > 0 needs use_time_modulation: the vector is added to the time embedding")
        return self

    @property
    def widths(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def has_any_attention(self) -> bool:
        return self.use_attention and (bool(self.attention_levels) or self.mid_attention)

    @property
    def size_multiple(self) -> int:
        """Latent height and width must be multiples of this."""
        return 2 ** (self.num_levels - 1) if self.multiscale else 1

    def has_attention(self, level: int) -> bool:
        return self.use_attention and level in self.attention_levels

    def heads_at(self, level: int) -> int:
        """Attention heads of the transformers at `level` (the middle block uses the last level's)."""
        if self.head_dim is not None:
            return self.widths[level] // self.head_dim
        if isinstance(self.num_heads, tuple):
            return self.num_heads[level]
        return 1 if self.num_heads is None else self.num_heads


# ---------------------------------------------------------------------------------------------
# Presets (STYLE.md #3). "tiny" and "small" are CPU-sized for 8x8 latents.


def unet_tiny(**kw) -> UNetConfig:
    """~0.24M parameters: two levels (16, 32), one ResBlock each, attention at the lower resolution."""
    base = dict(
        model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2, norm_groups=8
    )
    return UNetConfig(**(base | kw))


def unet_small(**kw) -> UNetConfig:
    """~2.3M parameters: three levels (32, 64, 64) for 8x8 latents, attention at levels 1 and 2."""
    base = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2), num_heads=4)
    return UNetConfig(**(base | kw))


def unet_sd1(**kw) -> UNetConfig:
    """Stable Diffusion v1.x: 860M parameters, CLIP ViT-L/14 context (768), 8 heads everywhere."""
    base = dict(
        in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_levels=(0, 1, 2), num_heads=8, context_dim=768,
    )  # fmt: skip
    return UNetConfig(**(base | kw))


def unet_sd2(**kw) -> UNetConfig:
    """Stable Diffusion v2.x: OpenCLIP ViT-H context (1024), 64-channel heads (5/10/20/20), linear projections."""
    base = dict(
        in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        attention_levels=(0, 1, 2), head_dim=64, context_dim=1024, use_linear_projection=True,
    )  # fmt: skip
    return UNetConfig(**(base | kw))


UNET_PRESETS: dict[str, Callable[..., UNetConfig]] = {
    "tiny": unet_tiny,
    "small": unet_small,
    "sd1": unet_sd1,
    "sd2": unet_sd2,
}


# ---------------------------------------------------------------------------------------------
# Blocks


def _res_block(cfg: UNetConfig, in_ch: int, out_ch: int) -> ResBlock:
    emb = cfg.time_embed_dim if cfg.use_time_modulation else None
    return ResBlock(in_ch, out_ch, emb, cfg.emb_mode, cfg.dropout, cfg.norm_groups, cfg.norm_eps)


def _transformer(cfg: UNetConfig, channels: int, level: int) -> SpatialTransformer:
    heads = cfg.heads_at(level)
    return SpatialTransformer(
        channels, heads, channels // heads, cfg.transformer_depth, cfg.context_dim, cfg.use_linear_projection,
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


# ---------------------------------------------------------------------------------------------
# The U-Net


class UNet(nn.Module):
    """ε/v/x0-predicting U-Net: `unet(x, t, context=None, ...) -> Tensor` shaped like x (out_channels)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        widths = cfg.widths
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.concat_channels, widths[0], 3, padding=1)
        # Sinusoidal features of t (width model_channels) → MLP → (B, 4·model_channels).
        self.time_embedding = TimestepEmbedding(widths[0], cfg.time_embed_dim) if cfg.use_time_modulation else None
        # One extra row, index num_classes, is the "no label" class that classifier-free guidance
        # trains by dropping labels (Ho & Salimans, 2022).
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.time_embed_dim) if cfg.num_classes else None
        # A global vector condition (e.g. the pooled caption embedding, as Imagen and SDXL add to the
        # time embedding) reaches every ResBlock through the same modulation path as t.
        self.vector_embedding = TimestepEmbedding(cfg.vector_dim, cfg.time_embed_dim) if cfg.vector_dim else None

        # Encoder; `skips` records (channels, downsample factor) of every tensor the decoder will take.
        skips = [(widths[0], 1)]
        self.down_blocks = nn.ModuleList()
        factor = 1
        for i, ch in enumerate(widths):
            self.down_blocks.append(DownBlock(cfg, i, widths[max(i - 1, 0)]))
            skips += [(ch, factor)] * cfg.num_res_blocks
            if i < cfg.num_levels - 1:
                factor *= 2 if cfg.multiscale else 1
                skips.append((ch, factor))
        self._skip_info = tuple(skips)

        self.mid_block = MidBlock(cfg)

        # Decoder: level i consumes the last num_res_blocks + 1 skips still on the stack.
        self.up_blocks = nn.ModuleList()
        stack, in_ch = list(skips), widths[-1]
        for i in reversed(range(cfg.num_levels)):
            taken = [stack.pop()[0] for _ in range(cfg.num_res_blocks + 1)]
            self.up_blocks.append(UpBlock(cfg, i, in_ch, taken if cfg.use_skip_connections else [0] * len(taken)))
            in_ch = widths[i]

        self.conv_norm_out = group_norm(widths[0], cfg.norm_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)
        init_weights(self, cfg.zero_init)
        # A training-time memory/compute trade, not architecture: neither in the config nor in the state dict.
        self.gradient_checkpointing = False

    def set_gradient_checkpointing(self, enabled: bool = True) -> UNet:
        """Recompute each down/mid/up block's activations in the backward pass instead of keeping them
        (`torch.utils.checkpoint`, non-reentrant; Chen et al., 2016): activation memory falls to roughly the
        block inputs at the cost of a second forward pass. Only in training mode with autograd on; the loss
        and gradients are those of the plain forward."""
        self.gradient_checkpointing = enabled
        return self

    def _block(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ---- structure other modules (ControlNet, adapters) build on

    def skip_channels(self) -> list[tuple[int, int]]:
        """(channels, downsample factor) of each skip tensor, in the order `down_residuals` takes them:
        conv_in's output, then per level each ResBlock(+transformer) output and the downsampled output."""
        return list(self._skip_info)

    def level_channels(self) -> list[tuple[int, int]]:
        """(channels, downsample factor) of each encoder level, in the order `adapter_residuals` takes them."""
        return [(ch, 2**i if self.config.multiscale else 1) for i, ch in enumerate(self.config.widths)]

    def encoder_modules(self) -> dict[str, nn.Module]:
        """The encoder half (what a ControlNet deep-copies): conv_in, embeddings, down_blocks, mid_block."""
        parts = {"conv_in": self.conv_in, "time_embedding": self.time_embedding}
        parts |= {"class_embedding": self.class_embedding, "vector_embedding": self.vector_embedding}
        parts |= {"down_blocks": self.down_blocks, "mid_block": self.mid_block}
        return {k: m for k, m in parts.items() if m is not None}

    # ---- forward

    def embed(
        self, t: torch.Tensor | float, class_labels: torch.Tensor | None, x: torch.Tensor, vector: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The embedding every ResBlock receives: MLP(sinusoids(t)) + label embedding + MLP(vector). (B, 4·C0) or None."""
        if self.time_embedding is None:
            return None  # time-agnostic ablation
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or t.shape == (1,):
            t = t.reshape(1).expand(b)  # (B,)
        elif t.shape != (b,):
            raise LdmkitError(f"timestep t has shape {tuple(t.shape)}; expected a scalar or ({b},) for a batch of {b}")
        c = self.config
        feats = timestep_embedding(t, c.model_channels, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
        emb = self.time_embedding(feats.to(x.dtype))  # (B, 4·C0)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels)  # (B, 4·C0)
        if self.vector_embedding is not None:
            emb = emb + self.vector_embedding(vector.to(emb.dtype))  # (B, 4·C0)
        return emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
        adapter_residuals: Sequence[torch.Tensor] | None = None,
        vector: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, H, W) noisy latent; vector (B, vector_dim) global condition; t scalar or (B,) timesteps (int or float);
        context (B, M, context_dim) tokens for cross-attention, context_mask (B, M) bool, True = attend;
        class_labels (B,) long in [0, num_classes] (num_classes = null); concat (B, concat_channels, H, W);
        down_residuals one tensor per skip (see `skip_channels`), mid_residual like the middle output
        (ControlNet); adapter_residuals one tensor per encoder level (see `level_channels`), added to the
        output of the level's last ResBlock(+transformer) before it is stored as a skip and downsampled
        (T2I-Adapter, Mou et al., 2023; = diffusers' `down_intrablock_additional_residuals` when every level
        but the last has attention, as in SD 1.x/2.x; see ldmkit.control). Returns (B, out_channels, H, W)."""
        self._check_inputs(x, context, context_mask, class_labels, concat, down_residuals, mid_residual)
        self._check_adapter_residuals(x, adapter_residuals)
        self._check_vector(x, vector)
        emb = self.embed(t, class_labels, x, vector)  # (B, 4·C0) or None
        if context_mask is not None and bool(context_mask.all()):
            context_mask = None  # nothing masked: checked once here, not in every attention layer
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, C_in + C_cat, H, W)
        h = self.conv_in(x)  # (B, C0, H, W)

        skips = [h]
        for i, block in enumerate(self.down_blocks):
            r = None if adapter_residuals is None else adapter_residuals[i]  # (B, C_i, H/2^i, W/2^i)
            h, block_skips = self._block(block, h, emb, context, context_mask, r)  # (B, C_i, H/2^(i+1), W/2^(i+1))
            skips += block_skips
        if down_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_residuals)]  # ControlNet: one residual per skip

        h = self._block(self.mid_block, h, emb, context, context_mask)  # (B, C_last, H/f, W/f)
        if mid_residual is not None:
            h = h + mid_residual  # (B, C_last, H/f, W/f)

        n, use_skips = self.config.num_res_blocks + 1, self.config.use_skip_connections
        for block in self.up_blocks:
            level_skips, skips = skips[-n:], skips[:-n]  # the last n skips on the stack belong to this level
            level_skips = level_skips if use_skips else None  # no-skip ablation: only the bottleneck goes up
            h = self._block(block, h, level_skips, emb, context, context_mask)  # (B, C_i, H/2^i, W/2^i)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)

    def _check_vector(self, x: torch.Tensor, vector: torch.Tensor | None) -> None:
        c = self.config
        if vector is not None and not c.vector_dim:
            raise LdmkitError("got a vector condition, but this U-Net has no vector route (vector_dim is 0)")
        if vector is None and c.vector_dim:
            raise LdmkitError(f"this U-Net takes a ({x.shape[0]}, {c.vector_dim}) vector condition; pass vector")
        if vector is not None and tuple(vector.shape) != (x.shape[0], c.vector_dim):
            raise LdmkitError(f"vector must be ({x.shape[0]}, {c.vector_dim}), got {tuple(vector.shape)}")

    def _check_inputs(self, x, context, context_mask, class_labels, concat, down_residuals, mid_residual) -> None:
        """Turn a condition the model has no route for into one clear LdmkitError."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise LdmkitError(f"U-Net input must be (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, hgt, wid = x.shape
        m = c.size_multiple
        if hgt % m or wid % m:
            raise LdmkitError(
                f"latent size {hgt}x{wid} does not work with {c.num_levels} U-Net levels: height and width "
                f"must be multiples of {m} (e.g. {m * max(1, hgt // m)}x{m * max(1, wid // m)})"
            )
        # cross-attention route
        if context is not None and c.context_dim is None:
            raise LdmkitError("got context, but this U-Net has no cross-attention route (context_dim is None)")
        if context is None and c.context_dim is not None:
            raise LdmkitError(f"this U-Net cross-attends to context (B, M, {c.context_dim}); pass context")
        if context is not None and (context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.context_dim):
            raise LdmkitError(f"context must be ({b}, M, {c.context_dim}), got {tuple(context.shape)}")
        if context_mask is not None and (context is None or tuple(context_mask.shape) != tuple(context.shape[:2])):
            raise LdmkitError("context_mask must be (B, M) for a context of (B, M, D)")
        # label route
        if class_labels is not None and not c.num_classes:
            raise LdmkitError("got class_labels, but this U-Net has no label route (num_classes is 0)")
        if class_labels is None and c.num_classes:
            raise LdmkitError(
                f"this U-Net is class-conditional (num_classes={c.num_classes}); pass class_labels "
                f"(label {c.num_classes} is the null class for unconditional/guided sampling)"
            )
        if class_labels is not None and tuple(class_labels.shape) != (b,):
            raise LdmkitError(f"class_labels must be ({b},), got {tuple(class_labels.shape)}")
        # concatenation route
        if concat is not None and not c.concat_channels:
            raise LdmkitError("got concat, but this U-Net has no concatenation route (concat_channels is 0)")
        if concat is None and c.concat_channels:
            raise LdmkitError(f"this U-Net takes a spatial condition of {c.concat_channels} channels; pass concat")
        if concat is not None and tuple(concat.shape) != (b, c.concat_channels, hgt, wid):
            raise LdmkitError(f"concat must be ({b}, {c.concat_channels}, {hgt}, {wid}), got {tuple(concat.shape)}")
        # ControlNet / adapter route
        if down_residuals is not None:
            if not c.use_skip_connections:
                raise LdmkitError("got down_residuals, but this U-Net has no skip connections to add them to")
            if len(down_residuals) != len(self._skip_info):
                n = len(self._skip_info)
                raise LdmkitError(f"down_residuals needs {n} tensors (one per skip), got {len(down_residuals)}")
            for k, (r, (ch, f)) in enumerate(zip(down_residuals, self._skip_info)):
                want = (b, ch, hgt // f, wid // f)
                if tuple(r.shape) != want:
                    raise LdmkitError(f"down_residuals[{k}] must be {want}, got {tuple(r.shape)}")
        if mid_residual is not None:
            f = self._skip_info[-1][1]
            want = (b, c.widths[-1], hgt // f, wid // f)
            if tuple(mid_residual.shape) != want:
                raise LdmkitError(f"mid_residual must be {want}, got {tuple(mid_residual.shape)}")

    def _check_adapter_residuals(self, x: torch.Tensor, adapter_residuals) -> None:
        if adapter_residuals is None:
            return
        levels = self.level_channels()
        if len(adapter_residuals) != len(levels):
            raise LdmkitError(
                f"adapter_residuals needs {len(levels)} tensors (one per encoder level), got {len(adapter_residuals)}"
            )
        b, _, hgt, wid = x.shape
        for i, (r, (ch, f)) in enumerate(zip(adapter_residuals, levels)):
            want = (b, ch, hgt // f, wid // f)
            if tuple(r.shape) != want:
                raise LdmkitError(f"adapter_residuals[{i}] must be {want}, got {tuple(r.shape)}")


def init_weights(unet: UNet, zero_init: bool) -> None:
    """All of the U-Net's weight initialisation (STYLE.md #10).

    Everything keeps PyTorch's defaults, as Stable Diffusion / diffusers do: Kaiming-uniform convs
    and linears with uniform biases, N(0, 1) label embeddings, GroupNorm/LayerNorm at (1, 0).

    With `zero_init`, the last layer of every residual branch and the output conv start at zero
    (guided-diffusion's / CompVis' `zero_module`; "Fixup"-style, Zhang et al. 2019): each ResBlock
    and transformer starts as the identity and the untrained network predicts 0, a calm start for
    ε-prediction. Gradients still reach every parameter after the first update.
    """
    if not zero_init:
        return
    zero: list[nn.Module] = [unet.conv_out]
    for m in unet.modules():
        if isinstance(m, ResBlock):
            zero.append(m.conv2)  # (C_out, C_out, 3, 3) last conv of the residual branch
        elif isinstance(m, SpatialTransformer):
            zero.append(m.proj_out)  # the transformer's output projection
    for m in zero:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
