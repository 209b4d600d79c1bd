"""`ldmkit convert` and `load_any`: any supported checkpoint in, any supported format out (and a LoRA
file in another layout, `convert_lora_file`).

Formats, told apart by what is on disk (`detect_format`):

| format              | what it looks like                                           | loads as                       |
| ------------------- | ------------------------------------------------------------ | ------------------------------ |
| ldmkit              | folder with config.json holding "kind" (or a `latest` file)  | whatever the checkpoint holds  |
| diffusers pipeline  | folder with model_index.json                                 | LatentDiffusion                |
| diffusers model     | folder with config.json holding "_class_name"               | AutoencoderKL / UNet / ControlNet / TinyAutoencoder (TAESD) |
| original            | one .safetensors / .ckpt file (CompVis key names)            | LatentDiffusion / AutoencoderKL / UNet |

Conversions are strict: every tensor must find its place and every place must be filled, so a
partial or mismatched checkpoint is refused with the keys named, never half-loaded. Outputs are
written under a temporary name and renamed into place, and an existing output is never overwritten
unless asked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ldmkit.checkpoint import is_checkpoint, kind_of, load, sampling_defaults
from ldmkit.errors import LdmkitError
from ldmkit.imageio import staging_dir
from ldmkit.interop import diffusers as dif
from ldmkit.interop import lora as lora_io
from ldmkit.interop import original as orig

FORMATS = ("ldmkit", "diffusers", "original")
Format = Literal["ldmkit", "diffusers", "original"]


def detect_format(path: str | Path) -> str:
    """'ldmkit', 'diffusers_pipeline', 'diffusers_model' or 'original', or LdmkitError saying what
    was expected."""
    path = Path(path)
    if not path.exists():
        raise LdmkitError(f"{path} does not exist")
    if path.is_file():
        if path.suffix in orig.SINGLE_FILE_SUFFIXES:
            return "original"
        raise LdmkitError(
            f"{path} is not a checkpoint file ldmkit reads: expected a .safetensors or .ckpt single file "
            "(or an ldmkit / diffusers folder)"
        )
    if dif.is_pipeline_folder(path):
        return "diffusers_pipeline"
    if dif.is_model_folder(path):
        return "diffusers_model"
    if is_checkpoint(path):
        return "ldmkit"
    config = path / "config.json"
    if config.is_file():  # a config.json that neither format reads: say what is wrong with it
        try:
            doc = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise LdmkitError(f"{config} is damaged: not valid JSON ({e.msg} at line {e.lineno}); restore it from "
                              "a copy of the checkpoint") from None
        except (OSError, UnicodeDecodeError) as e:
            raise LdmkitError(f"{config} cannot be read ({e}); restore it from a copy of the checkpoint") from None
        raise LdmkitError(f"{config} has neither \"kind\" (ldmkit) nor \"_class_name\" (diffusers)"
                          + (f"; its keys: {', '.join(list(doc)[:6])}" if isinstance(doc, dict) else ""))
    raise LdmkitError(
        f"cannot tell what {path} holds: expected an ldmkit checkpoint folder (config.json with \"kind\", or a "
        "training folder with `latest`), a diffusers folder (model_index.json, or config.json with \"_class_name\") "
        "or a single .safetensors/.ckpt file"
    )


def load_any(path: str | Path, config=None, ema: bool = True, device: str | torch.device = "cpu",
             skip: frozenset[str] = frozenset()) -> nn.Module:
    """The module any supported checkpoint holds, in eval mode: an ldmkit checkpoint folder, a
    diffusers pipeline folder (→ LatentDiffusion with its CLIP text encoder), a diffusers model
    folder, or an original single file.

    `config` is for single files only (a diffusers pipeline folder or config object; see
    `ldmkit.interop.original.load_original`). `ema`: prefer EMA weights where the checkpoint has
    both (ldmkit's ema.safetensors, the original format's model_ema.*). `skip`: as `ldmkit.load` takes it (an
    ldmkit or diffusers pipeline folder; a single file is read whole)."""
    fmt = detect_format(path)
    if config is not None and fmt != "original":
        raise LdmkitError(f"config= is for single files; {path} is a {fmt.replace('_', ' ')} and carries its own")
    if fmt == "ldmkit":
        return load(path, ema=ema, device=device, skip=skip)
    if fmt == "diffusers_pipeline":
        return dif.load_diffusers_pipeline(path, device=device, skip=skip)
    if fmt == "diffusers_model":
        return dif.load_diffusers_model(path).to(device)
    return orig.load_original(path, config=config, ema=ema, device=device)


def sampling_defaults_any(path: str | Path, fmt: str | None = None) -> dict[str, Any]:
    """How the model at `path` asks to be sampled when the user does not say: an ldmkit checkpoint's
    meta.sampling, a diffusers pipeline's (`ldmkit.interop.diffusers.pipeline_sampling_defaults`), else {}
    (also for a path that is not a model: the command's own check says so). `fmt`: the path's format
    when the caller has already detected it."""
    if fmt is None:
        try:
            fmt = detect_format(path)
        except LdmkitError:
            return {}
    if fmt == "ldmkit":
        return sampling_defaults(path)
    if fmt == "diffusers_pipeline":
        try:
            return dif.pipeline_sampling_defaults(path)
        except LdmkitError:
            return {}
    return {}


def save_ldmkit(module: nn.Module, folder: str | Path, source: str = "", sampling: dict[str, Any] | None = None) -> Path:
    """Write `module` as an ldmkit checkpoint folder (config.json + model.safetensors), atomically.
    A CLIP text encoder is saved inside it (text_encoder/, tokenizer/) and the config points there; SDXL's pair
    as text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/, the config naming the folder.
    `sampling`: the model's sampling defaults, kept as meta.sampling."""
    from safetensors.torch import save_file

    from ldmkit.conditioning.text import CLIPTextEncoder

    folder = Path(folder)
    kind = kind_of(module)
    cfg = module.config
    with staging_dir(folder) as tmp:
        if kind == "latent_diffusion" and isinstance(module.conditioner.text_encoder, CLIPTextEncoder):
            parts = dif._text_encoder_parts(module)
            parts[0].save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
            parts[1].save_pretrained(str(tmp / "tokenizer"))
            cond = cfg.conditioner.model_copy(update={"text_encoder": str((folder / "text_encoder").resolve())})
            cfg = cfg.model_copy(update={"conditioner": cond})
        elif kind == "latent_diffusion" and (sdxl := dif._sdxl_text_parts(module)) is not None:
            # SDXL's pair, in the diffusers layout inside the checkpoint; the config names the folder itself
            for name, part in sdxl.items():
                part.save_pretrained(str(tmp / name), **({} if "tokenizer" in name else {"safe_serialization": True}))
            cond = cfg.conditioner.model_copy(update={"text_encoder": str(folder.resolve())})
            cfg = cfg.model_copy(update={"conditioner": cond})
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"))
        meta: dict[str, Any] = {"converted_from": source, **({"sampling": dict(sampling)} if sampling else {})}
        doc = {"kind": kind, "config": cfg.model_dump(mode="json"), "meta": meta, "step": 0}
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    return folder


def _describe(module: nn.Module) -> str:
    n = sum(p.numel() for p in module.parameters())
    from ldmkit.conditioning.text import CLIPTextEncoder
    from ldmkit.pipeline import LatentDiffusion

    text = ""
    if isinstance(module, LatentDiffusion):
        enc = module.conditioner.text_encoder
        text = " + CLIP text encoder" if isinstance(enc, CLIPTextEncoder) else (" + MiniLM text encoder" if enc else "")
        text = " + SDXL text encoders (CLIP ViT-L, OpenCLIP bigG)" if hasattr(enc, "pooled_dim") else text
    return f"{type(module).__name__}{text}, {n / 1e6:.1f}M parameters"


def _write(module: nn.Module, dst: Path, fmt: str, source: str, dtype: torch.dtype | None,
           sampling: dict[str, Any]) -> None:
    from ldmkit.pipeline import LatentDiffusion

    if fmt == "ldmkit":
        save_ldmkit(module, dst, source=source, sampling=sampling)
    elif fmt == "diffusers":
        if isinstance(module, LatentDiffusion):
            dif.save_diffusers_pipeline(module, dst, sampling=sampling)
        else:
            dif.save_diffusers_model(module, dst)
    else:
        orig.save_original(module, dst, dtype=dtype)


def _swap_in(new: Path, dst: Path) -> None:
    """Put `new` at `dst`, replacing what is there: a file in one atomic rename; a folder by moving the old
    one aside first, so that at every moment either the old or the new output is complete at `dst`."""
    if not dst.exists() or (new.is_file() and dst.is_file()):
        os.replace(new, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def convert(
    src: str | Path,
    dst: str | Path,
    fmt: Format,
    config=None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    loras=(),
) -> str:
    """Convert the checkpoint at `src` (any format `detect_format` knows) to `fmt` at `dst`:

    - "ldmkit":    a checkpoint folder `ldmkit.load` reads
    - "diffusers": a pipeline folder (LatentDiffusion) or model folder (autoencoder, U-Net)
    - "original":  one .safetensors/.ckpt file (dst's suffix decides)

    `config`: for a single-file `src`, what its weights do not say (see `load_any`). `dtype`:
    store the original format in e.g. torch.float16. `loras`: 'FILE[:SCALE]' LoRAs folded into the weights
    before writing (`ldmkit.interop.lora`). Returns a one-line summary."""
    if fmt not in FORMATS:
        raise LdmkitError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    src_fmt = detect_format(src)
    if dst.exists() and not overwrite:
        raise LdmkitError(f"{dst} already exists; remove it or choose another output path")
    if dst.exists() and dst.resolve() == src.resolve():
        raise LdmkitError("the output path is the input; choose another output path")
    if fmt == "original" and dst.suffix not in (".safetensors", ".ckpt"):
        raise LdmkitError(f"the original format is one file: give --to a name ending in .safetensors or .ckpt, not {dst.name}")
    if dtype is not None and fmt != "original":
        raise LdmkitError("dtype applies to the original format only")
    module = load_any(src, config=config)  # fully loaded and checked before anything is written
    # a distilled model's sampler, steps and guidance travel with it (a single file has no place for them)
    sampling = sampling_defaults_any(src, src_fmt) if kind_of(module) == "latent_diffusion" else {}
    if loras:
        lora_io.apply_loras(module, loras)
    # Written under a temporary sibling name, then swapped in: a conversion that fails (a bug, a full disk,
    # an interrupt) leaves the old output as it was and no half-written new one.
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.partial-{os.getpid()}{dst.suffix}")
    try:
        _write(module, tmp, fmt, str(src), dtype, sampling)
        _swap_in(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    merged = f" with {len(loras)} LoRA(s) merged" if loras else ""
    note = ""
    if sampling and fmt == "original":
        note = (f"; a single file cannot record the model's sampling defaults: sample it with --sampler "
                f"{sampling.get('sampler')} --steps {sampling.get('steps')} --guidance {sampling.get('guidance')}")
    return f"converted {src} ({src_fmt.replace('_', ' ')}: {_describe(module)}){merged} to {dst} ({fmt}){note}"


def convert_lora_file(src: str | Path, dst: str | Path, layout: str, model: str | None = None,
                      overwrite: bool = False) -> str:
    """Rewrite the LoRA file `src` in `layout` at `dst` (`ldmkit convert --from LORA --format kohya|diffusers`).
    `model`: the model it adapts, needed to read kohya names."""
    if layout not in lora_io.LAYOUTS:
        raise LdmkitError(f"a LoRA converts to {' or '.join(lora_io.LAYOUTS)}, not {layout}")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise LdmkitError(f"{dst} already exists; remove it or choose another output path")
    if dst.suffix != ".safetensors":
        raise LdmkitError(f"a LoRA is one .safetensors file: give --to a name ending in .safetensors, not {dst.name}")
    net = load_any(model) if model is not None else None
    lora = lora_io.load_lora(src, net)
    lora_io.save_lora(lora, dst, layout, net)
    return f"converted LoRA {src} ({len(lora)} layers) to {dst} ({layout} layout)"
