"""ControlNet (Zhang et al., 2023): a trainable copy of the U-Net's encoder that reads a control image.

    control image (B, C_hint, f·H, f·W) ─hint encoder (stride-2 convs, last conv = 0)─┐
    z_t (B, C, H, W) ⊕ concat ─conv_in──────────────────────────────────────────────(+)─> down blocks ─> middle
                                                                    every skip tensor ─┤            │
                                                                        zero 1x1 conv ─┴─> down_residuals
                                                                                  zero 1x1 conv ─┴─> mid_residual

The copy (conv_in, time/label/vector embeddings, down blocks, middle block) starts with the base
model's weights and shares its stem code (`UNetStem`), so it reads x, t and every route exactly as the
base does; the "zero convolutions" start at 0, so at initialisation every residual is exactly 0 and the
controlled U-Net is the base model (Zhang et al. §3.1, eq. 2). The frozen U-Net adds the residuals to
its skip connections and middle output (`Cond.down_residuals`, `Cond.mid_residual`). Module names are
diffusers' `ControlNetModel`'s (controlnet_cond_embedding.{conv_in, blocks.k, conv_out},
controlnet_down_blocks.k, controlnet_mid_block; the encoder copy named like the U-Net's), so
`ldmkit.interop.diffusers_controlnet` maps weights one-to-one.

`controlled_unet(unet, control)` is the model function a loss or a sampler calls: it runs the
ControlNet(s) or adapter on `cond.control` and the U-Net on the residuals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ldmkit.control.adapter import Adapter
from ldmkit.conditioning.cond import Cond
from ldmkit.control.control_image import prepare_control_image
from ldmkit.errors import LdmkitError
from ldmkit.unet import DownBlock, MidBlock, UNet, UNetConfig
from ldmkit.unet.stem import UNetStem

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


def _zero_conv(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 1)  # zeroed in init_weights


class ControlNet(UNetStem):
    """`controlnet(x, t, control_image, cond) -> (down_residuals, mid_residual)` for the frozen base U-Net."""

    def __init__(self, config: ControlNetConfig):
        u = config.unet
        super().__init__(u)  # the encoder copy's conv_in and embeddings, named as in `UNet`
        self.config = config
        widths = u.widths
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

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        control_image: torch.Tensor | None = None,
        cond: Cond | None = None,
        scale: float | None = None,
        **routes,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x, t, cond (or its routes as keywords, `Cond.of`): exactly what the base U-Net gets.
        control_image (B or 1, hint_channels, f·H, f·W) in [0, 1] (see `prepare_control_image`; default
        cond.control); scale multiplies every residual (None = config.conditioning_scale; 0 = no control).
        Returns down_residuals (one per `UNet.skip_channels()` entry) and mid_residual."""
        cond = Cond.of(cond, **routes)
        control_image = cond.control if control_image is None else control_image
        cfg = self.config
        b, _, hgt, wid = x.shape
        f = cfg.latent_factor
        h, emb = self.stem(x, t, cond)  # (B, C0, H, W), (B, 4·C0) or None
        hint = prepare_control_image(control_image, cfg.hint_channels, (f * hgt, f * wid), b, like=x)
        h = h + self.controlnet_cond_embedding(hint)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, cond.context, cond.context_mask)  # (B, C_i, H/2^(i+1), W/2^(i+1)), last: H/2^i
            skips += block_skips
        h = self.mid_block(h, emb, cond.context, cond.context_mask)  # (B, C_last, H/2^(L-1), W/2^(L-1))

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
        control_images: Sequence[torch.Tensor] | None = None,
        cond: Cond | None = None,
        scales: Sequence[float | None] | None = None,
        **routes,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One control image per net, in order (default cond.control); scales[k] for net k (None = its own)."""
        cond = Cond.of(cond, **routes)
        control_images = cond.control if control_images is None else control_images
        n = len(self.nets)
        scales = [None] * n if scales is None else list(scales)
        if not isinstance(control_images, (list, tuple)) or len(control_images) != n or len(scales) != n:
            got = len(control_images) if isinstance(control_images, (list, tuple)) else "not a list of"
            raise LdmkitError(f"MultiControlNet has {n} ControlNets: pass {n} control images and {n} scales, "
                              f"got {got} and {len(scales)}")
        return sum_residuals([net(x, t, img, cond, scale=s) for net, img, s in zip(self.nets, control_images, scales)])


def init_weights(net: ControlNet) -> None:
    """All of ControlNet's weight initialisation.

    ControlNet (Zhang et al., 2023, §3.1, eq. 1–2): the encoder copy keeps PyTorch's defaults here and
    takes the base U-Net's weights in `from_unet` ("trainable copy"). The zero convolutions (1x1, on
    every skip and the middle output) and the hint encoder's last conv start at weight 0 and bias 0, so
    every residual is exactly 0 and training starts from the base model: no harmful noise reaches the
    frozen network's features. Gradients still flow: ∂y/∂W of a zero conv is its (non-zero) input, so
    the first step moves the zero convs, and from then on the hint encoder and the copy learn too.
    """
    for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)


def controlled_unet(unet: nn.Module, control: ControlNet | MultiControlNet | Adapter | nn.Module,
                    scale: float | Sequence[float | None] | None = None) -> Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]:
    """`(x, t, cond) -> unet(x, t, cond + the control residuals of cond.control)`: the model function a
    loss or a sampler calls with the control image(s) in `cond.control` (a list for a MultiControlNet,
    with `scale` a list too).

    A ControlNet runs at every call (its residuals depend on x and t). An adapter's features are
    recomputed per call here, which is simplest for training (one call per batch); for sampling compute
    them once and put them in Cond.adapter_residuals. Residuals already in the Cond (another control
    route) are added to, not replaced. `unet` and `control` may be DDP/FSDP wrappers in training."""
    # `control` may be a DistributedDataParallel wrapper in training: call the wrapper, ask the module
    bare = control.module if isinstance(control, nn.parallel.DistributedDataParallel) else control

    def fn(x: torch.Tensor, t: torch.Tensor | float, cond: Cond | None = None, **routes) -> torch.Tensor:
        cond = Cond.of(cond, **routes)
        if cond.control is None:
            raise LdmkitError(f"the {type(bare).__name__} needs a control image (cond.control)")
        if isinstance(bare, Adapter):
            cond = cond.plus_residuals(adapter=control(cond.control, x, scale))
        elif isinstance(bare, MultiControlNet):
            cond = cond.plus_residuals(*control(x, t, cond.control, cond, scales=scale))
        else:
            cond = cond.plus_residuals(*control(x, t, cond.control, cond, scale=scale))
        return unet(x, t, Cond.of(cond, control=None))

    return fn
