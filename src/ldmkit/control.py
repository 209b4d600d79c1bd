"""Spatial control of a frozen U-Net: ControlNet (Zhang et al., 2023) and T2I-Adapter (Mou et al., 2023).

ControlNet — a trainable copy of the U-Net's encoder that reads the control image:

    control image (B, C_hint, f·H, f·W) ─hint encoder (stride-2 convs, last conv = 0)─┐
    z_t (B, C, H, W) ⊕ concat ─conv_in──────────────────────────────────────────────(+)─> down blocks ─> middle
                                                                    every skip tensor ─┤            │
                                                                        zero 1x1 conv ─┴─> down_residuals
                                                                                  zero 1x1 conv ─┴─> mid_residual

The copy (conv_in, time/label embeddings, down blocks, middle block) starts with the base model's
weights; the "zero convolutions" start at 0, so at initialisation every residual is exactly 0 and
the controlled U-Net is the base model (Zhang et al. §3.1, eq. 2). The frozen U-Net adds the residuals to its skip
connections and middle output (`UNet(..., down_residuals=, mid_residual=)`). Module names are
diffusers' `ControlNetModel`'s (controlnet_cond_embedding.{conv_in, blocks.k, conv_out},
controlnet_down_blocks.k, controlnet_mid_block; the encoder copy named like the U-Net's), so
`ldmkit.interop.diffusers_controlnet` maps weights one-to-one.

T2I-Adapter — a light network run once per image rather than once per denoising step:

    control image ─pixel-unshuffle by f─> conv_in ─> [ResBlocks] ─> [avg-pool, 1x1, ResBlocks] ─> …
                                                          │                    │
                                                   feature level 0      feature level 1 …  = adapter_residuals

Each feature has its U-Net level's channels and resolution and is added to the U-Net's encoder at
the end of that level, after its last ResBlock(+transformer) and before the skip is stored and the
resolution halved (`UNet(..., adapter_residuals=)`), as in the T2I-Adapter reference code. diffusers
does the same at levels with attention but adds after the downsample at levels without
(DownBlock2D), so the two agree exactly when every level but the last has attention (SD 1.x/2.x, where
T2I-Adapters exist); ldmkit keeps one rule, independent of where attention is. The blocks have no
normalisation and no time input (T2I-Adapter's design: the features do not depend on t).

Control images are float tensors in [0, 1] (what diffusers' ControlNet pipelines feed) at pixel
resolution: f times the latent size, f the autoencoder's downsampling factor. `prepare_control_image`
converts what can be converted (batch of 1, gray/RGBA channels, a different size with the same
aspect ratio) and refuses the rest with one LdmkitError naming the shape it expects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ldmkit.errors import LdmkitError
from ldmkit.layers import TimestepEmbedding
from ldmkit.train.checkpoint import register_kind
from ldmkit.unet import DownBlock, MidBlock, UNet, UNetConfig

# diffusers' hint-encoder widths for f = 8 (three stride-2 convs); other f take a prefix / repeat the last.
DEFAULT_HINT_WIDTHS = (16, 32, 96, 256)


def _log2(f: int) -> int | None:
    return f.bit_length() - 1 if f >= 1 and f & (f - 1) == 0 else None


def default_hint_widths(latent_factor: int) -> tuple[int, ...]:
    """log2(f) + 1 widths: one per resolution of the hint encoder, from pixels down to latents."""
    n = (_log2(latent_factor) or 0) + 1
    return (DEFAULT_HINT_WIDTHS + (DEFAULT_HINT_WIDTHS[-1],) * n)[:n]


class ControlNetConfig(BaseModel):
    """A ControlNet for a given base U-Net: the copied encoder's architecture plus the hint encoder."""

    model_config = ConfigDict(extra="forbid")

    unet: UNetConfig = Field(description="the base U-Net; its encoder (conv_in, embeddings, down, middle) is copied")
    hint_channels: int = Field(3, ge=1, description="channels of the control image: 3 = RGB map, 1 = mask/edges")
    latent_factor: int = Field(
        8, ge=1, description="pixels per latent along each side (the autoencoder's f): the hint encoder's stride"
    )
    hint_widths: tuple[int, ...] | None = Field(
        None,
        description="hint-encoder widths, log2(f) + 1 of them (a stride-2 conv between consecutive ones); "
        "None = diffusers' (16, 32, 96, 256) cut to length",
    )
    conditioning_scale: float = Field(1.0, description="residual multiplier when forward() is given no scale")

    @model_validator(mode="after")
    def _check(self) -> ControlNetConfig:
        steps = _log2(self.latent_factor)
        if steps is None:
            raise ValueError(f"latent_factor must be a power of two (the autoencoder's f), got {self.latent_factor}")
        if self.hint_widths is None:
            self.hint_widths = default_hint_widths(self.latent_factor)
        if len(self.hint_widths) != steps + 1 or any(w < 1 for w in self.hint_widths):
            raise ValueError(
                f"hint_widths {self.hint_widths}: latent_factor {self.latent_factor} needs {steps + 1} positive "
                f"widths ({steps} stride-2 convs), e.g. {default_hint_widths(self.latent_factor)}"
            )
        if not self.unet.use_skip_connections:
            raise ValueError("the base U-Net has no skip connections (use_skip_connections=False) to add residuals to")
        return self


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
        if _log2(self.latent_factor) is None:
            raise ValueError(f"latent_factor must be a power of two (the autoencoder's f), got {self.latent_factor}")
        return self


# ---------------------------------------------------------------------------------------------
# Control images: convert what can be converted, refuse the rest in one line

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights, RGB → gray


def _convert_channels(image: torch.Tensor, want: int) -> torch.Tensor | None:
    """RGBA/gray-alpha → drop alpha; gray → RGB by repetition; RGB → gray by BT.601 luma. None = no rule."""
    c = image.shape[1]
    if c == want:
        return image
    if c in (2, 4) and want in (1, 3):
        image, c = image[:, : c - 1], c - 1  # drop the alpha channel
        if c == want:
            return image
    if c == 1 and want == 3:
        return image.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    if c == 3 and want == 1:
        w = torch.tensor(_LUMA, dtype=image.dtype, device=image.device)
        return (image * w[None, :, None, None]).sum(1, keepdim=True)  # (B, 1, H, W)
    return None


def prepare_control_image(
    image: torch.Tensor,
    channels: int,
    size: tuple[int, int] | None,
    batch: int | None,
    like: torch.Tensor | None = None,
    who: str = "ControlNet",
) -> torch.Tensor:
    """Bring a control image to (batch, channels, *size), or raise one LdmkitError naming that shape.

    - (C, H, W) gets a batch axis; a batch of 1 is repeated to `batch`; any other batch is an error.
    - Channels: RGBA → RGB and gray+alpha → gray drop alpha; gray → RGB repeats; RGB → gray is BT.601 luma.
    - Size (pixels, = f × the latent size): a different size with the same aspect ratio (within 1%)
      is resized bilinearly (antialiased when shrinking); a different aspect ratio is refused —
      stretching would misplace the control, so crop or pad it first.
    - The result takes `like`'s dtype and device (the latent it conditions).
    """
    hgt, wid = size if size is not None else ("H", "W")
    want = f"({batch if batch is not None else 'B'}, {channels}, {hgt}, {wid})"
    if not isinstance(image, torch.Tensor):
        got = type(image).__name__
        raise LdmkitError(f"{who} needs a control image tensor {want} with values in [0, 1], got {got}")
    if image.ndim == 3:
        image = image[None]  # (1, C, H, W)
    if image.ndim != 4:
        raise LdmkitError(f"{who} control image must be {want}, got {tuple(image.shape)}")
    if not image.is_floating_point():
        hint = " (divide 8-bit images by 255)" if image.dtype == torch.uint8 else ""
        raise LdmkitError(f"{who} control image must be a float tensor in [0, 1], got {image.dtype}{hint}")
    if like is not None:
        image = image.to(device=like.device)
    if batch is not None and image.shape[0] != batch:
        if image.shape[0] != 1:
            raise LdmkitError(f"{who} control image must be {want} (or a batch of 1), got {tuple(image.shape)}")
        image = image.expand(batch, -1, -1, -1)  # (B, C, H, W) one control for the whole batch
    converted = _convert_channels(image, channels)
    if converted is None:
        accepted = {3: " (RGB; gray and RGBA are converted)", 1: " (gray; RGB and RGBA are converted)"}
        raise LdmkitError(
            f"{who} control image has {image.shape[1]} channels; expected {want}{accepted.get(channels, '')}"
        )
    image = converted
    if size is not None and tuple(image.shape[2:]) != tuple(size):
        h0, w0 = image.shape[2:]
        if abs(h0 * wid - w0 * hgt) > 0.01 * h0 * wid:
            raise LdmkitError(
                f"{who} control image is {h0}x{w0}, expected {want} (f times the latent size); the aspect ratios "
                "differ, so it cannot be resized without distortion: crop or pad it to that aspect first"
            )
        shrink = h0 > hgt or w0 > wid  # antialiased resizing has float32/64 kernels only: resize there
        image = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return image if like is None else image.to(like.dtype)


# ---------------------------------------------------------------------------------------------
# ControlNet


class HintEncoder(nn.Module):
    """Control image → latent-resolution features: conv_in, then per halving a 3x3 conv and a stride-2 3x3
    conv (SiLU after each), then conv_out to the U-Net's first width, zero-initialised. Zhang et al. §3.2
    describe "four convolution layers with 4x4 kernels and 2x2 strides" for f = 8; this is the layout
    of the released models and of diffusers' `ControlNetConditioningEmbedding`, with log2(f) halvings."""

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(image))  # (B, w_0, f·H, f·W)
        for conv in self.blocks:
            h = F.silu(conv(h))  # (B, w_k, ·, ·), halved by every second conv
        return self.conv_out(h)  # (B, C0, H, W)


def _zero_conv(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 1)  # zeroed in init_weights


class ControlNet(nn.Module):
    """`controlnet(x, t, control_image, ...) -> (down_residuals, mid_residual)` for the frozen base U-Net."""

    checkpoint_kind = "controlnet"  # ldmkit checkpoint folders (registered at the end of this module)

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        u = config.unet
        widths = u.widths
        # The encoder copy, built and named exactly as in `UNet` (from_unet loads it strictly).
        self.conv_in = nn.Conv2d(u.in_channels + u.concat_channels, widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], u.time_embed_dim) if u.use_time_modulation else None
        self.class_embedding = nn.Embedding(u.num_classes + 1, u.time_embed_dim) if u.num_classes else None
        self.vector_embedding = TimestepEmbedding(u.vector_dim, u.time_embed_dim) if u.vector_dim else None
        self.controlnet_cond_embedding = HintEncoder(config.hint_channels, config.hint_widths, widths[0])
        self.down_blocks = nn.ModuleList(DownBlock(u, i, widths[max(i - 1, 0)]) for i in range(u.num_levels))
        self.mid_block = MidBlock(u)
        # One zero conv per skip tensor (conv_in's output, every ResBlock output, every downsample).
        skips = [widths[0]]
        for block, ch in zip(self.down_blocks, widths):
            skips += [ch] * (len(block.resnets) + (block.downsamplers is not None))
        self.controlnet_down_blocks = nn.ModuleList(_zero_conv(c) for c in skips)
        self.controlnet_mid_block = _zero_conv(widths[-1])
        init_weights(self)

    @classmethod
    def from_unet(
        cls,
        unet: UNet,
        hint_channels: int = 3,
        latent_factor: int = 8,
        hint_widths: Sequence[int] | None = None,
        conditioning_scale: float = 1.0,
    ) -> ControlNet:
        """A ControlNet whose encoder starts as a copy of `unet`'s (same device and dtype); `unet` is untouched."""
        config = ControlNetConfig(
            unet=unet.config, hint_channels=hint_channels, latent_factor=latent_factor,
            hint_widths=None if hint_widths is None else tuple(hint_widths), conditioning_scale=conditioning_scale,
        )  # fmt: skip
        net = cls(config)
        for name, module in unet.encoder_modules().items():
            getattr(net, name).load_state_dict(module.state_dict())  # strict: same names and shapes
        p = next(unet.parameters())
        return net.to(device=p.device, dtype=p.dtype).train(unet.training)

    def _base_view(self) -> SimpleNamespace:
        # `UNet.embed` and `UNet._check_inputs` read only these attributes: the copy runs the base
        # model's own code for the embedding and the input checks, not a duplicate that could drift.
        return SimpleNamespace(
            config=self.config.unet, time_embedding=self.time_embedding, class_embedding=self.class_embedding,
            vector_embedding=self.vector_embedding,
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        control_image: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        scale: float | None = None,
        vector: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x, t, context, context_mask, class_labels, concat: exactly what the base U-Net gets.
        control_image (B or 1, hint_channels, f·H, f·W) in [0, 1] (see `prepare_control_image`);
        scale multiplies every residual (None = config.conditioning_scale; 0 = no control).
        Returns down_residuals (one per `UNet.skip_channels()` entry) and mid_residual."""
        base = self._base_view()
        UNet._check_inputs(base, x, context, context_mask, class_labels, concat, None, None)
        UNet._check_vector(base, x, vector)
        cfg = self.config
        b, _, hgt, wid = x.shape
        f = cfg.latent_factor
        hint = prepare_control_image(control_image, cfg.hint_channels, (f * hgt, f * wid), b, like=x)

        emb = UNet.embed(base, t, class_labels, x, vector)  # (B, 4·C0) or None
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)  # (B, C_in + C_cat, H, W)
        h = self.conv_in(x) + self.controlnet_cond_embedding(hint)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context, context_mask)  # (B, C_i, H/2^(i+1), W/2^(i+1)), last: H/2^i
            skips += block_skips
        h = self.mid_block(h, emb, context, context_mask)  # (B, C_last, H/2^(L-1), W/2^(L-1))

        s = cfg.conditioning_scale if scale is None else scale
        down = [zero(skip) * s for zero, skip in zip(self.controlnet_down_blocks, skips)]  # shapes of the skips
        mid = self.controlnet_mid_block(h) * s  # (B, C_last, H/2^(L-1), W/2^(L-1))
        return down, mid


def sum_residuals(
    outputs: Sequence[tuple[Sequence[torch.Tensor], torch.Tensor]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Several ControlNets' (down_residuals, mid_residual), each already scaled, summed entry by entry."""
    if not outputs:
        raise LdmkitError("sum_residuals needs at least one ControlNet output")
    down = [torch.stack(rs).sum(0) for rs in zip(*(d for d, _ in outputs), strict=True)]
    mid = torch.stack([m for _, m in outputs]).sum(0)
    return down, mid


class MultiControlNet(nn.Module):
    """Several ControlNets on one base U-Net (e.g. edges + depth): residuals summed, each with its own scale."""

    def __init__(self, nets: Sequence[ControlNet]):
        super().__init__()
        if not nets:
            raise LdmkitError("MultiControlNet needs at least one ControlNet")
        shapes = {tuple(tuple(z.weight.shape) for z in n.controlnet_down_blocks) for n in nets}
        if len(shapes) > 1:
            raise LdmkitError("MultiControlNet: the ControlNets were made for differently shaped U-Nets")
        self.nets = nn.ModuleList(nets)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        control_images: Sequence[torch.Tensor],
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
        scales: Sequence[float | None] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One control image per net (in order); scales[k] for net k (None = its conditioning_scale)."""
        n = len(self.nets)
        scales = [None] * n if scales is None else list(scales)
        if len(control_images) != n or len(scales) != n:
            raise LdmkitError(
                f"MultiControlNet has {n} ControlNets: pass {n} control images and {n} scales, "
                f"got {len(control_images)} and {len(scales)}"
            )
        kw = dict(context=context, context_mask=context_mask, class_labels=class_labels, concat=concat)
        return sum_residuals([net(x, t, img, **kw, scale=s) for net, img, s in zip(self.nets, control_images, scales)])


# ---------------------------------------------------------------------------------------------
# T2I-Adapter


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

    checkpoint_kind = "adapter"

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


# ---------------------------------------------------------------------------------------------
# Initialisation (STYLE.md #10) and use


def init_weights(net: ControlNet | Adapter) -> None:
    """All of ControlNet's and the adapter's weight initialisation.

    ControlNet (Zhang et al., 2023, §3.1, eq. 1–2): the encoder copy keeps PyTorch's defaults here and
    takes the base U-Net's weights in `from_unet` ("trainable copy"). The zero convolutions (1x1, on
    every skip and the middle output) and the hint encoder's last conv start at weight 0 and bias 0, so
    every residual is exactly 0 and training starts from the base model: no harmful noise reaches the
    frozen network's features. Gradients still flow: ∂y/∂W of a zero conv is its (non-zero) input, so
    the first step moves the zero convs, and from then on the hint encoder and the copy learn too.

    Adapter: PyTorch's defaults, as T2I-Adapter (Mou et al., 2023). With `zero_init` (ldmkit's default,
    for the same safe start as ControlNet), conv_in and the last conv of every residual branch start at
    0 and every 1x1 width change has bias 0: conv_in's output is 0, each ResBlock is the identity, the
    pools and 1x1 convs map 0 to 0, so every feature is exactly 0. No extra parameters are added (the
    weights stay exportable to diffusers' T2IAdapter). Gradients reach conv_in (through the identity
    paths) and block2 (its input is ReLU(bias) ≠ 0) in the first step, and everything after that.
    """
    zero: list[nn.Module] = []
    if isinstance(net, ControlNet):
        zero += [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    elif net.config.zero_init:
        zero.append(net.conv_in)
        for block in net.body:
            zero += [r.block2 for r in block.resnets]
            if block.in_conv is not None:
                nn.init.zeros_(block.in_conv.bias)
    for m in zero:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)


def controlled_unet(
    unet: UNet, control: ControlNet | MultiControlNet | Adapter, control_image, scale=None
) -> Callable[..., torch.Tensor]:
    """`(x, t, **unet_kwargs) -> unet(x, t, **unet_kwargs, + control residuals)`: the model function a
    training objective or sampler calls (e.g. `lambda z, t: fn(z, t, **cond.unet_kwargs())`).

    A ControlNet runs at every call (its residuals depend on x and t); `control_image` and `scale` are a
    list for a MultiControlNet. An adapter's features are recomputed per call here, which is simplest
    for training (one call per batch); for sampling compute them once and put them in Cond.adapter_residuals.
    Residuals already in the kwargs (another control route in the Cond) are added to, not replaced.
    """
    keys = ("context", "context_mask", "class_labels", "concat")
    # `control` may be a DistributedDataParallel wrapper in training: call the wrapper, ask the module
    bare = control.module if isinstance(control, nn.parallel.DistributedDataParallel) else control

    def fn(x: torch.Tensor, t: torch.Tensor | float, **kw) -> torch.Tensor:
        if isinstance(bare, Adapter):
            new = {"adapter_residuals": control(control_image, x, scale)}
        else:
            ckw = {k: kw.get(k) for k in keys}
            if isinstance(bare, MultiControlNet):
                down, mid = control(x, t, control_image, **ckw, scales=scale)
            else:
                down, mid = control(x, t, control_image, **ckw, scale=scale)
            new = {"down_residuals": down, "mid_residual": mid}
        for k, v in new.items():
            old = kw.get(k)
            if old is not None:
                v = [a + b for a, b in zip(old, v, strict=True)] if isinstance(v, list) else old + v
            kw[k] = v
        return unet(x, t, **kw)

    return fn


register_kind("controlnet", ControlNetConfig, lambda config, meta: ControlNet(config))
register_kind("adapter", AdapterConfig, lambda config, meta: Adapter(config))
