"""A dataset held in memory as stacked tensors, for the training loops and the evaluations.

Small datasets (all the built-in ones) are rendered once into memory as stacked tensors: on a
2-core CPU, per-item Python work in a DataLoader would otherwise compete with the model for the
same cores. The step-indexed order of `ldmkit.train.loop.batch_indices` then makes resuming exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldmkit.errors import LdmkitError


@dataclass
class TensorData:
    """A dataset held as tensors. `images` (N, 3, H, W) in [-1, 1]; the rest optional."""

    images: torch.Tensor
    labels: torch.Tensor  # (N,) long, -1 where unlabelled
    texts: list[str]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # "mask", "edge", "control", "loss_mask", ...

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, idx: torch.Tensor) -> dict:
        out = {"image": self.images[idx], "label": self.labels[idx], "text": [self.texts[i] for i in idx.tolist()]}
        out.update({k: v[idx] for k, v in self.extras.items()})
        return out


def materialize(ds: Dataset, limit: int | None = None, desc: str = "loading data", progress: bool = True) -> TensorData:
    n = len(ds) if limit is None else min(limit, len(ds))
    images, labels, texts = [], [], []
    extras: dict[str, list[torch.Tensor]] = {}
    for i in tqdm(range(n), desc=desc, disable=not progress or n < 500, leave=False):
        item = ds[i]
        images.append(item["image"])
        labels.append(int(item.get("label", -1)))
        texts.append(item.get("text", ""))
        for k in ("mask", "edge", "control", "loss_mask"):
            if k in item:
                extras.setdefault(k, []).append(item[k])
    return TensorData(
        images=torch.stack(images),
        labels=torch.tensor(labels, dtype=torch.long),
        texts=texts,
        extras={k: torch.stack(v) for k, v in extras.items() if len(v) == n},
    )


def control_maps(data: TensorData, which: str, dataset: str) -> torch.Tensor:
    """(N, C, H, W) control images in [0, 1] from the materialised data."""
    if which not in data.extras:
        have = ", ".join(sorted(data.extras)) or "none"
        raise LdmkitError(f"dataset '{dataset}' has no '{which}' maps (it has: {have}); shapes has edge and mask, "
                          "an image folder has control from metadata.jsonl's conditioning_image")
    maps = data.extras[which].float()
    return (maps + 1) / 2 if maps.min() < 0 else maps  # folder control images come in [-1, 1]
