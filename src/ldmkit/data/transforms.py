"""Pre-processing shared by every image source (folders, tar shards, Hugging Face datasets).

    resize:  the shorter side to `size` (bicubic), the aspect ratio kept
    crop:    a size x size square, at the centre or (training) at a random place drawn from a generator
             the caller seeds, so an item's crop is a function of (seed, step, row) and a resumed run
             repeats the uninterrupted one's crops exactly

The original size and the crop's top-left corner are recorded per item, as SDXL's micro-conditioning
(Podell et al. 2023, §2.2) takes them: (original height, original width, crop top, crop left).
Horizontal flips are drawn by the training loops on the batch (`data.hflip`), so every source flips alike.

A loss mask (`data.mask`) is cut with the image's own box (`crop_mask`), from the record above, so it
stays registered with the pixels it weights. Caption tags (`TagRule`: kohya's `shuffle_caption`,
`keep_tokens`, `caption_tag_dropout_rate`) are drawn per (seed, step, row) like the crops.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def alpha_of(image: Image.Image) -> Image.Image | None:
    """The alpha channel of a decoded image as an 8-bit "L" image, or None for an opaque mode. Read before
    `imageio.to_rgb` flattens the pixels onto white: the pixels keep that, the mask keeps the alpha."""
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("LA", "PA", "La", "RGBa", "RGBA"):
        return image.convert("RGBA").getchannel("A")
    return None


def crop_mask(mask: Image.Image | None, record: list[int], size: int | tuple[int, int]) -> torch.Tensor:
    """A loss mask (1, H, W) in [0, 1], cut as `resize_crop` cut the image whose record ([orig_h, orig_w, top,
    left]) is given; None is all ones (every pixel trains). A mask of another size than its image is
    stretched to the image's resized shape first, as a conditioning image is. Bilinear, not bicubic:
    bicubic overshoots outside [0, 1] at a hard mask edge."""
    th, tw = (size, size) if isinstance(size, int) else size
    if mask is None:
        return torch.ones(1, th, tw)
    h, w, top, left = record
    resized = resized_shape(w, h, size)
    cut = mask.convert("L").resize(resized, Image.BILINEAR, reducing_gap=2.0).crop((left, top, left + tw, top + th))
    return torch.from_numpy(np.asarray(cut, dtype=np.float32) / 255.0)[None]  # (1, H, W)


def fill_unmasked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`image` (C, H, W) with every pixel the loss mask (1, H, W) leaves out (mask 0) set to the nearest pixel
    it keeps (mask > 0); unchanged where the mask keeps all or nothing.

    A masked loss weighs latent cells, but the encoder's receptive field reaches past a cell: unmasked content
    next to the masked area (noise, a cluttered background) leaks into the latents that do train. Measured on
    `shapes` with uniform noise outside a 2-pixel margin (benchmarks/masked_loss.py): masked training left
    those latents so wrong that samples lost their colour (48 % against 100 % for clean training). Extending
    the masked content outwards (the "edge" padding of an arbitrary region) gives the encoder nothing to leak;
    the pixels it replaces are the ones the loss ignores anyway."""
    keep = mask[0] > 0  # (H, W)
    if bool(keep.all()) or not bool(keep.any()):
        return image
    from scipy import ndimage

    _, (iy, ix) = ndimage.distance_transform_edt(~keep.numpy(), return_indices=True)  # nearest kept pixel
    return image[:, torch.from_numpy(iy), torch.from_numpy(ix)]


TAGS_STREAM = 0x5DEECE66D  # keeps tag draws apart from the crop draws of the same (seed, step, row)


@dataclass(frozen=True)
class TagRule:
    """kohya's caption handling, drawn per item from (seed, step, row) so `--resume` repeats it exactly.

    A caption is a comma-separated list of tags. The first `keep_tokens` stay first and in order (kohya's
    `keep_tokens`: typically the trigger word); each later tag is left out with probability `dropout`
    (kohya's `caption_tag_dropout_rate`), and with `shuffle` the rest are permuted (kohya's
    `shuffle_caption`). Tags are stripped and rejoined with ", " as kohya does. Caption dropout (the whole
    caption to "", for classifier-free guidance) stays the conditioner's `drop_text`, drawn from the
    step's generator."""

    seed: int = 0
    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout > 0

    def __call__(self, text: str, step: int, row: int) -> str:
        """The caption of global row `row` at step `step` (unchanged, byte for byte, when inactive)."""
        if not self.active or not text:
            return text
        tags = [t.strip() for t in text.split(",")]
        tags = [t for t in tags if t]
        head, tail = tags[: self.keep_tokens], tags[self.keep_tokens :]
        g = torch.Generator().manual_seed(item_seed(self.seed, step, row) ^ TAGS_STREAM)
        if self.dropout > 0:
            keep = (torch.rand(len(tail), generator=g) >= self.dropout).tolist()
            tail = [t for t, k in zip(tail, keep) if k]
        if self.shuffle:
            tail = [tail[i] for i in torch.randperm(len(tail), generator=g).tolist()]
        return ", ".join(head + tail)
