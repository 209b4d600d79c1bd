"""A tiny autoencoder: TAESD (Bohan Ollin Boer Bohan, 2023, github.com/madebyollin/taesd), diffusers'
`AutoencoderTiny`, for decoding a diffusion model's latents in a fraction of the full decoder's time.

No normalisation, no attention, no posterior: plain 3x3 convolutions with ReLU in residual blocks,
nearest-neighbour upsampling and stride-2 convolutions. It is trained to reproduce a full first stage
(distillation: `ldmkit distill-decoder`, or madebyollin's TAESD for SD / SDXL), so its images are a
little softer than the full decoder's, at a few percent of its compute.

    decoder:  z → tanh(z/3)·3 (a soft clamp: latents beyond ±3 cannot blow up the convolutions)
                → conv 3x3 → ReLU → per level [blocks, ×2 nearest (not at the last), conv 3x3] → x·2 − 1
    encoder:  x ∈ [-1, 1] → (x+1)/2 → per level [conv 3x3 (stride 2 after the first), blocks] → conv 3x3
    block:    ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x)

Latents. TAESD for SD/SDXL works in the *scaled* latent space, the one the diffusion model samples in:
diffusers gives its `AutoencoderTiny` scaling_factor 1.0, so `pipe.vae = AutoencoderTiny(...)` decodes
`vae.decode(latents / 1.0)`, SD's z' = 0.18215·z itself. diffusers' pipelines always decode
`vae.decode(z' / scaling_factor + shift_factor)`; this module keeps the same two numbers with ldmkit's
meaning (`AutoencoderKL.normalize`: z' = (z − shift)·scale), so `decode_latents(z')` is what the pipeline
decodes for any tiny autoencoder: TAESD for SD (1, 0), a TAESD3-style one with the full VAE's own scale
and shift, and `ldmkit distill-decoder`'s, trained on z' directly (1, 0).

`latent_magnitude` / `latent_shift` are TAESD's 8-bit latent packing (diffusers' `scale_latents`):
raw latents → [0, 1] by z/(2·magnitude) + shift, clamped; `unscale_latents` goes back.

Module names are ldmkit's own; `ldmkit.interop.diffusers_tiny` maps them to diffusers' flat
`encoder.layers.N` / `decoder.layers.N` keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ldmkit.autoencoder.model import PointPosterior
from ldmkit.errors import LdmkitError

CLAMP = 3.0  # TAESD's soft clamp tanh(z/3)·3 on the decoder's input


class TinyAutoencoderConfig(BaseModel):
    """Architecture of a tiny autoencoder; f = 2^(levels − 1). The defaults are TAESD's (SD, SDXL)."""

    model_config = ConfigDict(extra="forbid")

    in_channels: int = Field(3, ge=1, description="image channels")
    latent_channels: int = Field(4, ge=1, description="channels of z")
    decoder_channels: tuple[int, ...] = Field((64, 64, 64, 64), description="width per decoder level (lowest first)")
    decoder_blocks: tuple[int, ...] = Field((3, 3, 3, 1), description="residual blocks per decoder level")
    encoder: bool = Field(True, description="has an encoder (a distilled decoder alone has none)")
    encoder_channels: tuple[int, ...] = Field((64, 64, 64, 64), description="width per encoder level (full size first)")
    encoder_blocks: tuple[int, ...] = Field((1, 3, 3, 3), description="residual blocks per encoder level")
    latent_magnitude: float = Field(3.0, gt=0, description="8-bit packing: z → z/(2·magnitude) + shift in [0, 1]")
    latent_shift: float = Field(0.5, description="8-bit packing: the centre of [0, 1]")
    # The diffusion model's latents z' and this model's z: z' = (z − shift_factor)·scaling_factor, as
    # AutoencoderConfig; (1, 0) when it works in the diffusion model's space itself (TAESD for SD/SDXL).
    scaling_factor: float = Field(1.0, gt=0)
    shift_factor: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> "TinyAutoencoderConfig":
        if not self.decoder_channels or len(self.decoder_channels) != len(self.decoder_blocks):
            raise ValueError("decoder_channels and decoder_blocks must be non-empty and of the same length")
        if self.encoder and len(self.encoder_channels) != len(self.encoder_blocks):
            raise ValueError("encoder_channels and encoder_blocks must be of the same length")
        if self.encoder and len(self.encoder_channels) != len(self.decoder_channels):
            raise ValueError("the encoder and the decoder must have as many levels (the same factor f)")
        if any(c < 1 for c in self.decoder_channels + self.encoder_channels) or \
                any(n < 0 for n in self.decoder_blocks + self.encoder_blocks):
            raise ValueError("channels must be positive and block counts non-negative")
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.decoder_channels) - 1)


class TinyBlock(nn.Module):
    """ReLU(conv3(ReLU(conv2(ReLU(conv1(x))))) + skip(x)); skip a bias-free 1x1 conv when widths differ."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv3 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return F.relu(self.conv3(h) + self.skip(x))  # (B, out_ch, H, W)


class _EncoderLevel(nn.Module):
    """A conv into the level (stride 2 and no bias below full size, as TAESD), then its blocks."""

    def __init__(self, in_ch: int, ch: int, n: int, down: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, ch, 3, padding=1, stride=2 if down else 1, bias=not down)
        self.blocks = nn.ModuleList(TinyBlock(ch, ch) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        for block in self.blocks:
            x = block(x)
        return x


class _DecoderLevel(nn.Module):
    """Blocks, ×2 nearest upsampling (not at the last level), then a conv out of the level (bias only at the last)."""

    def __init__(self, ch: int, out_ch: int, n: int, up: bool):
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(ch, ch) for _ in range(n))
        self.up = up
        self.conv = nn.Conv2d(ch, out_ch, 3, padding=1, bias=not up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, ch, 2H, 2W)
        return self.conv(x)


class TinyEncoder(nn.Module):
    """x (B, 3, H, W) in [-1, 1] → z (B, c, H/f, W/f)."""

    def __init__(self, cfg: TinyAutoencoderConfig):
        super().__init__()
        w = cfg.encoder_channels
        self.levels = nn.ModuleList(
            _EncoderLevel(cfg.in_channels if i == 0 else w[i - 1], ch, n, down=i > 0)
            for i, (ch, n) in enumerate(zip(w, cfg.encoder_blocks))
        )
        self.conv_out = nn.Conv2d(w[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.add(1).div(2)  # TAESD's images are in [0, 1]
        for level in self.levels:
            h = level(h)  # (B, w_i, H/2^i, W/2^i)
        return self.conv_out(h)  # (B, c, H/f, W/f)


class TinyDecoder(nn.Module):
    """z (B, c, h, w) → image (B, 3, h·f, w·f) in roughly [-1, 1]."""

    def __init__(self, cfg: TinyAutoencoderConfig):
        super().__init__()
        w, last = cfg.decoder_channels, len(cfg.decoder_channels) - 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, w[0], 3, padding=1)
        self.levels = nn.ModuleList(
            _DecoderLevel(ch, cfg.in_channels if i == last else w[i + 1], n, up=i < last)
            for i, (ch, n) in enumerate(zip(w, cfg.decoder_blocks))
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(z / CLAMP) * CLAMP  # soft clamp to (−3, 3)
        h = F.relu(self.conv_in(h))  # (B, w0, h, w)
        for level in self.levels:
            h = level(h)  # doubling the resolution except at the last level
        return h.mul(2).sub(1)  # (B, 3, h·f, w·f): TAESD's [0, 1] → [-1, 1]


class TinyAutoencoder(nn.Module):
    """encode(x) → a point posterior (`.mean` the latent); decode(z) → image in (roughly) [-1, 1];
    encode_latents / decode_latents in the diffusion model's normalised space (module docstring)."""

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = TinyEncoder(config) if config.encoder else None
        self.decoder = TinyDecoder(config)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, x: torch.Tensor) -> PointPosterior:
        if self.encoder is None:
            raise LdmkitError("this tiny autoencoder is a decoder alone (distilled by `ldmkit distill-decoder`); "
                              "encode with the full autoencoder")
        f, c = self.downsample_factor, self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c or x.shape[-1] % f or x.shape[-2] % f:
            raise LdmkitError(f"the tiny autoencoder expects images (B, {c}, H, W) with H and W multiples of {f}, "
                              f"got {tuple(x.shape)}")
        return PointPosterior(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        c = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise LdmkitError(f"the tiny decoder expects latents (B, {c}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).mean)

    # --- the diffusion model's latents z' = (z − shift)·scale (as AutoencoderKL) ---
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.encode(x).mean)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z' (the diffusion model's latents) → images: diffusers' `vae.decode(z' / scaling_factor + shift_factor)`."""
        return self.decode(self.denormalize(z))

    # --- TAESD's 8-bit latent packing ---
    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents → [0, 1]: z/(2·magnitude) + shift, clamped (× 255 and rounded, they store as bytes)."""
        return z.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, u: torch.Tensor) -> torch.Tensor:
        """[0, 1] → raw latents, the inverse of `scale_latents` inside the clamp."""
        return u.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)
