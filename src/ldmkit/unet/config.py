"""`UNetConfig`: the denoiser's architecture as one typed, validated object, and named presets."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing import Literal

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
    transformer_depth: int | tuple[int, ...] = Field(
        1, description="transformer blocks per spatial transformer, one for all levels or one per level (SDXL: "
        "1, 2, 10); the decoder level uses its encoder level's, the middle block the last level's")
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
        0, ge=0, description="a (B, vector_dim) condition (pooled text, scalars; SDXL: pooled text + six Fourier-embedded "
        "size/crop values, 1280 + 6·256) through an MLP (add_embedding) into the time embedding"
    )
    time_cond_proj_dim: int | None = Field(
        None, ge=2, description="a guidance-distilled student's w-embedding width: the guidance scale, embedded "
        "(LCM's w-embedding), projected and added to the time features (diffusers' time_cond_proj_dim); None = none")
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
        depths = self.transformer_depth if isinstance(self.transformer_depth, tuple) else (self.transformer_depth,)
        if isinstance(self.transformer_depth, tuple) and len(depths) != levels:
            raise ValueError(f"transformer_depth has {len(depths)} entries for {levels} levels")
        if any(d < 1 for d in depths):
            raise ValueError(f"transformer_depth must be ≥ 1 (a level without attention is left out of "
                             f"attention_levels), got {self.transformer_depth}")
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

    def depth_at(self, level: int) -> int:
        """Transformer blocks per spatial transformer at `level` (encoder and decoder; the middle block uses
        the last level's, as diffusers' UNet2DConditionModel and SGM's SDXL do)."""
        d = self.transformer_depth
        return d[level] if isinstance(d, tuple) else d

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


def unet_sdxl(**kw) -> UNetConfig:
    """SDXL base (Podell et al., 2023, §2.1): 2.6B parameters, three levels (320, 640, 1280), no attention at
    the first, transformer depth 1 / 2 / 10 (10 in the middle), 64-channel heads, linear projections, context
    of CLIP ViT-L + OpenCLIP bigG (768 + 1280 = 2048), and the vector route of the pooled bigG embedding (1280)
    plus six Fourier-embedded size/crop values (6·256)."""
    base = dict(
        in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
        attention_levels=(1, 2), head_dim=64, transformer_depth=(1, 2, 10), context_dim=2048,
        use_linear_projection=True, vector_dim=1280 + 6 * 256,
    )  # fmt: skip
    return UNetConfig(**(base | kw))


UNET_PRESETS: dict[str, Callable[..., UNetConfig]] = {
    "tiny": unet_tiny,
    "small": unet_small,
    "sd1": unet_sd1,
    "sd2": unet_sd2,
    "sdxl": unet_sdxl,
}
