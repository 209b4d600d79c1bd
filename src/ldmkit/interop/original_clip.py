"""The CLIP text encoder in the original single file: transformers' CLIPTextModel ⇄ the OpenAI-CLIP
(SD 1, `cond_stage_model.transformer.text_model.*`) or OpenCLIP (SD 2, `cond_stage_model.model.*`) layout."""

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

from ldmkit.interop.original_keys import _IGNORED_KEYS, CLIP_PREFIX, OPENCLIP_PREFIX



def clip_canonical(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights named without the `text_model.` level (flattened in transformers ≥ 5.6)."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    sd.pop("embeddings.position_ids", None)
    return sd


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
    p = OPENCLIP_PREFIX
    out = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
    }
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n + 1):
        src = f"encoder.layers.{min(i, n - 1)}."
        dst = f"{p}transformer.resblocks.{i}."
        block = {
            "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
        }  # fmt: skip
        for kind in ("weight", "bias"):
            for theirs, ours in block.items():
                out[f"{dst}{theirs}.{kind}"] = sd[f"{src}{ours}.{kind}"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{q}_proj.{kind}"] for q in "qkv"])
        if i == n:  # the unused last block (see above)
            for key in [k for k in out if k.startswith(dst)]:
                out[key] = torch.zeros_like(out[key])
    width = sd["embeddings.token_embedding.weight"].shape[1]
    out[p + "text_projection"] = torch.eye(width, dtype=sd["embeddings.token_embedding.weight"].dtype)
    return out


def clip_from_original(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, set[str]]:
    """`cond_stage_model.*` keys → (canonical CLIPTextModel weights, layout, original keys consumed).
    The last OpenCLIP block, `text_projection` and `logit_scale` are consumed and dropped (SD 2 uses
    the penultimate layer's states); keys left unconsumed are the caller's to refuse."""
    if any(k.startswith(CLIP_PREFIX) for k in sd):
        out = {k[len(CLIP_PREFIX) :]: v for k, v in sd.items() if k.startswith(CLIP_PREFIX) and k not in _IGNORED_KEYS}
        return out, "clip", {CLIP_PREFIX + k for k in out}
    p = OPENCLIP_PREFIX
    blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))}
    if not blocks or p + "token_embedding.weight" not in sd:
        raise LdmkitError("cond_stage_model holds neither an OpenAI CLIP (transformer.text_model.*) nor an OpenCLIP (model.*) text encoder")
    n = max(blocks)  # index of the last block, which SD 2 does not use
    names = {"token_embedding.weight": "embeddings.token_embedding.weight",
             "positional_embedding": "embeddings.position_embedding.weight",
             "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}  # fmt: skip
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
    for i in range(n):
        for kind in ("weight", "bias"):
            names |= {f"transformer.resblocks.{i}.{t}.{kind}": f"encoder.layers.{i}.{o}.{kind}" for t, o in block.items()}
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
    consumed |= {k for k in sd if k.startswith(f"{p}transformer.resblocks.{n}.")}  # unused by SD 2
    consumed |= {p + k for k in ("text_projection", "logit_scale", "attn_mask")} & set(sd)  # unused by SD 2
    return out, "openclip", consumed


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


def _build_clip(canonical: dict[str, torch.Tensor], config: Mapping[str, Any]):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")})
    model = CLIPTextModel(cfg)
    theirs = model.state_dict()
    nested = any(k.startswith("text_model.") for k in theirs)
    expected = clip_canonical(model)
    check_state_dicts("the text encoder (cond_stage_model) in the file", expected, canonical)
    model.load_state_dict({("text_model." if nested else "") + k: v for k, v in canonical.items()}, strict=False)
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
