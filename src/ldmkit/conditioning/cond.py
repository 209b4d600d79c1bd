"""`Cond`: every condition of a batch in one typed object, routed by kind (DESIGN: conditions travel
as one object, never as keyword lists that each consumer unpacks by hand).

| field          | route                                  | U-Net entry point            |
| -------------- | -------------------------------------- | ---------------------------- |
| context (+mask)| cross-attention on tokens              | transformer blocks (K, V)    |
| labels         | class embedding added to time embedding| every ResBlock (add / FiLM)  |
| vector         | MLP(vector) added to time embedding    | every ResBlock (add / FiLM)  |
| concat         | channel concatenation                  | conv_in input channels       |
| control        | ControlNet hint image(s), read by the ControlNet (`controlled_unet`), never by the U-Net |
| down_residuals / mid_residual | ControlNet output       | skip connections / middle    |
| adapter_residuals | T2I-Adapter output                  | end of each encoder level    |
| guidance       | guidance scale of a w-embedded student (LCM)| time embedding (w-embedding)|

The U-Net and the ControlNet take a Cond (`unet(x, t, cond)`); keyword routes
(`unet(x, t, context=..., class_labels=...)`) are folded into one by `Cond.of`, so every consumer
reads the same fields and a new route is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

# The U-Net's (and diffusers') keyword for the label route.
_ALIASES = {"class_labels": "labels"}


@dataclass
class Cond:
    context: torch.Tensor | None = None  # (B, M, D)
    context_mask: torch.Tensor | None = None  # (B, M) bool, True = real token
    labels: torch.Tensor | None = None  # (B,) long; index num_classes is the null class
    vector: torch.Tensor | None = None  # (B, D) global vector (pooled caption, scalars) → time embedding
    concat: torch.Tensor | None = None  # (B, C, h, w) at latent resolution
    control: torch.Tensor | list[torch.Tensor] | None = None  # (B, C_hint, f·h, f·w) in [0, 1]; a list for several nets
    down_residuals: list[torch.Tensor] | None = None
    mid_residual: torch.Tensor | None = None
    adapter_residuals: list[torch.Tensor] | None = None  # one per U-Net level
    guidance: torch.Tensor | None = None  # (B,) float: the guidance scale a w-embedded student takes as input

    @classmethod
    def of(cls, cond: Cond | None = None, **routes) -> Cond:
        """`cond` (or an empty Cond) with the keyword routes set; `class_labels` is accepted for `labels`.
        An unknown keyword is a TypeError, as for any function."""
        if cond is not None and not isinstance(cond, Cond):
            raise TypeError(f"the condition must be a Cond (or keyword routes such as context=), got {type(cond).__name__}")
        if not routes:
            return cond if cond is not None else cls()
        names = {f.name for f in fields(cls)}
        update = {}
        for k, v in routes.items():
            k = _ALIASES.get(k, k)
            if k not in names:
                raise TypeError(f"unknown condition {k!r}; the routes are {', '.join(sorted(names | set(_ALIASES)))}")
            update[k] = v
        return replace(cond if cond is not None else cls(), **update)

    def plus_residuals(self, down: list[torch.Tensor] | None = None, mid: torch.Tensor | None = None,
                       adapter: list[torch.Tensor] | None = None) -> Cond:
        """This Cond with control residuals added to those it already carries (several control routes at once)."""

        def add(old, new):
            if new is None or old is None:
                return old if new is None else new
            return [a + b for a, b in zip(old, new, strict=True)] if isinstance(new, list) else old + new

        return replace(self, down_residuals=add(self.down_residuals, down), mid_residual=add(self.mid_residual, mid),
                       adapter_residuals=add(self.adapter_residuals, adapter))

    def _map(self, fn) -> Cond:
        def one(v):
            if isinstance(v, torch.Tensor):
                return fn(v)
            if isinstance(v, list):
                return [fn(t) for t in v]
            return v

        return replace(self, **{f.name: one(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str) -> Cond:
        return self._map(lambda t: t.to(device))

    def repeat(self, n: int) -> Cond:
        """Each entry repeated n times along the batch (several samples per prompt)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))


def cat_conds(a: Cond, b: Cond) -> Cond:
    """Concatenate two Conds along the batch, padding token sequences to a common length, so the
    conditional and unconditional branches of guidance can run as one batch."""
    out = {}
    for f in fields(Cond):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is None and y is None:
            out[f.name] = None
            continue
        if x is None or y is None:
            raise ValueError(f"cannot batch a Cond with and without {f.name}")
        if f.name in ("context", "context_mask") and x.shape[1] != y.shape[1]:
            m = max(x.shape[1], y.shape[1])
            pad = (lambda t: F.pad(t, (0, 0, 0, m - t.shape[1]))) if f.name == "context" else (lambda t: F.pad(t, (0, m - t.shape[1])))
            x, y = pad(x), pad(y)
        if isinstance(x, list):
            out[f.name] = [torch.cat([p, q]) for p, q in zip(x, y)]
        else:
            out[f.name] = torch.cat([x, y])
    return Cond(**out)
