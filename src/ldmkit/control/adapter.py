"""T2I-Adapter (Mou et al., 2023): a light network run once per image rather than once per denoising step.

    control image ─pixel-unshuffle by f─> conv_in ─> [ResBlocks] ─> [avg-pool, 1x1, ResBlocks] ─> …
                                                          │                    │
                                                   feature level 0      feature level 1 …  = adapter_residuals

Each feature has its U-Net level's channels and resolution and is added to the U-Net's encoder at
the end of that level, after its last ResBlock(+transformer) and before the skip is stored and the
resolution halved (`Cond.adapter_residuals`), as in the T2I-Adapter reference code. diffusers does the
same at levels with attention but adds after the downsample at levels without (DownBlock2D), so the two
agree exactly when every level but the last has attention (SD 1.x/2.x, where T2I-Adapters exist);
ldmkit keeps one rule, independent of where attention is. The blocks have no normalisation and no time
input (T2I-Adapter's design: the features do not depend on t). Module names are diffusers' `T2IAdapter`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ldmkit.control.control_image import prepare_control_image
from ldmkit.errors import LdmkitError
from ldmkit.unet import UNet


def _is_power_of_two(f: int) -> bool:
    return f >= 1 and f & (f - 1) == 0


class AdapterConfig(BaseModel):
    """A T2I-Adapter: one feature map per U-Net level, widths `channels` (the U-Net's level widths)."""

    model_config = ConfigDict(extra="forbid")

    channels: tuple[int, ...] = Field(description="feature width per U-Net level (UNet.level_channels)")
    multiscale: bool = Field(True, description="levels halve the resolution (the U-Net's `multiscale`)")
    hint_channels: int = Field(3, ge=1, description="channels of the control image: 3 = RGB map, 1 = mask/edges")
    latent_factor: int = Field(8, ge=1, description="pixel-unshuffle factor = the autoencoder's f")
    num_res_blocks: int = Field(2, ge=1, description="ResBlocks per level (T2I-Adapter: 2)")
    zero_init: bool = Field(
        True, description="every feature is exactly 0 at init (a no-op on the U-Net); T2I-Adapter itself: False"
    )
    conditioning_scale: float = Field(1.0, description="feature multiplier when forward() is given no scale")

    @model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError("channels must be a non-empty list of positive integers (one per U-Net level)")
        if not _is_power_of_two(self.latent_factor):
            raise ValueError(f"latent_factor must be a power of two (the autoencoder's f), got {self.latent_factor}")
        return self


class AdapterResBlock(nn.Module):
    """x + conv1x1(ReLU(conv3x3(x))): T2I-Adapter's residual block, no normalisation, no time input."""

    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))  # (B, C, H, W)


class AdapterBlock(nn.Module):
    """One level: [2x2 average pool] → [1x1 conv where the width changes] → ResBlocks."""

    def __init__(self, in_ch: int, out_ch: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.resnets = nn.Sequential(*(AdapterResBlock(out_ch) for _ in range(num_res_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2)  # (B, C_in, H/2, W/2)
        if self.in_conv is not None:
            x = self.in_conv(x)  # (B, C_out, ·, ·)
        return self.resnets(x)  # (B, C_out, ·, ·)


class Adapter(nn.Module):
    """`adapter(control_image) -> adapter_residuals`, one (B, C_i, H/2^i, W/2^i) feature per U-Net level."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.channels
        self.unshuffle = nn.PixelUnshuffle(cfg.latent_factor)
        self.conv_in = nn.Conv2d(cfg.hint_channels * cfg.latent_factor**2, ch[0], 3, padding=1)
        self.body = nn.ModuleList(
            AdapterBlock(ch[max(i - 1, 0)], ch[i], cfg.num_res_blocks, down=i > 0 and cfg.multiscale)
            for i in range(len(ch))
        )
        init_weights(self)

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 3, latent_factor: int = 8, **kw) -> Adapter:
        """An adapter shaped for `unet`'s levels (same device and dtype); `kw` are other AdapterConfig fields."""
        cfg = AdapterConfig(
            channels=tuple(c for c, _ in unet.level_channels()), multiscale=unet.config.multiscale,
            hint_channels=hint_channels, latent_factor=latent_factor, **kw,
        )  # fmt: skip
        p = next(unet.parameters())
        return cls(cfg).to(device=p.device, dtype=p.dtype)

    @property
    def size_multiple(self) -> int:
        """Control-image height and width must be multiples of this (unless `x` is given to resize)."""
        return self.config.latent_factor * (2 ** (len(self.config.channels) - 1) if self.config.multiscale else 1)

    def forward(
        self, control_image: torch.Tensor, x: torch.Tensor | None = None, scale: float | None = None
    ) -> list[torch.Tensor]:
        """control_image (B, hint_channels, f·H, f·W) in [0, 1]. `x`, the latent batch the features are for
        (only its shape, dtype and device are read), makes the image go through `prepare_control_image`
        (batch of 1 repeated, resized, converted) exactly as for ControlNet; without it the image must
        already be a multiple of `size_multiple` (channels are still converted). scale multiplies every
        feature (None = config.conditioning_scale). The features do not depend on t: compute them once
        per image and pass them at every denoising step (Cond.adapter_residuals)."""
        cfg = self.config
        if x is not None:
            if x.ndim != 4:
                raise LdmkitError(f"adapter: x must be a latent batch (B, C, H, W), got {tuple(x.shape)}")
            b, _, hgt, wid = x.shape
            f = cfg.latent_factor
            image = prepare_control_image(control_image, cfg.hint_channels, (f * hgt, f * wid), b, x, "adapter")
        else:
            image = prepare_control_image(control_image, cfg.hint_channels, None, None, self.conv_in.weight, "adapter")
            m = self.size_multiple
            if image.shape[2] % m or image.shape[3] % m:
                raise LdmkitError(
                    f"adapter control image is {image.shape[2]}x{image.shape[3]}: height and width must be multiples "
                    f"of {m} (f={cfg.latent_factor} times the U-Net's size multiple), or pass x to resize it"
                )
        h = self.conv_in(self.unshuffle(image))  # (B, C_0, H, W): f×f pixel blocks become channels
        features = []
        for block in self.body:
            h = block(h)  # (B, C_i, H/2^i, W/2^i)
            features.append(h)
        s = cfg.conditioning_scale if scale is None else scale
        return [feat * s for feat in features]


def init_weights(net: Adapter) -> None:
    """All of the adapter's weight initialisation.

    PyTorch's defaults, as T2I-Adapter (Mou et al., 2023). With `zero_init` (ldmkit's default, for the
    same safe start as ControlNet's zero convolutions), conv_in and the last conv of every residual
    branch start at 0 and every 1x1 width change has bias 0: conv_in's output is 0, each ResBlock is the
    identity, the pools and 1x1 convs map 0 to 0, so every feature is exactly 0. No extra parameters are
    added (the weights stay exportable to diffusers' T2IAdapter). Gradients reach conv_in (through the
    identity paths) and block2 (its input is ReLU(bias) ≠ 0) in the first step, and everything after that.
    """
    if not net.config.zero_init:
        return
    zero: list[nn.Module] = [net.conv_in]
    for block in net.body:
        zero += [r.block2 for r in block.resnets]
        if block.in_conv is not None:
            nn.init.zeros_(block.in_conv.bias)
    for m in zero:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
