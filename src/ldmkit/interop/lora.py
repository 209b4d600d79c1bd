"""LoRA: low-rank adapters (Hu et al., 2021) on ldmkit models, in the file layouts the ecosystem reads.

A LoRA adapts a weight W (out, in) of a linear layer, or (out, in, k, k) of a convolution, by

    W' = W + s · (α / r) · B A          A = down (r, in[, k, k]),  B = up (out, r[, 1, 1])     (Hu et al. 2021, eq. 3)

with rank r, alpha α and a user scale s (`--lora FILE:SCALE`). Training injects the adapter with peft
(the library diffusers itself uses), so only A and B are trained; sampling and `convert --merge-lora`
fold s·(α/r)·BA into W (several LoRAs add), which costs nothing per step and is exact at s = 0.

In memory a LoRA is a dict `{module path: Adapter(down, up, alpha)}` whose paths name modules of a
`LatentDiffusion`'s parts the way diffusers names them: `unet.down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q` (ldmkit's U-Net has diffusers' module names, `interop.diffusers_unet`)
and `text_encoder.<path inside the transformers model>`. On disk:

| layout    | keys                                                                  | scale        |
| --------- | --------------------------------------------------------------------- | ------------ |
| diffusers | `unet.<path>.lora_A.weight`, `unet.<path>.lora_B.weight` (peft names) | α/r folded into B on save; read from `lora_adapter_metadata` or `.alpha` keys if present |
| kohya     | `lora_unet_<path, "." → "_">.lora_down.weight`, `.lora_up.weight`, `.alpha` (A1111, ComfyUI) | `.alpha`     |

SDXL has two text encoders, `text_encoder` (CLIP ViT-L) and `text_encoder_2` (OpenCLIP bigG), kohya
`lora_te1_` and `lora_te2_` (SD 1/2's single one is `lora_te_`, also read as `lora_te1_`). kohya's
sd-scripts trains SDXL on Stability's own U-Net, so an SDXL kohya file names U-Net layers in the original
(sgm) layout, `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`; ldmkit writes SDXL that way
(given the model) and reads both spellings for any model, through the original-format key map
(`interop.original_keys.unet_module_map`), where diffusers' loader guesses from name patterns.

The diffusers layout is what `StableDiffusionPipeline.load_lora_weights` reads; a peft
`get_peft_model_state_dict` of a U-Net (keys without the `unet.` prefix, or with peft's
`base_model.model.`) and the older diffusers `.lora.down/.lora.up` keys read too. Kohya names are
mapped back to module paths through the model's own module names, as kohya's loaders do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import LdmkitError

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections
# a text encoder's attention projections: CLIP's (those diffusers' DreamBooth LoRA script adapts), BERT's (MiniLM)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj",
                "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
CONV_TARGETS = ("conv1", "conv2")  # the ResBlock convolutions (`lora.targets` may add them)
LAYOUTS = ("diffusers", "kohya")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry for the adapter's config
_PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}  # part -> kohya prefix
_ANOTHER = "it was made for another architecture"
_KOHYA_PARTS = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}


@dataclass
class Adapter:
    """One adapted layer: ΔW = (alpha / rank) · up @ down (reshaped for convolutions)."""

    down: torch.Tensor  # A: (r, in) or (r, in, k, k)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW shaped like the adapted weight (a 1x1 `up` times a k x k `down` for convolutions)."""
        down, up = self.down.to(torch.float32), self.up.to(torch.float32)
        d = up.flatten(1) @ down.flatten(1)  # (out, in·k·k)
        shape = (up.shape[0], *down.shape[1:])
        return (d * (self.alpha / self.rank)).reshape(shape).to(dtype)


Lora = dict[str, Adapter]


# --- the parts of a model a LoRA path names --------------------------------------------------------


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """{"unet": …, "text_encoder": …[, "text_encoder_2": …]} of a LatentDiffusion (each text encoder's
    transformers model, when it has one; SDXL's second is OpenCLIP bigG), or {"unet": model} for a bare U-Net."""
    unet = getattr(model, "unet", None)
    if unet is None:
        return {"unet": model}
    parts = {"unet": unet}
    cond = getattr(model, "conditioner", None)
    for name, enc in zip(("text_encoder", "text_encoder_2"), text_encoders(cond)):
        inner = getattr(enc, "model", None)  # CLIPTextEncoder.model / MiniLMTextEncoder.model
        if isinstance(inner, nn.Module):
            parts[name] = inner
    return parts


def text_encoders(cond) -> list:
    """The conditioner's text encoders in diffusers' order (text_encoder, text_encoder_2): one for SD 1/2,
    SDXL's two (`SDXLTextEncoder.first`, CLIP ViT-L, and `.second`, OpenCLIP bigG)."""
    enc = getattr(cond, "text_encoder", None)
    if enc is None:
        return []
    if hasattr(enc, "first") and hasattr(enc, "second"):  # SDXLTextEncoder
        return [enc.first, enc.second]
    return [enc]


def is_sdxl(model: nn.Module) -> bool:
    """An SDXL-shaped model: two text encoders, or a U-Net with a vector route and a 2048/1280-wide
    context (the rule diffusers' single-file loader uses to call a U-Net SDXL: `context_dim in [2048, 1280]`)."""
    parts = model_parts(model)
    cfg = getattr(parts["unet"], "config", None)
    return "text_encoder_2" in parts or (getattr(cfg, "vector_dim", 0) > 0 and getattr(cfg, "context_dim", None) in (2048, 1280))


def family(model: nn.Module) -> str:
    """What a model is, in the words LoRA files are sold under: SDXL, SD 1.x (768-wide context), SD 2.x (1024)."""
    if is_sdxl(model):
        return "SDXL"
    ctx = getattr(getattr(model_parts(model)["unet"], "config", None), "context_dim", None)
    return _CONTEXT_FAMILY.get(ctx, "") if ctx in (768, 1024) else ""


_CONTEXT_FAMILY = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL"}  # text width → family (1280: refiner)


def lora_family(lora: Mapping[str, Adapter]) -> str:
    """What a LoRA was made for, from what it adapts: a second text encoder is SDXL's; else the width of
    the text features its cross-attention reads (attn2.to_k's input: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL)."""
    if any(p.startswith("text_encoder_2.") for p in lora):
        return "SDXL"
    for path, a in lora.items():
        if path.startswith("unet.") and path.endswith(("attn2.to_k", "attn2.to_v")):
            return _CONTEXT_FAMILY.get(a.down.shape[1], "")
    return ""


def _mismatch(what: str, lora_kind: str, model: nn.Module | None) -> LdmkitError:
    """One line for a LoRA that does not fit the model: the two families when both are known."""
    model_kind = family(model) if model is not None else ""
    if lora_kind and model_kind and lora_kind != model_kind:
        return LdmkitError(f"this LoRA was made for {lora_kind} but the model is {model_kind} ({what}); "
                           f"use a LoRA made for {model_kind}")
    return LdmkitError(f"{what}: {_ANOTHER}")


def _module(parts: Mapping[str, nn.Module], path: str) -> nn.Module:
    part, _, rest = path.partition(".")
    if part not in parts:
        raise LdmkitError(f"the LoRA adapts {path}, but this model has no {part}")
    try:
        try:
            m = parts[part].get_submodule(rest)
        except AttributeError:
            if not rest.startswith("text_model."):
                raise
            m = parts[part].get_submodule(rest.removeprefix("text_model."))  # transformers >= 5.6 flattened CLIP
    except AttributeError:
        raise LdmkitError(f"the LoRA adapts {path}, which this model does not have: {_ANOTHER}") from None
    if hasattr(m, "base_layer"):  # a peft-wrapped layer: the plain one inside
        m = m.base_layer
    if not isinstance(m, (nn.Linear, nn.Conv2d)):
        raise LdmkitError(f"the LoRA adapts {path}, a {type(m).__name__} here, not a linear or convolution layer")
    return m


# --- training: peft adapters on the model ---------------------------------------------------------


def add_adapter(module: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
                targets: Iterable[str] = DEFAULT_TARGETS) -> nn.Module:
    """Inject trainable LoRA layers (peft) into `module` on every layer whose name ends in one of `targets`,
    and freeze everything else. B starts at zero, so the adapted model starts as the base model."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise LdmkitError("LoRA training needs peft: pip install 'ldmkit[lora]'") from e
    targets = list(targets)
    names = [n for n, _ in module.named_modules()]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise LdmkitError(f"lora.targets: no layer of the {type(module).__name__} is named '{t}' "
                              f"(e.g. {', '.join(DEFAULT_TARGETS + CONV_TARGETS)})")
    module.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                     target_modules=targets, init_lora_weights=True)
    inject_adapter_in_model(cfg, module)  # sets requires_grad on the new lora_A / lora_B only
    return module


def _peft_layers(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, m in module.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer") and "default" in getattr(m, "lora_A", {}):
            yield name, m


def adapter_of_layer(m: nn.Module) -> Adapter:
    """The Adapter of one peft LoRA layer (its weights detached, not copied)."""
    return Adapter(m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(), float(m.lora_alpha["default"]))


def text_targets(module: nn.Module) -> list[str]:
    """The `TEXT_TARGETS` a text encoder's transformers model has (CLIP's or BERT's)."""
    names = [n for n, _ in module.named_modules()]
    return [t for t in TEXT_TARGETS if any(n.endswith("." + t) for n in names)]


def _name_prefix(module: nn.Module, part: str) -> str:
    """What goes before a layer's name in `module` to give the path diffusers and kohya use: `text_model.` for a
    CLIPTextModel of transformers >= 5.6, which dropped that level (`_module` and `_from_kohya` read either)."""
    flat_clip = getattr(getattr(module, "config", None), "model_type", None) == "clip_text_model" and not hasattr(
        module, "text_model")
    return "text_model." if part.startswith("text_encoder") and flat_clip else ""


def adapter_of(module: nn.Module, part: str = "unet") -> Lora:
    """The LoRA held by the peft layers of `module` (one model part), as module path -> Adapter (copies)."""
    out: Lora = {}
    prefix = _name_prefix(module, part)
    for name, m in _peft_layers(module):
        a = adapter_of_layer(m)
        out[f"{part}.{prefix}{name}"] = Adapter(a.down.clone(), a.up.clone(), a.alpha)
    return out


def load_adapter_(module: nn.Module, lora: Lora, part: str = "unet") -> None:
    """Copy `lora` into the peft layers of `module` (resuming training); every layer must be covered."""
    layers = dict(_peft_layers(module))
    prefix = _name_prefix(module, part)
    lora = {f"{part}.{p.split('.', 1)[1].removeprefix(prefix)}": a for p, a in lora.items() if p.startswith(part + ".")}
    want = {p.split(".", 1)[1] for p in lora}
    if want != set(layers):
        raise LdmkitError(f"the saved adapter covers {len(want)} layers but the model has {len(layers)} LoRA layers; "
                          "resume with the same lora settings")
    with torch.no_grad():
        for name, m in layers.items():
            a = lora[f"{part}.{name}"]
            m.lora_A["default"].weight.copy_(a.down)
            m.lora_B["default"].weight.copy_(a.up)


def plain_state_dict(module: nn.Module, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """`module`'s state dict with its peft layers folded away: base weights plus scale·ΔW, under the plain
    names (`…to_q.weight`), so the result loads into the module without adapters."""
    deltas = {name: adapter_of_layer(m) for name, m in _peft_layers(module)}
    sd = {}
    for k, v in module.state_dict().items():
        if ".lora_" in k:
            continue
        sd[k.replace(".base_layer.", ".")] = v
    for name, a in deltas.items():
        w = sd[f"{name}.weight"]
        sd[f"{name}.weight"] = w + scale * a.delta(w.dtype).to(w.device)
    return sd


# --- sampling and converting: merge into the weights ----------------------------------------------


@torch.no_grad()
def merge_lora(model: nn.Module, lora: Lora | str | Path, scale: float = 1.0) -> nn.Module:
    """Add scale·ΔW of every adapted layer to `model`'s weights, in place (a LatentDiffusion, or a bare
    U-Net for `unet.` paths); returns `model`. Several LoRAs merge one after another and add up; scale 0
    leaves every weight exactly as it was."""
    parts = model_parts(model)
    if not isinstance(lora, dict):
        lora = load_lora(lora, model)
    if scale == 0:
        return model
    kind = lora_family(lora)
    for path in lora:
        try:
            _module(parts, path)
        except LdmkitError as e:
            raise _mismatch(str(e).removeprefix("the LoRA adapts ").removesuffix(": " + _ANOTHER), kind, model) from None
    for path, a in lora.items():
        m = _module(parts, path)
        shape = (a.up.shape[0], *a.down.shape[1:])  # ΔW's shape (see Adapter.delta), checked before any weight moves
        if shape != tuple(m.weight.shape):
            raise _mismatch(f"its {path} is {shape}, the model's weight {tuple(m.weight.shape)}", kind, model)
    for path, a in lora.items():
        m = _module(parts, path)
        m.weight.add_(scale * a.delta(m.weight.dtype).to(m.weight.device))
    if any(p.startswith("text_encoder") for p in lora):
        cond = getattr(model, "conditioner", None)
        for enc in [getattr(cond, "text_encoder", None), *text_encoders(cond)]:
            for cache in (getattr(enc, "_cache", None), getattr(enc, "_pooled", None)):  # SDXL: pooled vectors too
                if cache is not None:
                    cache.clear()  # captions encoded before the merge are stale
    return model


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'FILE[:SCALE]' -> (FILE, SCALE); SCALE defaults to 1."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def apply_loras(model: nn.Module, specs: Iterable[str | tuple[str, float]]) -> nn.Module:
    """Merge each 'FILE[:SCALE]' (or (file, scale)) into `model`, in order (the scales add)."""
    for spec in specs:
        path, scale = parse_lora_arg(spec) if isinstance(spec, str) else spec
        merge_lora(model, load_lora(path, model), scale)
    return model


# --- files ----------------------------------------------------------------------------------------


def to_state_dict(lora: Lora, layout: str = "diffusers", model: nn.Module | None = None, unet_names: str = "auto"
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """(tensors, safetensors metadata) of `lora` in `layout` (see the module docstring). `model`: the model
    it adapts; an SDXL one gets kohya's SDXL names (`lora_te1_`/`lora_te2_`, and with `unet_names="auto"` the
    original-layout U-Net names sd-scripts writes). `unet_names="diffusers"` keeps diffusers' module names
    in a kohya file (what diffusers' `convert_state_dict_to_kohya` writes; A1111 and ComfyUI read both),
    "original" asks for the original names (then `model` is needed)."""
    if unet_names not in ("auto", "diffusers", "original"):
        raise LdmkitError(f"unet_names is 'auto', 'diffusers' or 'original', not {unet_names!r}")
    if layout not in LAYOUTS:
        raise LdmkitError(f"unknown LoRA layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    sd: dict[str, torch.Tensor] = {}
    if layout == "diffusers":
        for path, a in lora.items():
            sd[f"{path}.lora_A.weight"] = a.down.contiguous()
            sd[f"{path}.lora_B.weight"] = (a.up * (a.alpha / a.rank)).contiguous()  # α/r folded: no alpha needed
        ranks = sorted({a.rank for a in lora.values()})
        meta = {"format": "diffusers", "ldmkit_lora": "1", "rank": ",".join(map(str, ranks))}
        return sd, meta
    sdxl = any(p.startswith("text_encoder_2.") for p in lora) or (model is not None and is_sdxl(model))
    unet_modules = None
    if unet_names == "original" or (unet_names == "auto" and sdxl):
        unet_modules = _unet_modules(model) if model is not None else None
        if unet_modules is None and unet_names == "original":
            raise LdmkitError("original-layout U-Net names need the model the LoRA adapts (an ldmkit U-Net)")
    for path, a in lora.items():
        name = kohya_name(path, sdxl, unet_modules)
        sd[f"{name}.lora_down.weight"] = a.down.contiguous()
        sd[f"{name}.lora_up.weight"] = a.up.contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(a.alpha))
    return sd, {"format": "kohya", "ldmkit_lora": "1", "ss_network_module": "networks.lora"}


def kohya_name(path: str, sdxl: bool = False, unet_modules=None) -> str:
    """A module path's kohya name: `lora_unet_` + the U-Net path (its original name when `unet_modules`,
    as sd-scripts writes SDXL), `lora_te_`/`lora_te1_`/`lora_te2_` + the path inside the text encoder, with
    transformers' `text_model.` level (flattened away in transformers ≥ 5.6, kept in every kohya file)."""
    part, _, rest = path.partition(".")
    if part not in _PARTS:
        raise LdmkitError(f"the kohya layout has no name for {path}")
    if part == "unet" and unet_modules is not None:
        from ldmkit.interop.original_keys import original_unet_module

        rest = original_unet_module(rest, unet_modules)
    if part.startswith("text_encoder") and not rest.startswith(("text_model.", "text_projection")):
        rest = "text_model." + rest
    prefix = "lora_te1_" if sdxl and part == "text_encoder" else _PARTS[part]
    return prefix + rest.replace(".", "_")


def _unet_modules(model: nn.Module):
    """The original-format module map of the model's U-Net (None when it has no original form)."""
    from ldmkit.interop.original_keys import unet_modules_of

    cfg = getattr(model_parts(model)["unet"], "config", None)
    try:
        return unet_modules_of(cfg)
    except (AttributeError, TypeError):  # not an ldmkit UNetConfig (a diffusers model)
        return None


def save_lora(lora: Lora, path: str | Path, layout: str = "diffusers", model: nn.Module | None = None,
              unet_names: str = "auto") -> Path:  # fmt: skip
    """Write `lora` as one .safetensors file in `layout`, atomically (`model`, `unet_names`: see `to_state_dict`)."""
    from safetensors.torch import save

    from ldmkit.imageio import atomic_write

    if not lora:
        raise LdmkitError("the LoRA is empty: no layer was adapted")
    sd, meta = to_state_dict(lora, layout, model, unet_names)
    path = Path(path)
    atomic_write(path, save({k: v.detach().cpu() for k, v in sd.items()}, metadata=meta))
    return path


def is_lora_file(path: str | Path) -> bool:
    """Whether `path` is a .safetensors file of LoRA weights (either layout) rather than a whole model."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - not readable as safetensors: not ours to judge here
        return False
    return bool(keys) and all(re.search(r"(lora_[AB]\.|lora_down|lora_up|lora\.(down|up)\.|\.alpha$)", k) for k in keys)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LdmkitError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise LdmkitError(f"cannot read LoRA {path} ({type(e).__name__}); expected a .safetensors file") from e


def from_state_dict(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str] | None = None,
                    model: nn.Module | None = None) -> Lora:
    """A LoRA from tensors in either layout. Kohya names need `model` (its module names resolve them)."""
    if any(".lora_down." in k for k in sd):
        if model is None:
            raise LdmkitError("a kohya-layout LoRA names layers with '_' for '.'; give the model it adapts")
        return _from_kohya(sd, model)
    return _from_diffusers(sd, meta or {})


def load_lora(path: str | Path, model: nn.Module | None = None) -> Lora:
    """Read a LoRA file (diffusers/peft or kohya layout; see the module docstring)."""
    sd, meta = read_lora(path)
    try:
        return from_state_dict(sd, meta, model)
    except LdmkitError as e:
        raise LdmkitError(f"{path}: {e}") from None


_DIFFUSERS_KEY = re.compile(r"^(.*?)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
                            r"(?:\.default)?\.weight$")


def _from_diffusers(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> Lora:
    downs, ups, alphas = {}, {}, {}
    for k, v in sd.items():
        if k.endswith(".alpha"):
            alphas[_canonical(k[: -len(".alpha")])] = float(v)
            continue
        m = _DIFFUSERS_KEY.match(k)
        if m is None:
            raise LdmkitError(f"unexpected key {k} (not a LoRA weight in the diffusers/peft layout)")
        path = _canonical(m[1])
        (downs if m[2] in ("lora_A", "lora.down", "lora_linear_layer.down") else ups)[path] = v
    if set(downs) != set(ups):
        odd = sorted(set(downs) ^ set(ups))
        raise LdmkitError(f"LoRA layers without both halves (down/A and up/B), e.g. {odd[0]}")
    alpha_of = _metadata_alphas(meta)
    out: Lora = {}
    for path in sorted(downs):
        r = downs[path].shape[0]
        alpha = alphas.get(path, _alpha_for(path, alpha_of, r))  # no alpha anywhere: scale 1 (diffusers' reading)
        out[path] = Adapter(downs[path], ups[path], float(alpha))
    return out


def _canonical(name: str) -> str:
    """A module path with its model part first: peft's `base_model.model.` dropped, `unet.` added when none."""
    name = name.removeprefix("base_model.model.")
    name = name.replace(".processor.", ".")  # diffusers' old attention-processor paths
    for old, new in ((".to_q_lora", ".to_q"), (".to_k_lora", ".to_k"), (".to_v_lora", ".to_v"), (".to_out_lora", ".to_out.0")):
        if name.endswith(old):
            name = name[: -len(old)] + new
    return name if name.split(".", 1)[0] in _PARTS else f"unet.{name}"


def _metadata_alphas(meta: Mapping[str, str]) -> dict[str, float]:
    """lora_alpha per model part from diffusers' `lora_adapter_metadata`: a peft LoraConfig as JSON, its
    keys prefixed with the part (`{"unet.lora_alpha": 6, "unet.r": 2, ...}`), or nested per part.
    peft's `alpha_pattern` (per-layer alphas) is read as `part.<layer suffix>` entries."""
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    if not isinstance(doc, dict):
        return {}
    flat: dict[str, object] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and key in _PARTS:
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key if key.split(".", 1)[0] in _PARTS else f"unet.{key}"] = value
    out: dict[str, float] = {}
    for part in _PARTS:
        if isinstance(flat.get(f"{part}.lora_alpha"), (int, float)):
            out[part] = float(flat[f"{part}.lora_alpha"])
        for layer, alpha in (flat.get(f"{part}.alpha_pattern") or {}).items():
            out[f"{part}.{layer}"] = float(alpha)
    return out


def _alpha_for(path: str, alphas: Mapping[str, float], rank: int) -> float:
    """The most specific alpha the metadata gives `path` (a per-layer pattern, then its part), else the rank."""
    part = path.split(".", 1)[0]
    for key, alpha in alphas.items():  # per-layer keys of this part only (an SDXL file has three parts' alphas)
        if key.startswith(part + ".") and (path == key or path.endswith("." + key.split(".", 1)[1])):
            return alpha
    return alphas.get(part, float(rank))


def _from_kohya(sd: Mapping[str, torch.Tensor], model: nn.Module) -> Lora:
    parts = model_parts(model)
    unet_modules = _unet_modules(model)
    table = {}
    for prefix, part in _KOHYA_PARTS.items():
        if part not in parts:
            continue
        for name, m in parts[part].named_modules():
            if not (isinstance(m, (nn.Linear, nn.Conv2d)) or hasattr(m, "base_layer")):
                continue
            table[prefix + name.replace(".", "_")] = f"{part}.{name}"
            if part.startswith("text_encoder") and not name.startswith("text_model."):  # a flattened CLIPTextModel
                table[f"{prefix}text_model_{name.replace('.', '_')}"] = f"{part}.{name}"
            if part == "unet" and unet_modules is not None:  # the original (sgm) spelling, as SDXL files have
                try:
                    table[kohya_name(f"unet.{name}", unet_modules=unet_modules)] = f"unet.{name}"
                except LdmkitError:
                    pass  # a module with no original name (none of SD's): only its diffusers spelling
    out: Lora = {}
    unknown = []
    for k, v in sd.items():
        if not k.endswith(".lora_down.weight"):
            continue
        name = k.split(".", 1)[0]
        if name not in table:
            unknown.append(name)
            continue
        up = sd.get(f"{name}.lora_up.weight")
        if up is None:
            raise LdmkitError(f"kohya LoRA layer {name} has no lora_up weight")
        alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else v.shape[0]
        out[table[name]] = Adapter(v, up, alpha)
    if unknown:  # the family from the file itself: its names may not resolve on this model at all
        widths = [v.shape[1] for k, v in sd.items() if k.endswith("attn2_to_k.lora_down.weight")]
        kind = "SDXL" if any(n.startswith("lora_te2_") for n in unknown) else _CONTEXT_FAMILY.get(widths[0], "") if widths else ""
        raise _mismatch(f"its layer {unknown[0]} names no layer of this model", kind, model)
    if not out:
        raise LdmkitError("no lora_down weights found")
    return out
