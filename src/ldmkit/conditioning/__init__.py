"""Conditions and the routes that carry them into the U-Net.

- `cond`: the typed `Cond` every route travels in; `text`: frozen text encoders (cross-attention);
  `labels`: the class-label route; `conditioner`: raw batch → Cond with per-route dropout.
- `concat`: the concatenation route (inpainting, super-resolution).
- `controlnet`, `adapter`, `control_image`: spatial control of a frozen U-Net.

Names are imported lazily: `cond` sits below the U-Net (which reads it) while `controlnet` and
`adapter` sit above it (they are built from one), so the package itself must not import them all.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Cond": "cond", "cat_conds": "cond",
    "Conditioner": "conditioner", "ConditionerConfig": "conditioner",
    "ConcatConfig": "concat",
    "ControlNet": "controlnet", "ControlNetConfig": "controlnet", "MultiControlNet": "controlnet",
    "controlled_unet": "controlnet",
    "Adapter": "adapter", "AdapterConfig": "adapter",
    "prepare_control_image": "control_image",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ldmkit.conditioning.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ldmkit.conditioning' has no attribute {name!r}")
