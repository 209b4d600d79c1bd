"""Aspect-ratio bucketing (NovelAI 2022; SDXL, Podell et al. 2023, §2.3): train on whole images, not squares.

A square crop of a 2:1 landscape throws half of it away and teaches the model that subjects are cut at
the edges. Instead each image goes to the bucket — a resolution of about the training area size² — whose
aspect ratio is nearest its own (in log ratio), is resized to cover it and cut to it, and every batch is
drawn from one bucket, so a batch is one tensor.

The order stays a pure function of (seed, step), so a resumed run is exact: epoch e shuffles each
bucket's items, cuts them into whole batches (a bucket's remainder waits for the next epoch's shuffle),
and shuffles the batches of all buckets together; step k is batch k mod (batches per epoch) of epoch
k div (batches per epoch).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ldmkit.errors import LdmkitError


def make_buckets(size: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) pairs of about size² pixels, both sides multiples of `multiple`, from
    1:max_ratio to max_ratio:1 (size x size among them)."""
    if size % multiple:
        raise LdmkitError(f"data.size {size} is not a multiple of {multiple}, the side step of the buckets")
    out = {(size, size)}
    w = size
    while True:
        w += multiple
        h = max(multiple, round(size * size / w / multiple) * multiple)
        if w / h > max_ratio:
            break
        out |= {(h, w), (w, h)}
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def nearest(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest width/height, in log ratio."""
    r = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - r))


class BucketOrder:
    """Step -> (bucket, item indices) of the global batch, as the module docstring says."""

    def __init__(self, assignment: list[int], num_buckets: int, batch_size: int, seed: int):
        self.groups = [[] for _ in range(num_buckets)]
        for item, bucket in enumerate(assignment):
            self.groups[bucket].append(item)
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = sum(len(g) // batch_size for g in self.groups)
        if self.per_epoch == 0:
            biggest = max(len(g) for g in self.groups)
            raise LdmkitError(f"no aspect-ratio bucket holds a whole batch of {batch_size} (the fullest holds {biggest}); "
                              "lower optim.batch_size or turn data.buckets off")

    @lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> list[tuple[int, list[int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for b, items in enumerate(self.groups):
            perm = torch.randperm(len(items), generator=g).tolist()
            for k in range(len(items) // self.batch_size):
                batches.append((b, [items[i] for i in perm[k * self.batch_size : (k + 1) * self.batch_size]]))
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def __call__(self, step: int) -> tuple[int, list[int]]:
        epoch, k = divmod(step, self.per_epoch)
        return self._epoch(epoch)[k]
