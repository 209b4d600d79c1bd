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

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldmkit.errors import LdmkitError
from ldmkit.conditioning.cond import Cond
from ldmkit.layers import ResBlock, group_norm
from ldmkit.layers.transformer import SpatialTransformer
from ldmkit.unet.blocks import DownBlock, MidBlock, UpBlock
from ldmkit.unet.config import UNetConfig
from ldmkit.unet.stem import UNetStem


class UNet(UNetStem):
    """ε/v/x0-predicting U-Net: `unet(x, t, cond)` or `unet(x, t, context=..., class_labels=..., ...)` -> Tensor
    shaped like x (out_channels)."""

    def __init__(self, config: UNetConfig):
        super().__init__(config)  # conv_in, time / label / vector embeddings (UNetStem)
        cfg = self.config = config
        widths = cfg.widths

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
        parts |= {"class_embedding": self.class_embedding, "add_embedding": self.add_embedding}
        parts |= {"down_blocks": self.down_blocks, "mid_block": self.mid_block}
        return {k: m for k, m in parts.items() if m is not None}

    # ---- forward

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond | None = None, **routes) -> torch.Tensor:
        """x (B, in_channels, H, W) noisy latent; t scalar or (B,) timesteps (int or float); `cond` a Cond and/or
        its fields as keywords (`Cond.of`): context (B, M, context_dim) tokens for cross-attention, context_mask
        (B, M) bool (True = attend), class_labels / labels (B,) long in [0, num_classes] (num_classes = null),
        vector (B, vector_dim), concat (B, concat_channels, H, W), down_residuals one tensor per skip (see
        `skip_channels`) and mid_residual like the middle output (ControlNet), adapter_residuals one tensor per
        encoder level (see `level_channels`), added to the output of the level's last ResBlock(+transformer)
        before it is stored as a skip and downsampled (T2I-Adapter, Mou et al., 2023; = diffusers'
        `down_intrablock_additional_residuals` when every level but the last has attention, as in SD 1.x/2.x;
        see ldmkit.control.adapter). Returns (B, out_channels, H, W)."""
        cond = Cond.of(cond, **routes)
        self._check_control(x, cond)
        h, emb = self.stem(x, t, cond)  # (B, C0, H, W), (B, 4·C0) or None
        context, context_mask = cond.context, cond.context_mask
        if context_mask is not None and bool(context_mask.all()):
            context_mask = None  # nothing masked: checked once here, not in every attention layer

        skips = [h]
        for i, block in enumerate(self.down_blocks):
            r = None if cond.adapter_residuals is None else cond.adapter_residuals[i]  # (B, C_i, H/2^i, W/2^i)
            h, block_skips = self._block(block, h, emb, context, context_mask, r)  # (B, C_i, H/2^(i+1), W/2^(i+1))
            skips += block_skips
        if cond.down_residuals is not None:
            skips = [s + r for s, r in zip(skips, cond.down_residuals)]  # ControlNet: one residual per skip

        h = self._block(self.mid_block, h, emb, context, context_mask)  # (B, C_last, H/f, W/f)
        if cond.mid_residual is not None:
            h = h + cond.mid_residual  # (B, C_last, H/f, W/f)

        n, use_skips = self.config.num_res_blocks + 1, self.config.use_skip_connections
        for block in self.up_blocks:
            level_skips, skips = skips[-n:], skips[:-n]  # the last n skips on the stack belong to this level
            level_skips = level_skips if use_skips else None  # no-skip ablation: only the bottleneck goes up
            h = self._block(block, h, level_skips, emb, context, context_mask)  # (B, C_i, H/2^i, W/2^i)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)

    def _check_control(self, x: torch.Tensor, cond: Cond) -> None:
        """The ControlNet / adapter routes: residual shapes, and no raw control image (only a ControlNet reads it)."""
        if cond.control is not None:
            raise LdmkitError("got a control image, but a U-Net alone cannot read it: run it through a ControlNet "
                              "or adapter (ldmkit.conditioning.controlled_unet)")
        b, _, hgt, wid = x.shape
        if cond.down_residuals is not None:
            if not self.config.use_skip_connections:
                raise LdmkitError("got down_residuals, but this U-Net has no skip connections to add them to")
            if len(cond.down_residuals) != len(self._skip_info):
                n = len(self._skip_info)
                raise LdmkitError(f"down_residuals needs {n} tensors (one per skip), got {len(cond.down_residuals)}")
            for k, (r, (ch, f)) in enumerate(zip(cond.down_residuals, self._skip_info)):
                want = (b, ch, hgt // f, wid // f)
                if tuple(r.shape) != want:
                    raise LdmkitError(f"down_residuals[{k}] must be {want}, got {tuple(r.shape)}")
        if cond.mid_residual is not None:
            f = self._skip_info[-1][1]
            want = (b, self.config.widths[-1], hgt // f, wid // f)
            if tuple(cond.mid_residual.shape) != want:
                raise LdmkitError(f"mid_residual must be {want}, got {tuple(cond.mid_residual.shape)}")
        if cond.adapter_residuals is not None:
            levels = self.level_channels()
            if len(cond.adapter_residuals) != len(levels):
                raise LdmkitError(f"adapter_residuals needs {len(levels)} tensors (one per encoder level), "
                                  f"got {len(cond.adapter_residuals)}")
            for i, (r, (ch, f)) in enumerate(zip(cond.adapter_residuals, levels)):
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
