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


def crop_box(width: int, height: int, size: int | tuple[int, int], generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a box of `size` (a side, or (height, width)) in a (width, height) image:
    centred without a generator, uniformly placed with one."""
    th, tw = (size, size) if isinstance(size, int) else size
    if generator is None:
        left, top = (width - tw) // 2, (height - th) // 2
    else:
        left = int(torch.randint(width - tw + 1, (), generator=generator))
        top = int(torch.randint(height - th + 1, (), generator=generator))
    return left, top, left + tw, top + th


def resized_shape(width: int, height: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) scaled to cover `size` (a side: the shorter side becomes it; or (height, width))."""
    th, tw = (size, size) if isinstance(size, int) else size
    scale = max(tw / width, th / height)
    return max(tw, round(width * scale)), max(th, round(height * scale))


def resize_crop(image: Image.Image, size: int | tuple[int, int], generator: torch.Generator | None = None,
                companion: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(image (3, H, W) in [-1, 1], the companion cut the same way or None, [orig_h, orig_w, top, left]).

    `size` is a side (a square) or a (height, width) bucket. `companion` (a conditioning image) is stretched
    to the image's resized shape first, then cut with the same box, so a map drawn on the image stays
    registered with it whatever its own size."""
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
