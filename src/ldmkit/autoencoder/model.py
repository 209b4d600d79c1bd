"""The first stage: a convolutional autoencoder that maps images to a latent 2^k times smaller per side.

`AutoencoderKL` is the KL-regularised autoencoder of Rombach et al. (2022, §3 and App. G): a
ResNet encoder/decoder with one self-attention layer in the middle, whose encoder outputs the mean
and log-variance of a diagonal Gaussian q(z|x). A small KL term toward N(0, I) keeps the latent
space smooth and roughly unit-scaled; the decoder maps a latent back to an image in [-1, 1].
With `variational=False` the same network is a plain deterministic autoencoder (no KL, no
sampling) so the two can be compared on equal terms.

Module names follow diffusers' `AutoencoderKL` (encoder.down_blocks.i.resnets.j, quant_conv, ...)
so Stable Diffusion weights map one-to-one.

Memory savers (none changes a parameter name or the default behaviour): tiled and sliced
encode/decode (`AutoencoderKL.enable_tiling`, `enable_slicing`), and gradient checkpointing of each
encoder/decoder level and the mid blocks (`AutoencoderKL.gradient_checkpointing = True`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmkit.autoencoder.tiling import Tiling, check_tiling, tiled_apply
from ldmkit.errors import LdmkitError
from ldmkit.layers import Downsample, ResBlock, SpatialSelfAttention, Upsample, group_norm


class AutoencoderConfig(BaseModel):
    """Architecture of the first stage. The downsampling factor is f = 2^(len(channel_mult) - 1)."""

    model_config = ConfigDict(extra="forbid")

    in_channels: int = Field(3, ge=1, description="image channels")
    latent_channels: int = Field(4, ge=1, description="channels of z")
    base_channels: int = Field(64, ge=1, description="width of the first level (SD: 128)")
    channel_mult: tuple[int, ...] = Field((1, 2, 2), description="width multiplier per level; f = 2^(levels-1)")
    num_res_blocks: int = Field(1, ge=1, description="ResBlocks per encoder level (decoder uses one more)")
    mid_attention: bool = Field(True, description="self-attention in the middle block")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups (reduced to a divisor for tiny widths)")
    variational: bool = Field(True, description="KL autoencoder (True) or plain deterministic AE (False)")
    use_quant_conv: bool = Field(True, description="1x1 convs around the latent, as in SD")
    bicubic_shortcut: bool = Field(
        False, description="residual over bicubic: the latent's first channels add the image shrunk by f, the "
        "decoder adds them blown up by f, so the codec starts as bicubic down/up and learns what it loses "
        "(the space-to-channel shortcuts of DC-AE, Chen et al. 2024); not in SD or diffusers")
    # Latent normalisation z' = (z - shift) * scale, measured on the training set after training
    # (Rombach et al. 2022, §4.3.2 "rescale the latent ... by the component-wise std"); SD v1 uses
    # scale 0.18215 and shift 0.
    scaling_factor: float = Field(1.0, gt=0)
    shift_factor: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> "AutoencoderConfig":
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError("channel_mult must be a non-empty list of positive integers")
        return self

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def widths(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))). Log-variance clamped as in the LDM code for stability."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps  # reparameterisation trick (Kingma & Welling, 2014)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: ½ Σ (μ² + σ² − 1 − log σ²)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(1)


class PointPosterior(DiagonalGaussian):
    """The plain autoencoder's "posterior": a point mass at the encoder output. No sampling, no KL."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean
        self.logvar = torch.full_like(mean, float("-inf"))
        self.std = torch.zeros_like(mean)
        self.var = torch.zeros_like(mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])


def _maybe_checkpoint(module: nn.Module, x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """module(x), recomputed in the backward pass instead of storing its activations when `enabled`
    (Chen et al., 2016, "Training Deep Nets with Sublinear Memory Cost"). Only while training with
    autograd on; the non-reentrant variant also works when `x` itself needs no gradient."""
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class _Level(nn.Module):
    """One resolution level: ResBlocks, then an optional resolution change."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, resample: nn.Module | None, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, groups=groups, eps=1e-6) for i in range(n)
        )
        # diffusers' names: `downsamplers.0` in the encoder, `upsamplers.0` in the decoder.
        self._resample_name = "upsamplers" if up else "downsamplers"
        if resample is not None:
            setattr(self, self._resample_name, nn.ModuleList([resample]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        resample = getattr(self, self._resample_name, None)
        return x if resample is None else resample[0](x)


class _MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, groups=groups, eps=1e-6), ResBlock(ch, ch, groups=groups, eps=1e-6)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, groups, eps=1e-6)]) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (B, 3, H, W) → moments (B, 2·z_ch or z_ch, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        w, g = cfg.widths, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, w[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = w[0]
        for i, ch in enumerate(w):
            last = i == len(w) - 1
            self.down_blocks.append(
                _Level(prev, ch, cfg.num_res_blocks, g, None if last else Downsample(ch, asymmetric=True), up=False)
            )
            prev = ch
        self.mid_block = _MidBlock(w[-1], g, cfg.mid_attention)
        self.conv_norm_out = group_norm(w[-1], g, 1e-6)
        out = 2 * cfg.latent_channels if cfg.variational else cfg.latent_channels
        self.conv_out = nn.Conv2d(w[-1], out, 3, padding=1)
        self.gradient_checkpointing = False  # set through AutoencoderKL.gradient_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = self.conv_in(x)  # (B, w0, H, W)
        for level in self.down_blocks:
            h = _maybe_checkpoint(level, h, ckpt)  # (B, w_i, H/2^i, W/2^i)
        h = _maybe_checkpoint(self.mid_block, h, ckpt)  # (B, w_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2·z_ch, H/f, W/f)


class Decoder(nn.Module):
    """z (B, z_ch, h, w) → image (B, 3, h·f, w·f). One more ResBlock per level than the encoder."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        w, g = list(reversed(cfg.widths)), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, w[0], 3, padding=1)
        self.mid_block = _MidBlock(w[0], g, cfg.mid_attention)
        self.up_blocks = nn.ModuleList()
        prev = w[0]
        for i, ch in enumerate(w):
            last = i == len(w) - 1
            self.up_blocks.append(_Level(prev, ch, cfg.num_res_blocks + 1, g, None if last else Upsample(ch), up=True))
            prev = ch
        self.conv_norm_out = group_norm(w[-1], g, 1e-6)
        self.conv_out = nn.Conv2d(w[-1], cfg.in_channels, 3, padding=1)
        self.gradient_checkpointing = False  # set through AutoencoderKL.gradient_checkpointing

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = _maybe_checkpoint(self.mid_block, self.conv_in(z), ckpt)  # (B, w_last, h, w)
        for level in self.up_blocks:
            h = _maybe_checkpoint(level, h, ckpt)  # (B, w_i, ..., ...) doubling the resolution except at the last level
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, h·f, w·f)


class AutoencoderKL(nn.Module):
    """KL-regularised (or, with `variational=False`, plain) autoencoder.

    encode(x) → posterior with .mean, .std, .sample(generator), .kl()
    decode(z) → image in (roughly) [-1, 1]
    encode_latents / decode_latents apply the stored latent normalisation, for the second stage.

    Memory savers, all off by default (then encode/decode are exactly the plain computation):

    - `enable_slicing(slice_size)`: encode/decode a batch `slice_size` images at a time. Every layer
      acts on each image alone (GroupNorm included), so peak activation memory follows the chunk,
      not the batch, and results equal the whole-batch call up to float rounding (bitwise only where
      the convolution kernel does not depend on the batch size; oneDNN's choice can, e.g. under load).
      Known exceptions (measured): on CPU PyTorch sends a
      batch of one small image (< 20480 elements) to its native convolution, not oneDNN (~1e-6 off);
      cuDNN picks its algorithm by batch size, so on a GPU chunks of one differ by ~1e-5, and with
      TF32 convolutions (PyTorch's default) any chunk size differs by TF32's rounding (~1e-2).
    - `enable_tiling(tile_latent, overlap_latent)`: inputs wider or taller than `tile_latent` latent
      pixels are processed in overlapping tiles (`tiled_encode` / `tiled_decode`), whose outputs are
      cross-faded linearly over the overlap. Activation memory then follows the tile area, not the
      image area (and the mid block's self-attention, quadratic in area, follows the tile). This is
      the tiling of diffusers' `AutoencoderKL.enable_tiling` (there: 64-latent tiles, 25 % overlap),
      and it is an approximation: GroupNorm statistics and the mid attention see one tile, not the
      whole image, and zero padding at tile borders differs from the neighbouring pixels, hence the
      overlap and feathering to hide seams. Tile colours can still drift a little on large images.
    - `gradient_checkpointing = True`: recompute each encoder/decoder level and mid block in the
      backward pass (training only); same gradients, activation memory ~ one level instead of all.

    All three are plain attributes, not parameters: the state_dict and diffusers' key names are unchanged.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * c if config.variational else c
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_quant_conv else None
        if config.bicubic_shortcut:
            self._init_as_bicubic()
        self.tiling: Tiling | None = None  # set by enable_tiling
        self.slice_size: int | None = None  # set by enable_slicing

    # --- memory savers ---
    def enable_tiling(self, tile_latent: int = 64, overlap_latent: int = 16) -> None:
        """Tile encode/decode (and so encode_latents/decode_latents) of inputs larger than `tile_latent`
        latent pixels per side; neighbouring tiles overlap by at least `overlap_latent`. The defaults are
        diffusers' for Stable Diffusion (512-pixel image tiles at f = 8, 25 % overlap)."""
        self.tiling = check_tiling(tile_latent, overlap_latent)

    def disable_tiling(self) -> None:
        self.tiling = None

    def enable_slicing(self, slice_size: int = 1) -> None:
        """Encode/decode batches `slice_size` images at a time (same results, less peak memory)."""
        if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
            raise LdmkitError(f"slice_size must be a positive integer (images per chunk), got {slice_size!r}")
        self.slice_size = slice_size

    def disable_slicing(self) -> None:
        self.slice_size = None

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing and self.decoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = bool(enabled)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def check_input(self, x: torch.Tensor) -> None:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise LdmkitError(
                f"the autoencoder expects images of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-1] % f or x.shape[-2] % f:
            raise LdmkitError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the autoencoder's factor {f}; "
                f"resize or crop images to a multiple of {f}"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x), sliced and/or tiled if `enable_slicing` / `enable_tiling` are on."""
        self.check_input(x)
        if self.slice_size is None or x.shape[0] <= self.slice_size:
            return self._posterior(self._encode_moments(x))
        chunks = [self._encode_moments(xs) for xs in x.split(self.slice_size)]
        return self._posterior(torch.cat(chunks))  # (B, 2c or c, H/f, W/f)

    def tiled_encode(self, x: torch.Tensor, tile_latent: int = 64, overlap_latent: int = 16) -> DiagonalGaussian:
        """encode(x) in overlapping image tiles of tile_latent·f pixels; the moments (mean and
        log-variance) are blended over the overlaps in latent space. Ignores the tiling/slicing switches."""
        self.check_input(x)
        tiling = check_tiling(tile_latent, overlap_latent)
        f = self.downsample_factor
        return self._posterior(tiled_apply(self._encode_tile, x, tiling, in_scale=f, out_scale=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, c, h, w) → image (B, 3, h·f, w·f), sliced and/or tiled if the switches are on."""
        if self.slice_size is None or z.shape[0] <= self.slice_size:
            return self._decode(z)
        return torch.cat([self._decode(zs) for zs in z.split(self.slice_size)])  # (B, 3, H, W)

    def tiled_decode(self, z: torch.Tensor, tile_latent: int = 64, overlap_latent: int = 16) -> torch.Tensor:
        """decode(z) in overlapping latent tiles of side tile_latent, blended in pixel space with linear
        ramps over the overlaps (overlap_latent·f pixels). A tile at least as large as z gives exactly
        decode(z). Ignores the tiling/slicing switches."""
        tiling = check_tiling(tile_latent, overlap_latent)
        return tiled_apply(self._decode_tile, z, tiling, in_scale=1, out_scale=self.downsample_factor)

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiling is None:
            return self._encode_tile(x)
        return tiled_apply(self._encode_tile, x, self.tiling, in_scale=self.downsample_factor, out_scale=1)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)  # (B, 2c or c, H/f, W/f)
        moments = moments if self.quant_conv is None else self.quant_conv(moments)
        if self.config.bicubic_shortcut:  # the mean's first k channels: the image shrunk by f (+ the learned part)
            k = self._shortcut_channels
            small = F.interpolate(x, scale_factor=1 / self.downsample_factor, mode="bicubic", antialias=True)
            moments = torch.cat([moments[:, :k] + small[:, :k].to(moments.dtype), moments[:, k:]], dim=1)
        return moments

    def _posterior(self, moments: torch.Tensor) -> DiagonalGaussian:
        if not self.config.variational:
            return PointPosterior(moments)
        mean, logvar = moments.chunk(2, dim=1)  # (B, c, H/f, W/f) each
        return DiagonalGaussian(mean, logvar)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.tiling is None:
            return self._decode_tile(z)
        return tiled_apply(self._decode_tile, z, self.tiling, in_scale=1, out_scale=self.downsample_factor)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))  # (B, 3, H, W)
        if self.config.bicubic_shortcut:  # + the latent's first k channels blown up by f
            k = self._shortcut_channels
            big = F.interpolate(z[:, :k], scale_factor=self.downsample_factor, mode="bicubic")
            out = torch.cat([out[:, :k] + big.to(out.dtype), out[:, k:]], dim=1)
        return out

    @property
    def _shortcut_channels(self) -> int:
        return min(self.config.in_channels, self.config.latent_channels)

    @torch.no_grad()
    def _init_as_bicubic(self) -> None:
        """Start as exactly bicubic down/up: the learned paths' last layers output zero, and the
        posterior's std starts small (logvar −8) so early samples stay near the mean."""
        for conv in (self.encoder.conv_out, self.decoder.conv_out):
            conv.weight.zero_()
            conv.bias.zero_()
        if self.quant_conv is not None:
            self.quant_conv.bias.zero_()
        if self.config.variational:
            last = self.quant_conv if self.quant_conv is not None else self.encoder.conv_out
            last.bias[self.config.latent_channels:] = -8.0

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Reconstruct x; returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    # --- the second stage's view: normalised latents z' = (z − shift)·scale (Rombach et al. §4.3.2) ---
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents of this autoencoder → the second stage's unit-variance latents: (z − shift)·scale."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`: z'/scale + shift."""
        return z / self.config.scaling_factor + self.config.shift_factor

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True):
        post = self.encode(x)
        return self.normalize(post.sample(generator) if sample else post.mode())

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of encode_latents; goes through decode, so the tiling/slicing switches apply."""
        return self.decode(self.denormalize(z))

    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's output conv weight: the adaptive GAN weight (Esser et al., 2021, eq. 7) is
        computed from gradients with respect to it."""
        return self.decoder.conv_out.weight
