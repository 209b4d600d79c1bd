"""`Cond`: every condition of a batch in one typed object, routed by kind (DESIGN.md).

| field          | route                                  | U-Net entry point            |
| -------------- | -------------------------------------- | ---------------------------- |
| context (+mask)| cross-attention on tokens              | transformer blocks (K, V)    |
| labels         | class embedding added to time embedding| every ResBlock (add / FiLM)  |
| vector         | MLP(vector) added to time embedding    | every ResBlock (add / FiLM)  |
| concat         | channel concatenation                  | conv_in input channels       |
| down_residuals / mid_residual | ControlNet              | skip connections / middle    |
| adapter_residuals | T2I-Adapter                         | end of each encoder level    |

The U-Net never inspects a batch; the Conditioner builds a Cond and `unet_kwargs()` maps it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F


@dataclass
class Cond:
    context: torch.Tensor | None = None  # (B, M, D)
    context_mask: torch.Tensor | None = None  # (B, M) bool, True = real token
    labels: torch.Tensor | None = None  # (B,) long; index num_classes is the null class
    vector: torch.Tensor | None = None  # (B, D) global vector (pooled caption, scalars) → time embedding
    concat: torch.Tensor | None = None  # (B, C, h, w) at latent resolution
    down_residuals: list[torch.Tensor] | None = None
    mid_residual: torch.Tensor | None = None
    adapter_residuals: list[torch.Tensor] | None = None  # one per U-Net level

    def unet_kwargs(self) -> dict:
        return {
            "context": self.context,
            "context_mask": self.context_mask,
            "class_labels": self.labels,
            "vector": self.vector,
            "concat": self.concat,
            "down_residuals": self.down_residuals,
            "mid_residual": self.mid_residual,
            "adapter_residuals": self.adapter_residuals,
        }

    def to(self, device: torch.device | str) -> "Cond":
        def mv(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, list):
                return [t.to(device) for t in v]
            return v

        return replace(self, **{f.name: mv(getattr(self, f.name)) for f in fields(self)})

    def repeat(self, n: int) -> "Cond":
        """Each entry repeated n times along the batch (several samples per prompt)."""

        def rep(v):
            if isinstance(v, torch.Tensor):
                return v.repeat_interleave(n, dim=0)
            if isinstance(v, list):
                return [t.repeat_interleave(n, dim=0) for t in v]
            return v

        return replace(self, **{f.name: rep(getattr(self, f.name)) for f in fields(self)})


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
