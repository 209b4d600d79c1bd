"""Read colour, position and shape back from a `shapes`-style image: does a sample obey its caption?

This is the independent judge of conditional fidelity on the shapes data, so it deliberately
shares no code with `ldmkit.data.shapes`: its palette and vocabulary are written out again here
and it knows nothing about how the images were drawn. It only assumes one bright shape on a dark
background. On clean rendered shapes (32x32 and 64x64, any jitter) it is right 100% of the time.

The rules are simple image statistics:
- foreground = pixels whose brightest channel exceeds `FOREGROUND` (the background is black), kept
  to the largest 8-connected blob so specks of sampling noise do not move the centroid or bbox;
- colour = the palette entry nearest (Euclidean RGB) to the median colour of the *core* foreground,
  the pixels at least 3/4 as bright as the shape, so blended outline pixels do not pull it towards black;
- position = the quadrant holding the foreground centroid;
- shape = how much of its bounding box the foreground fills: square ~1, circle ~pi/4, triangle ~1/2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

from ldmkit.errors import LdmkitError

PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
}
SHAPE_NAMES = ("circle", "square", "triangle")
POSITION_NAMES = ("top left", "top right", "bottom left", "bottom right")

FOREGROUND = 80  # max-channel threshold (0..255): well above black, below every palette colour's ~1/3 coverage
MIN_PIXELS = 4  # fewer foreground pixels than this: nothing there
# Bounding-box fill thresholds between the ideal fills 1/2, pi/4 and 1, set midway between the extremes
# measured on clean renders at 32x32 (triangle <= 0.62, circle 0.70..0.86, square >= 0.97); below 32 pixels
# the pixel grid blurs the fills together and circles and triangles start to be confused.
SQUARE_ABOVE = 0.92
TRIANGLE_BELOW = 0.665

_CAPTION = re.compile(r"^an? (\w+) (\w+) in the (.+)$")


def _to_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 array, or (3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise LdmkitError(f"expected an image tensor of shape (3, H, W), got {tuple(image.shape)}")
        image = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise LdmkitError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return image


def check_attributes(image) -> dict[str, str | None]:
    """Colour, position and shape of the one shape in `image`; all None when the image is (nearly) black."""
    image = _to_uint8(image)
    h, w, _ = image.shape
    brightness = image.max(axis=2)  # (H, W)
    blobs, n = ndimage.label(brightness > FOREGROUND, structure=np.ones((3, 3)))
    if n == 0:
        return {"colour": None, "position": None, "shape": None}
    sizes = np.bincount(blobs.ravel())[1:]  # pixels per blob, background excluded
    fg = blobs == 1 + int(sizes.argmax())  # (H, W) largest blob
    if fg.sum() < MIN_PIXELS:
        return {"colour": None, "position": None, "shape": None}

    # Colour: median of the pixels close to full brightness (interior), then nearest palette entry.
    core = fg & (brightness >= 0.75 * np.percentile(brightness[fg], 90))
    median = np.median(image[core].astype(np.float32), axis=0)  # (3,)
    names = list(PALETTE)
    dist = np.linalg.norm(np.asarray(list(PALETTE.values()), np.float32) - median, axis=1)
    colour = names[int(dist.argmin())]

    # Position: quadrant of the centroid (pixel centres at i + 0.5).
    ys, xs = np.nonzero(fg)
    top, left = ys.mean() + 0.5 < h / 2, xs.mean() + 0.5 < w / 2
    position = f"{'top' if top else 'bottom'} {'left' if left else 'right'}"

    # Shape: fraction of the bounding box covered.
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(ys) / box
    shape = "square" if fill > SQUARE_ABOVE else "triangle" if fill < TRIANGLE_BELOW else "circle"
    return {"colour": colour, "position": position, "shape": shape}


def parse_caption(text: str) -> tuple[str, str, str]:
    """'a red circle in the top left' -> (colour, shape, position); LdmkitError if it is not such a caption."""
    match = _CAPTION.match(" ".join(text.lower().split()))
    if not match or match[1] not in PALETTE or match[2] not in SHAPE_NAMES or match[3] not in POSITION_NAMES:
        raise LdmkitError(
            f"cannot score caption {text!r}: attribute scoring needs 'a {{colour}} {{shape}} in the {{position}}' "
            "captions from the shapes vocabulary"
        )
    return match[1], match[2], match[3]


def score_captions(images: Iterable | torch.Tensor, captions: Sequence[str]) -> dict[str, float | int]:
    """Fraction of images whose colour / position / shape (and all three) match their caption.

    `images`: a (N, 3, H, W) tensor in [-1, 1], or a sequence of (3, H, W) tensors or uint8 (H, W, 3) arrays.
    """
    images = list(images)
    if len(images) != len(captions):
        raise LdmkitError(f"got {len(images)} images but {len(captions)} captions; pass one caption per image")
    hits = {"colour": 0, "position": 0, "shape": 0, "all": 0}
    for image, text in zip(images, captions, strict=True):
        colour, shape, position = parse_caption(text)
        found = check_attributes(image)
        ok = {"colour": found["colour"] == colour, "position": found["position"] == position,
              "shape": found["shape"] == shape}
        for key, value in ok.items():
            hits[key] += value
        hits["all"] += all(ok.values())
    n = len(images)
    return {**{key: (value / n if n else 0.0) for key, value in hits.items()}, "n": n}
