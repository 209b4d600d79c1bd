"""The class-label route: ids → the U-Net's label embedding, added to the time embedding (DESIGN table).

Index `num_classes` is the null class: -1 ("no label") maps to it, and classifier-free guidance trains
it by dropping labels with probability p (Ho & Salimans, 2022), as DiT's `LabelEmbedder.token_drop`.
"""

from __future__ import annotations

import torch

from ldmkit.errors import LdmkitError
from ldmkit.rng import BatchRandom


def label_condition(labels: torch.Tensor | None, num_classes: int, n: int, drop: float = 0.0,
                    generator: torch.Generator | BatchRandom | None = None,
                    force_null: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) long labels in [0, num_classes], num_classes = null; None → all null; each dropped to null
    with probability `drop` (training), and those where `force_null` (n,) bool is set (the Conditioner's drop_all)."""
    null = num_classes
    if labels is None:
        labels = torch.full((n,), -1, dtype=torch.long)  # no label: the null class, below
    labels = labels.long().clone()
    if ((labels < -1) | (labels >= null)).any():  # num_classes itself is the null class, not a label
        raise LdmkitError(f"class labels must be in 0..{null - 1} (or -1 for none), got {labels.tolist()}")
    labels[labels < 0] = null
    if drop > 0:
        dropped = (BatchRandom.of(generator, n).rand() < drop).cpu()
        labels[dropped] = null
    if force_null is not None:
        labels[force_null.cpu()] = null
    return labels
