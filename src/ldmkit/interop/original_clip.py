"""The CLIP text encoders in the original single file: transformers' CLIPTextModel ⇄ the OpenAI-CLIP
(SD 1, `cond_stage_model.transformer.text_model.*`) or OpenCLIP (SD 2, `cond_stage_model.model.*`) layout,
and SDXL's pair (`conditioner.embedders.0.transformer.text_model.*` CLIP ViT-L, `conditioner.embedders.1.model.*`
OpenCLIP ViT-bigG ⇄ CLIPTextModelWithProjection)."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldmkit.errors import LdmkitError
from ldmkit.interop.diffusers import check_state_dicts
from ldmkit.interop.original_keys import (
    _IGNORED_KEYS,
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    REFINER_OPENCLIP_PREFIX,
)


def clip_canonical(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights named without the `text_model.` level (flattened in transformers ≥ 5.6)."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    sd.pop("embeddings.position_ids", None)
    return sd


_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
_OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}  # fmt: skip


def openclip_to_original(sd: Mapping[str, torch.Tensor], prefix: str, sd2_penultimate: bool = False) -> dict[str, torch.Tensor]:
    """Canonical CLIPTextModel[WithProjection] weights → OpenCLIP's names under `prefix`: q/k/v fused
    into `attn.in_proj_weight/bias` (rows q, k, v: nn.MultiheadAttention's packing), `text_projection`
    as OpenCLIP applies it, `pooled @ P` with P (width, proj), i.e. the transpose of transformers' Linear.

    `sd2_penultimate` (SD 2): the model stops at the penultimate layer, so a zero block stands in for
    OpenCLIP's last one and an identity for `text_projection` (both unused by SD 2; see `clip_to_original`).
    Otherwise (SDXL's ViT-bigG) every block and the real projection are written: SDXL runs the whole
    model, taking the penultimate hidden states as context and the projected pooled output as a vector."""
    p = prefix
    out = {p + theirs: sd[ours] for theirs, ours in _OPENCLIP_TOP.items()}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n + 1 if sd2_penultimate else n):
        src = f"encoder.layers.{min(i, n - 1)}."
        dst = f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            for theirs, ours in _OPENCLIP_BLOCK.items():
                out[f"{dst}{theirs}.{kind}"] = sd[f"{src}{ours}.{kind}"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{kind}"] for q in "qkv"])  # (3W[, W])
        if i == n:  # SD 2's unused last block
            for key in [k for k in out if k.startswith(dst)]:
                out[key] = torch.zeros_like(out[key])
    emb = sd["embeddings.token_embedding.weight"]
    if sd2_penultimate:
        out[p + "text_projection"] = torch.eye(emb.shape[1], dtype=emb.dtype)
    elif "text_projection.weight" in sd:
        out[p + "text_projection"] = sd["text_projection.weight"].T.contiguous()  # (W, proj)
    return out


def openclip_from_original(sd: Mapping[str, torch.Tensor], prefix: str, sd2_penultimate: bool = False
                           ) -> tuple[dict[str, torch.Tensor], set[str]]:  # fmt: skip
    """OpenCLIP weights under `prefix` → (canonical weights, file keys consumed); the inverse of
    `openclip_to_original`. With `sd2_penultimate` the last block and `text_projection` are consumed and
    dropped (SD 2 never runs them); otherwise every block is kept and `text_projection` becomes
    CLIPTextModelWithProjection's `text_projection.weight`. `logit_scale` and `attn_mask` are always
    consumed and dropped: the contrastive temperature and the causal mask are no text-encoder weights."""
    p = prefix
    blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))}
    if not blocks or p + "token_embedding.weight" not in sd:
        raise LdmkitError(f"{p}* holds no OpenCLIP text encoder (transformer.resblocks.*, token_embedding)")
    n = max(blocks) if sd2_penultimate else max(blocks) + 1  # blocks kept
    names = dict(_OPENCLIP_TOP)
    for i in range(n):
        for kind in ("weight", "bias"):
            names |= {f"transformer.resblocks.{i}.{t}.{kind}": f"encoder.layers.{i}.{o}.{kind}" for t, o in _OPENCLIP_BLOCK.items()}
    out, consumed = {}, set()
    for theirs, ours in names.items():
        if p + theirs in sd:
            out[ours] = sd[p + theirs]
            consumed.add(p + theirs)
    for i in range(n):
        for kind in ("weight", "bias"):
            key = f"{p}transformer.resblocks.{i}.attn.in_proj_{kind}"
            if key in sd:
                consumed.add(key)
                for name, t in zip("qkv", sd[key].chunk(3)):
                    out[f"encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = t
    if sd2_penultimate:
        consumed |= {k for k in sd if k.startswith(f"{p}transformer.resblocks.{n}.")}  # unused by SD 2
        consumed |= {p + "text_projection"} & set(sd)
    elif p + "text_projection" in sd:
        out["text_projection.weight"] = sd[p + "text_projection"].T  # (proj, W): a Linear's weight
        consumed.add(p + "text_projection")
    consumed |= {p + k for k in ("logit_scale", "attn_mask")} & set(sd)
    return out, consumed


def clip_to_original(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Canonical CLIPTextModel weights → `cond_stage_model.*` keys.

    "clip" (SD 1): the transformers names under `cond_stage_model.transformer.text_model.`.
    "openclip" (SD 2): OpenCLIP's names, q/k/v fused into `in_proj`. SD 2 conditions on the
    penultimate layer, and a diffusers SD 2 text encoder already stops there; OpenCLIP's file has one
    more block that CompVis' `FrozenOpenCLIPEmbedder(layer="penultimate")` never runs, so a zero
    block stands in for it (and an identity `text_projection`, also unused), making the file the
    shape SD 2 tools expect while computing exactly the same thing."""
    if layout == "clip":
        return {CLIP_PREFIX + k: v for k, v in sd.items()}
    if layout != "openclip":
        raise LdmkitError(f"unknown text encoder layout {layout!r}; use 'clip' or 'openclip'")
    return openclip_to_original(sd, OPENCLIP_PREFIX, sd2_penultimate=True)


def clip_from_original(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, set[str]]:
    """`cond_stage_model.*` keys → (canonical CLIPTextModel weights, layout, original keys consumed).
    The last OpenCLIP block, `text_projection` and `logit_scale` are consumed and dropped (SD 2 uses
    the penultimate layer's states); keys left unconsumed are the caller's to refuse."""
    if any(k.startswith(CLIP_PREFIX) for k in sd):
        out = {k[len(CLIP_PREFIX) :]: v for k, v in sd.items() if k.startswith(CLIP_PREFIX) and k not in _IGNORED_KEYS}
        return out, "clip", {CLIP_PREFIX + k for k in out}
    if not any(k.startswith(OPENCLIP_PREFIX) for k in sd):
        raise LdmkitError("cond_stage_model holds neither an OpenAI CLIP (transformer.text_model.*) nor an OpenCLIP (model.*) text encoder")
    out, consumed = openclip_from_original(sd, OPENCLIP_PREFIX, sd2_penultimate=True)
    return out, "openclip", consumed


def sdxl_text_to_original(clip_l: Mapping[str, torch.Tensor] | None, bigg: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's two canonical text encoders → `conditioner.embedders.0/1.*` (see `sdxl_text_from_original`); the
    refiner's bigG alone (`clip_l` None) → `conditioner.embedders.0.model.*`."""
    if clip_l is None:
        return openclip_to_original(bigg, REFINER_OPENCLIP_PREFIX)
    out = {SDXL_CLIP_PREFIX + k: v for k, v in clip_l.items()}
    return out | openclip_to_original(bigg, SDXL_OPENCLIP_PREFIX)


def sdxl_text_from_original(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor], set[str]]:
    """`conditioner.embedders.*` of an SDXL base file → (CLIP ViT-L canonical weights (CLIPTextModel),
    OpenCLIP ViT-bigG canonical weights (CLIPTextModelWithProjection, `text_projection.weight` included),
    file keys consumed). embedders.0 is `FrozenCLIPEmbedder` (transformers names), embedders.1
    `FrozenOpenCLIPEmbedder2` (OpenCLIP names, all 32 blocks: SDXL needs the last one for the pooled output).
    A refiner's file (bigG alone as embedders.0) gives None for CLIP ViT-L."""
    if any(k.startswith(REFINER_OPENCLIP_PREFIX) for k in sd):
        bigg, consumed = openclip_from_original(sd, REFINER_OPENCLIP_PREFIX)
        return None, bigg, consumed
    clip_l = {k[len(SDXL_CLIP_PREFIX) :]: v for k, v in sd.items() if k.startswith(SDXL_CLIP_PREFIX) and k not in _IGNORED_KEYS}
    if not clip_l:
        raise LdmkitError("conditioner.embedders.0 holds no CLIP ViT-L text encoder (transformer.text_model.*)")
    bigg, consumed = openclip_from_original(sd, SDXL_OPENCLIP_PREFIX)
    return clip_l, bigg, consumed | {SDXL_CLIP_PREFIX + k for k in clip_l}


def _clip_config_from_weights(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, Any]:
    """A CLIPTextConfig for canonical weights, for files without one: CLIP's 64-channel heads,
    quick_gelu for OpenAI CLIP (SD 1), gelu for OpenCLIP (SD 2)."""
    emb = sd["embeddings.token_embedding.weight"]
    width = emb.shape[1]
    return dict(
        vocab_size=emb.shape[0],
        hidden_size=width,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")),
        num_attention_heads=max(width // 64, 1),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu" if layout == "clip" else "gelu",
        projection_dim=width,
    )


def _build_clip(canonical: dict[str, torch.Tensor], config: Mapping[str, Any], projection: bool = False):
    """A CLIPTextModel (or CLIPTextModelWithProjection: SDXL's bigG) holding `canonical`, checked key by key."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    theirs = model.state_dict()
    nested = any(k.startswith("text_model.") for k in theirs)
    expected = clip_canonical(model)
    check_state_dicts("the text encoder (cond_stage_model) in the file", expected, canonical)
    model.load_state_dict({("text_model." if nested and not k.startswith("text_projection") else "") + k: v
                           for k, v in canonical.items()}, strict=False)  # fmt: skip
    return model.eval()


def _tokenizer_files(tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {f.name: f.read_text() for f in Path(d).iterdir() if f.is_file()}


def _tokenizer_from_files(files: Mapping[str, str]):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        for name, text in files.items():
            (Path(d) / Path(name).name).write_text(text)
        return CLIPTokenizer.from_pretrained(d, local_files_only=True)
