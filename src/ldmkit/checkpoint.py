"""Checkpoint folders: written atomically, found by `latest`, loaded by kind.

A training output folder looks like

    OUT/latest                           text file naming the newest complete checkpoint
    OUT/checkpoints/step_00001200/       one checkpoint = one folder:
        config.json                      {"kind", "config" (typed model config), "meta" (latent stats, ...)}
        model.safetensors                weights
        ema.safetensors                  EMA weights (when training keeps an EMA)
        training_state.pt                optimizer, step, RNG, data position (for --resume)

A checkpoint folder is first written under a temporary name and renamed into place, then `latest`
is replaced with `os.replace`; both are atomic on POSIX file systems, so a crash at any moment
leaves the previous checkpoint as "latest" and never a half-written one. Re-saving a step that
exists (the final save right after a periodic one) moves the old folder aside before the new one
is renamed in, so a crash between the two renames still leaves a complete folder (`resolve` takes
the aside copy back). A full disk fails the save with one line; the checkpoints already written
stay as they were.

`KINDS` is the one table of what a folder can hold: kind name → its config class and builder. This
module sits above the models and the pipeline it builds and below everything that reads or writes
checkpoints (train, interop, evaluate, cli); it never imports the interop formats.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.autoencoder.tiny import TinyAutoencoder, TinyAutoencoderConfig
from ldmkit.control.adapter import Adapter, AdapterConfig
from ldmkit.control.controlnet import ControlNet, ControlNetConfig
from ldmkit.errors import LdmkitError, disk_full
from ldmkit.imageio import atomic_write, umask
from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig
from ldmkit.unet.stem import LEGACY_NAMES

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
STATE = "training_state.pt"


@dataclass(frozen=True)
class Kind:
    """What a checkpoint of this kind holds: the module class, built from its typed config alone."""

    config_cls: type[BaseModel]
    module_cls: Callable[[BaseModel], nn.Module]


KINDS: dict[str, Kind] = {
    "autoencoder": Kind(AutoencoderConfig, AutoencoderKL),
    "latent_diffusion": Kind(LatentDiffusionConfig, LatentDiffusion),
    "controlnet": Kind(ControlNetConfig, ControlNet),
    "adapter": Kind(AdapterConfig, Adapter),
    "tiny_autoencoder": Kind(TinyAutoencoderConfig, TinyAutoencoder),
}


def kind_of(module: nn.Module) -> str:
    """The KINDS name of a module, or LdmkitError when it has no checkpoint form of its own."""
    for name, kind in KINDS.items():
        if type(module) is kind.module_cls:
            return name
    raise LdmkitError(f"a {type(module).__name__} alone has no ldmkit checkpoint form; save the model that holds it")


def _state_dict(module: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; contiguous clones make every tensor its own.
    sd = module.state_dict() if isinstance(module, nn.Module) else module
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    kind: str,
    module: nn.Module | dict[str, torch.Tensor],
    config: BaseModel,
    meta: dict[str, Any] | None = None,
    ema: nn.Module | dict[str, torch.Tensor] | None = None,
    training_state: dict[str, Any] | None = None,
    keep: int = 2,
    files: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` under OUT/checkpoints/, point OUT/latest at it, prune old ones. `files(folder)`
    writes more into the folder before it is renamed into place, so they appear with it or not at all (a
    trained text encoder's own folder, `text_encoder/`, which `load` finds there)."""
    out_dir = Path(out_dir)
    ckpts = out_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=f".{name}."))
    try:
        doc = {"kind": kind, "config": config.model_dump(mode="json"), "meta": meta or {}, "step": step}
        (tmp / CONFIG).write_text(json.dumps(doc, indent=2))
        save_file(_state_dict(module), str(tmp / WEIGHTS))
        if ema is not None:
            save_file(_state_dict(ema), str(tmp / EMA_WEIGHTS))
        if training_state is not None:
            torch.save(training_state, tmp / STATE)
        if files is not None:
            files(tmp)
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700 folders
        for f in tmp.iterdir():  # and safetensors 0600 files: give the user's usual permissions
            if f.is_file():
                os.chmod(f, 0o666 & ~umask())
        final, aside = ckpts / name, _aside(ckpts / name)
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
        atomic_write(out_dir / "latest", (name + "\n").encode())
    except BaseException as e:
        full = not isinstance(e, KeyboardInterrupt) and disk_full(e, ckpts)  # measured before the cleanup frees space
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise LdmkitError(f"the disk is full: checkpoint {name} could not be written under {ckpts}; "
                              f"{_last_complete(out_dir)} free space, then rerun with --resume") from e
        raise
    if keep > 0:
        old = sorted(p for p in ckpts.glob("step_*") if p.is_dir())[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _aside(final: Path) -> Path:
    """Where an existing checkpoint folder waits while a new one of the same step is renamed in."""
    return final.with_name(f".{final.name}.replaced")


def _last_complete(out_dir: Path) -> str:
    try:
        return f"the last complete checkpoint, {resolve(out_dir).name}, is intact:"
    except LdmkitError:
        return "no checkpoint was written yet:"


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a training output folder whose `latest` names one."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / "checkpoints" / latest.read_text().strip()
        if (target / CONFIG).is_file():
            return target
        if not target.exists() and (_aside(target) / CONFIG).is_file():  # killed between the two renames
            os.replace(_aside(target), target)
            return target
        raise LdmkitError(f"{latest} names {target.name}, which is missing or incomplete; delete `latest` or point it at a folder in {path / 'checkpoints'}")
    if not path.exists():
        raise LdmkitError(f"checkpoint {path} does not exist; give a checkpoint folder or a training output folder")
    raise LdmkitError(f"{path} is not an ldmkit checkpoint (no {CONFIG} and no `latest`); give the folder `ldmkit train*` wrote")


def read_config(path: str | Path) -> tuple[Path, str, BaseModel, dict]:
    """(checkpoint folder, kind, typed config, meta), validated."""
    folder = resolve(path)
    try:
        doc = json.loads((folder / CONFIG).read_text())
        kind = doc["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LdmkitError(f"{folder / CONFIG} is corrupt ({type(e).__name__}); restore it from another checkpoint") from e
    if kind not in KINDS:
        raise LdmkitError(f"{folder} holds a '{kind}', which this ldmkit cannot load (known: {', '.join(sorted(KINDS))})")
    try:
        cfg = KINDS[kind].config_cls.model_validate(doc["config"])
    except ValidationError as e:
        raise LdmkitError(f"{folder / CONFIG}: invalid config ({_first_error(e)})") from e
    return folder, kind, cfg, doc.get("meta", {})


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


def load_weights(module: nn.Module, file: Path, strict: bool = True, skip: tuple[str, ...] = ()) -> None:
    """Load safetensors weights, naming missing/unexpected/mis-shaped keys instead of half-loading. `skip`: key
    prefixes neither read from the file nor expected in the module (parts built without weights)."""
    try:
        if skip:
            from safetensors import safe_open

            with safe_open(str(file), "pt") as f:  # only the tensors asked for are read from the file
                sd = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(skip)}
        else:
            sd = load_file(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise LdmkitError(f"cannot read weights {file} ({type(e).__name__}: {e}); the file is damaged, use another checkpoint") from e
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)} if skip else module.state_dict()
    for key in [k for k in sd if k not in own]:  # a module renamed since the file was written (unet.stem)
        for old, now in LEGACY_NAMES.items():
            if f".{old}" in f".{key}" and (renamed := f".{key}".replace(f".{old}", f".{now}")[1:]) in own:
                sd[renamed] = sd.pop(key)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [k for k in set(own) & set(sd) if own[k].shape != sd[k].shape]
    if strict and (missing or unexpected or shapes):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} keys of the wrong shape (e.g. {k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)})")
        raise LdmkitError(f"weights {file} do not match the config: {'; '.join(parts)}")
    module.load_state_dict(sd, strict=strict and not skip)  # skipped keys: checked above without them


def load(
    path: str | Path,
    ema: bool = True,
    device: str | torch.device = "cpu",
    skip: frozenset[str] = frozenset(),
) -> nn.Module:
    """The module a checkpoint folder holds, in eval mode, with EMA weights when present and `ema`. `skip`: parts
    of a LatentDiffusion built on the meta device, their weights not read (`ldmkit.load` says which)."""
    folder, kind, cfg, meta = read_config(path)
    cls = KINDS[kind].module_cls
    skip = skip if kind == "latent_diffusion" else frozenset()
    cfg = _relocate_text_encoder(folder, cfg)
    module = skeleton(cfg, skip) if skip else getattr(cls, "from_config", cls)(cfg)  # LatentDiffusion: from its parts
    file = folder / EMA_WEIGHTS if ema and (folder / EMA_WEIGHTS).is_file() else folder / WEIGHTS
    if not file.is_file():
        raise LdmkitError(f"{folder} has no {WEIGHTS}; the checkpoint is incomplete, use an earlier one")
    load_weights(module, file, skip=("unet.",) if "unet" in skip else ())
    return (module if skip else module.to(device)).eval()  # meta tensors cannot move; skip is for the CPU only


def skeleton(cfg: LatentDiffusionConfig, skip: frozenset[str], autoencoder: nn.Module | None = None,
             unet: nn.Module | None = None) -> LatentDiffusion:
    """A LatentDiffusion of `cfg` whose `skip` parts ("unet", "text": a CLIP text model) are built on the meta
    device: their architecture without weights, neither initialised nor read, for a converted model that
    replaces them (`generation.openvino`). `autoencoder`, `unet`: parts already loaded; the others are built.
    `load_diffusers_pipeline` builds every model through it, with `skip` empty on a plain load."""
    from ldmkit.conditioning.conditioner import Conditioner
    from ldmkit.conditioning.text import build_text_encoder
    from ldmkit.unet import UNet

    if unet is None:
        with torch.device("meta") if "unet" in skip else contextlib.nullcontext():
            unet = UNet(cfg.unet)
    name = cfg.conditioner.text_encoder
    text = build_text_encoder(name, weights="text" not in skip) if name else None
    ae = autoencoder if autoencoder is not None else AutoencoderKL(cfg.autoencoder)
    return LatentDiffusion(ae, unet, Conditioner(cfg.conditioner, text), cfg).eval()


def _relocate_text_encoder(folder: Path, cfg: BaseModel) -> BaseModel:
    """A CLIP text encoder saved inside the checkpoint folder (FOLDER/text_encoder, written by
    `ldmkit convert`) is found again after the folder has moved."""
    if not isinstance(cfg, LatentDiffusionConfig):
        return cfg
    name = cfg.conditioner.text_encoder
    local = folder / "text_encoder"
    if (folder / "text_encoder_2").is_dir():  # SDXL's pair (text_encoder/ … tokenizer_2/): the folder names both
        local = folder
    if name not in (None, "minilm") and not Path(name).exists() and local.is_dir():
        cond = cfg.conditioner.model_copy(update={"text_encoder": str(local.resolve())})
        cfg = cfg.model_copy(update={"conditioner": cond})
    return cfg


def load_training_state(folder: Path) -> dict[str, Any]:
    file = folder / STATE
    if not file.is_file():
        raise LdmkitError(f"{folder} has no {STATE}, so it cannot be resumed; start a new run or pick a training checkpoint")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise LdmkitError(f"cannot read {file} ({type(e).__name__}); resume from an earlier checkpoint") from e


def load_control(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, LatentDiffusion, dict]:
    """(control network, its base LatentDiffusion, meta) from a `train-control` folder, whose meta names
    the base checkpoint folder (`meta["base"]`)."""
    folder, kind, _, meta = read_config(path)
    if kind not in ("controlnet", "adapter"):
        raise LdmkitError(f"{path} holds a '{kind}', not a ControlNet or adapter")
    base = meta.get("base")
    if not base:
        raise LdmkitError(f"{folder} does not name its base model (meta.base); pass the base with --checkpoint")
    net = load(folder, device=device)
    ldm = load(resolve(base), device=device)  # the native reader: a base is always a `ldmkit train` folder
    if not isinstance(ldm, LatentDiffusion):
        raise LdmkitError(f"{resolve(base)} holds a {type(ldm).__name__}, not a diffusion model; "
                          f"the base named in {folder / CONFIG} must be a `ldmkit train` folder")
    return net, ldm.eval().requires_grad_(False), meta


def sampling_defaults(path: str | Path) -> dict[str, Any]:
    """How a checkpoint asks to be sampled when the user does not say (`meta["sampling"]`: sampler, steps,
    guidance; `ldmkit distill` writes it, as a consistency student wants `lcm`, few steps and guidance 1),
    or {} when it says nothing or is not an ldmkit folder."""
    if not is_checkpoint(path):
        return {}
    try:
        return dict(read_config(path)[3].get("sampling") or {})
    except LdmkitError:
        return {}


def source_files(path: str | Path, config=None) -> list[Path] | None:
    """Every file the model at `path` (and a single file's `config` folder or file) is read from, or None where
    that is not known (a config given as an object, a path that is not there): what keys a converted model's
    cache (`generation.openvino.source_key`). A folder counts with everything under it (weights, configs,
    tokenizer; a diffusers pipeline's unused variants too, which costs a stat each); an ldmkit checkpoint also
    with a text encoder folder its config names outside it."""
    path = Path(path)
    if not path.exists() or (config is not None and not isinstance(config, (str, Path))):
        return None
    roots = [path]
    if is_checkpoint(path):
        folder = resolve(path)
        roots = [folder]
        try:
            name = json.loads((folder / CONFIG).read_text())["config"]["conditioner"]["text_encoder"]
        except (OSError, ValueError, KeyError, TypeError):
            name = None
        if name and name != "minilm" and Path(name).exists():
            roots.append(Path(name))
    if config is not None:
        if not Path(config).exists():
            return None
        roots.append(Path(config))
    files = set()
    for root in roots:
        root = root.resolve()
        files.update([root] if root.is_file() else (p for p in root.rglob("*") if p.is_file()))
    return sorted(files)


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` looks like an ldmkit checkpoint folder or training output folder (not another format)."""
    path = Path(path)
    if (path / "latest").is_file():
        return True
    try:
        return path.is_dir() and "kind" in json.loads((path / CONFIG).read_text())
    except (OSError, ValueError, TypeError):
        return False


def weights_sha256(path: str | Path) -> str | None:
    """sha256 of the weights a checkpoint holds (A1111 lists a model's file hash; its first 10 hex digits are
    the `Model hash:` of an image's parameters). An ldmkit folder: its EMA weights, else its weights; a
    single file: the file; None for a folder of another format (diffusers)."""
    path = Path(path)
    if is_checkpoint(path):
        folder = resolve(path)
        file = folder / EMA_WEIGHTS if (folder / EMA_WEIGHTS).is_file() else folder / WEIGHTS
    elif path.is_file():
        file = path
    else:
        return None
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
