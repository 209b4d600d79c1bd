"""Pre-processing shared by every image source (folders, tar shards, Hugging Face datasets).

    resize:  the shorter side to `size` (bicubic), the aspect ratio kept
    crop:    a size x size square, at the centre or (training) at a random place drawn from a generator
             the caller seeds, so an item's crop is a function of (seed, step, row) and a resumed run
             repeats the uninterrupted one's crops exactly

The original size and the crop's top-left corner are recorded per item, as SDXL's micro-conditioning
(Podell et al. 2023, §2.2) takes them: (original height, original width, crop top, crop left).
Horizontal flips are drawn by the training loops on the batch (`data.hflip`), so every source flips alike.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB (W, H) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


def crop_box(width: int, height: int, size: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a size x size square in a (width, height) image: centred without a
    generator, uniformly placed with one."""
    if generator is None:
        left, top = (width - size) // 2, (height - size) // 2
    else:
        left = int(torch.randint(width - size + 1, (), generator=generator))
        top = int(torch.randint(height - size + 1, (), generator=generator))
    return left, top, left + size, top + size


def resized_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side `size`; never below `size` on either side."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def resize_crop(image: Image.Image, size: int, generator: torch.Generator | None = None,
                companion: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(image (3, size, size) in [-1, 1], the companion cut the same way or None, [orig_h, orig_w, top, left]).

    `companion` (a conditioning image) is stretched to the image's resized shape first, then cut with the
    same box, so a map drawn on the image stays registered with it whatever its own size."""
    w, h = image.size
    resized = resized_shape(w, h, size)
    box = crop_box(*resized, size, generator)
    out = to_tensor(image.resize(resized, Image.BICUBIC, reducing_gap=2.0).crop(box))
    comp = None
    if companion is not None:
        comp = to_tensor(companion.resize(resized, Image.BICUBIC, reducing_gap=2.0).crop(box))
    return out, comp, [h, w, box[1], box[0]]


def item_seed(seed: int, step: int, row: int) -> int:
    """The seed of one item's augmentation at row `row` of step `step`'s global batch: independent of how
    many processes and workers share the batch, so the crops do not depend on the machine."""
    return ((seed * 1_000_003 + step) * 65_537 + row) % (1 << 63)
