"""The U-Net's stem: what reads the conditions before the first block, shared by the U-Net and the
ControlNet's encoder copy (which must treat x, t and the routes exactly as its base model does).

    x (B, C_in, H, W) ⊕ concat (B, C_cat, H, W) ─conv_in─> h (B, C0, H, W)
    t ─sinusoids─MLP─> (+ class embedding[labels]) (+ MLP(vector)) ─> emb (B, 4·C0)   every ResBlock

Parameter names (conv_in, time_embedding, class_embedding, add_embedding) are diffusers'
`UNet2DConditionModel`'s, so Stable Diffusion weights map one-to-one. The vector route is diffusers'
`addition_embed_type="text_time"` (SDXL): there the U-Net Fourier-embeds the size/crop values itself
(`add_time_proj`) and concatenates them after the pooled text embedding; in ldmkit the conditioner does
that (`Conditioner`, MICRO_FIELDS), so the U-Net takes the finished (B, vector_dim) vector and every
route stays one tensor of `Cond`. `add_embedding` was called `vector_embedding` before SDXL support:
checkpoints written then load through `_rename_legacy_keys`.
"""

from __future__ import annotations

import torch
from torch import nn

from ldmkit.conditioning.cond import Cond
from ldmkit.errors import LdmkitError
from ldmkit.layers.resnet import group_norm
from ldmkit.layers import TimestepEmbedding, guidance_embedding, timestep_embedding
from ldmkit.unet.config import UNetConfig


LEGACY_NAMES = {"vector_embedding.": "add_embedding."}  # old module name → today's (checkpoint.load_weights too)


def _rename_legacy_keys(state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a state dict from before the vector route took diffusers' name loads as is."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in LEGACY_NAMES.items():
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)


class UNetStem(nn.Module):
    """conv_in and the time / label / vector embeddings of a U-Net with config `unet_config`."""

    def __init__(self, unet_config: UNetConfig):
        super().__init__()
        cfg = self.unet_config = unet_config
        width = cfg.widths[0]
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.concat_channels, width, 3, padding=1)
        # Sinusoidal features of t (width of level 0, as diffusers' time_proj) → MLP → (B, time_embed_dim).
        self.time_embedding = (TimestepEmbedding(width, cfg.time_embed_dim, cfg.time_cond_proj_dim)
                               if cfg.use_time_modulation else None)
        widths = {width, *cfg.widths}
        self.single_channel_groups = any(group_norm(w, cfg.norm_groups).num_groups == w for w in widths)
        # One extra row, index num_classes, is the "no label" class that classifier-free guidance
        # trains by dropping labels (Ho & Salimans, 2022).
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.time_embed_dim) if cfg.num_classes else None
        # A global vector condition (e.g. the pooled caption embedding, as Imagen and SDXL add to the
        # time embedding) reaches every ResBlock through the same modulation path as t.
        self.add_embedding = TimestepEmbedding(cfg.vector_dim, cfg.time_embed_dim) if cfg.vector_dim else None
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    def embed(self, t: torch.Tensor | float, cond: Cond, x: torch.Tensor) -> torch.Tensor | None:
        """The embedding every ResBlock receives: MLP(sinusoids(t)) + label embedding + MLP(vector). (B, 4·C0) or None."""
        if self.time_embedding is None:
            return None  # time-agnostic ablation
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0 or t.shape == (1,):
            t = t.reshape(1).expand(b)  # (B,)
        elif t.shape != (b,):
            raise LdmkitError(f"timestep t has shape {tuple(t.shape)}; expected a scalar or ({b},) for a batch of {b}")
        c = self.unet_config
        feats = timestep_embedding(t, c.widths[0], flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
        w = None
        if c.time_cond_proj_dim and cond.guidance is not None:  # a student's w-embedding of its scale g: LCM eq. 10
            # (no scale given: no w term, as diffusers' UNet2DConditionModel without timestep_cond)
            w = guidance_embedding(cond.guidance.to(x.device).float() - 1.0, c.time_cond_proj_dim)  # (B, D_w)
        emb = self.time_embedding(feats.to(x.dtype), w)  # (B, 4·C0)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(cond.labels)  # (B, 4·C0)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(cond.vector.to(emb.dtype))  # (B, 4·C0)
        return emb

    def stem(self, x: torch.Tensor, t: torch.Tensor | float, cond: Cond) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h (B, C0, H, W), emb (B, 4·C0) or None) after checking every route `cond` carries."""
        self.check_routes(x, cond)
        emb = self.embed(t, cond, x)  # (B, 4·C0) or None
        if cond.concat is not None:
            x = torch.cat([x, cond.concat.to(x.dtype)], dim=1)  # (B, C_in + C_cat, H, W)
        return self.conv_in(x), emb  # (B, C0, H, W)

    def check_routes(self, x: torch.Tensor, cond: Cond) -> None:
        """Turn a condition the model has no route for (or a missing one) into one clear LdmkitError."""
        c = self.unet_config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise LdmkitError(f"U-Net input must be (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, hgt, wid = x.shape
        m = c.size_multiple
        if hgt % m or wid % m:
            raise LdmkitError(
                f"latent size {hgt}x{wid} does not work with {c.num_levels} U-Net levels: height and width "
                f"must be multiples of {m} (e.g. {m * max(1, hgt // m)}x{m * max(1, wid // m)})"
            )
        if hgt == wid == m and self.single_channel_groups:
            # the deepest level is 1x1 and some GroupNorm has one channel per group: one value to normalise
            raise LdmkitError(f"latent size {hgt}x{wid} is too small for this U-Net: its deepest level is 1x1 and "
                              f"model_channels={c.model_channels} leaves GroupNorm groups of one channel; use larger "
                              "images, fewer levels or more channels")
        context, mask = cond.context, cond.context_mask
        # cross-attention route
        if context is not None and c.context_dim is None:
            raise LdmkitError("got context, but this U-Net has no cross-attention route (context_dim is None)")
        if context is None and c.context_dim is not None:
            raise LdmkitError(f"this U-Net cross-attends to context (B, M, {c.context_dim}); pass context")
        if context is not None and (context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.context_dim):
            raise LdmkitError(f"context must be ({b}, M, {c.context_dim}), got {tuple(context.shape)}")
        if mask is not None and (context is None or tuple(mask.shape) != tuple(context.shape[:2])):
            raise LdmkitError("context_mask must be (B, M) for a context of (B, M, D)")
        # label route
        labels = cond.labels
        if labels is not None and not c.num_classes:
            raise LdmkitError("got class_labels, but this U-Net has no label route (num_classes is 0)")
        if labels is None and c.num_classes:
            raise LdmkitError(
                f"this U-Net is class-conditional (num_classes={c.num_classes}); pass class_labels "
                f"(label {c.num_classes} is the null class for unconditional/guided sampling)"
            )
        if labels is not None and tuple(labels.shape) != (b,):
            raise LdmkitError(f"class_labels must be ({b},), got {tuple(labels.shape)}")
        # vector route
        vector = cond.vector
        if vector is not None and not c.vector_dim:
            raise LdmkitError("got a vector condition, but this U-Net has no vector route (vector_dim is 0)")
        if vector is None and c.vector_dim:
            raise LdmkitError(f"this U-Net takes a ({b}, {c.vector_dim}) vector condition; pass vector")
        if vector is not None and tuple(vector.shape) != (b, c.vector_dim):
            raise LdmkitError(f"vector must be ({b}, {c.vector_dim}), got {tuple(vector.shape)}")
        # guidance-scale route (a w-embedded student)
        if cond.guidance is not None and not c.time_cond_proj_dim:
            raise LdmkitError("got a guidance scale as input, but this U-Net has no w-embedding (time_cond_proj_dim)")
        if cond.guidance is not None and tuple(cond.guidance.shape) != (b,):
            raise LdmkitError(f"guidance must be ({b},), got {tuple(cond.guidance.shape)}")
        # concatenation route
        concat = cond.concat
        if concat is not None and not c.concat_channels:
            raise LdmkitError("got concat, but this U-Net has no concatenation route (concat_channels is 0)")
        if concat is None and c.concat_channels:
            raise LdmkitError(f"this U-Net takes a spatial condition of {c.concat_channels} channels; pass concat")
        if concat is not None and tuple(concat.shape) != (b, c.concat_channels, hgt, wid):
            raise LdmkitError(f"concat must be ({b}, {c.concat_channels}, {hgt}, {wid}), got {tuple(concat.shape)}")
