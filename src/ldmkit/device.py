"""Where and in which precision a model runs: one choice for training and sampling alike."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ldmkit.errors import LdmkitError


def _setting(name: str, value: str) -> str:
    """How a user writes `name` = `value`: `optim.device=cpu` in a config, `--device cpu` on the CLI."""
    return f"{name}={value}" if name.startswith("optim.") else f"{name} {value}"


# CPU flags of native bfloat16 arithmetic: AVX512-BF16 (dot products of bf16 pairs, Cooper Lake / Zen 4 on)
# and AMX-BF16 (tile matrix multiply, Sapphire Rapids on). Without them bf16 is emulated and slower than fp32.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool(set(BF16_FLAGS) & (cpu_flags() if flags is None else flags))


def resolve_precision(precision: str, device: torch.device | str = "cpu", flags: set[str] | None = None) -> str:
    """`auto` → bf16 on a CPU with native bf16 (`native_bf16`), else fp32 (CUDA included: its behaviour is
    unchanged, fp32 unless asked); any other choice is returned as it is."""
    if precision != "auto":
        return precision
    return "bf16" if torch.device(device).type == "cpu" and native_bf16(flags) else "fp32"


def autocast(precision: str, device: torch.device | str = "cpu", setting: str = "optim.precision"):
    """The forward pass's autocast: weights, gradients and optimizer state stay float32 either way.
    Refused at once (when called, not when entered) where the device cannot run it; `setting` names
    the option in that error. `auto`: `resolve_precision`."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
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
