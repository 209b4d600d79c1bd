"""Where and in which precision a model runs: one choice for training and sampling alike."""

from __future__ import annotations

import contextlib

import torch

from ldmkit.errors import LdmkitError


def _setting(name: str, value: str) -> str:
    """How a user writes `name` = `value`: `optim.device=cpu` in a config, `--device cpu` on the CLI."""
    return f"{name}={value}" if name.startswith("optim.") else f"{name} {value}"


def autocast(precision: str, device: torch.device | str = "cpu", setting: str = "optim.precision"):
    """The forward pass's autocast: weights, gradients and optimizer state stay float32 either way.
    Refused at once (when called, not when entered) where the device cannot run it; `setting` names
    the option in that error."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type != "cuda":
            raise LdmkitError(f"{_setting(setting, 'fp16')} needs a CUDA device, not {device.type} "
                              f"(there use {_setting(setting, 'bf16')} or fp32)")
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def pick_device(name: str, setting: str = "optim.device") -> torch.device:
    """`auto` → CUDA when available, else CPU; a named device is checked. `setting` names the option in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LdmkitError(f"{setting} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LdmkitError(f"{setting} is {name} but no CUDA device is available; use {_setting(setting, 'cpu')}")
    return dev
