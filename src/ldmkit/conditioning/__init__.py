"""Conditions and the routes that carry them into the U-Net.

- `cond`: the typed `Cond` every route travels in; `text`: frozen text encoders (cross-attention);
  `labels`: the class-label route; `conditioner`: raw batch → Cond with per-route dropout.
- `concat`: the concatenation route (inpainting, super-resolution).

ControlNet and the adapter moved to `ldmkit.control` (issue 28); their names are still found here so
code written before the move keeps working, but new code imports them from `ldmkit.control`.

Names are imported lazily: the U-Net reads `cond`, and importing it must load neither the text encoders
nor (through the old names) `ldmkit.control`, which is built on the U-Net.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Cond": "cond", "cat_conds": "cond",
    "Conditioner": "conditioner", "ConditionerConfig": "conditioner",
    "ConcatConfig": "concat",
}  # fmt: skip
# before issue 28 these lived in this package; kept as aliases for old user code (import ldmkit.control)
_MOVED = {"ControlNet", "ControlNetConfig", "MultiControlNet", "controlled_unet", "Adapter", "AdapterConfig",
          "prepare_control_image"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ldmkit.conditioning.{_EXPORTS[name]}"), name)
    if name in _MOVED:
        return getattr(importlib.import_module("ldmkit.control"), name)
    raise AttributeError(f"module 'ldmkit.conditioning' has no attribute {name!r}")
