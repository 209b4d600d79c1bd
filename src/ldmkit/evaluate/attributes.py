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
- shape, by two rotation-invariant fills (shapes may be turned by any angle):
  the fill of the smallest-area rectangle around the foreground (over all orientations): square ~1,
  circle pi/4, triangle 1/2 — below TRIANGLE_BELOW it is a triangle; otherwise the fill of the disc
  around the centroid through the farthest pixel tells circle (~1) from square (2/pi).

The extended vocabulary (`vocabulary="extended"`; shapes' `data.vocabulary: extended`, upright shapes
only) adds the colour white (240, 240, 240) to the palette and the shape diamond (|dx| + |dy| <= r):
about half of its upright bounding box filled, like the upright triangle, but symmetric top-to-bottom
(the mask and its upside-down mirror overlap almost wholly; a triangle's overlap is about 1/3). A
diamond is a square turned by 45 degrees, so this judge needs shapes drawn upright.

Strict shape (`shape_fidelity`, issue 31). The rules above say which class a shape is closest to, so a
square with pinched sides or rounded corners still reads as a square. The strict measure asks whether
the shape is drawn right: the ideal shape the caption names (the dataset's geometry, written out again
here: a disc; a square; the triangle with base = height; the diamond |dx| + |dy| <= r) is fitted to the
sample, centred on the foreground's centroid, scaled to its area and turned to the best angle, and

- IoU: the soft IoU sum(min(c, q)) / sum(max(c, q)) of the sample's per-pixel coverage c (brightness over
  the shape's own) with the ideal's coverage q (8x8 sub-samples per pixel): blur, lumps, pinching;
- solidity: the area inside the sample's sub-pixel outline (the 1/2 contour of c) over its convex
  hull's: concave, pinched sides;
- corners (polygons): how much of the ideal's corner regions (within 1/4 of the side of each vertex)
  the sample covers, sum(min(c, q_corner)) / sum(q_corner): rounded corners;

and the shape passes when the class above is right and all three clear STRICT_IOU, STRICT_SOLIDITY and
STRICT_CORNERS, set on clean renders and degraded ones (tests/test_attributes.py; docs/shape-judge.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import find_contours

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
EXTENDED_PALETTE = {**PALETTE, "white": (240, 240, 240)}
EXTENDED_SHAPE_NAMES = (*SHAPE_NAMES, "diamond")
VOCABULARIES = ("basic", "extended")
POSITION_NAMES = ("top left", "top right", "bottom left", "bottom right")

FOREGROUND = 80  # max-channel threshold (0..255): well above black, below every palette colour's ~1/3 coverage
MIN_PIXELS = 4  # fewer foreground pixels than this: nothing there
# Thresholds set on clean renders (3,000 each, radius 0.12-0.30 of the side, any angle, and the fixed
# layout): rectangle fill triangle <= 0.68 < circle >= 0.73; disc fill circle >= 0.946 > square <= 0.93 at
# 32x32 (the extremes are the smallest shapes, ~4 px radius). Right on 100 % of clean renders at 32 and
# 64 px in the fixed layout and 99.9 % in the free one at 32 px; at 16 px the grid blurs the fills together.
TRIANGLE_BELOW = 0.69
CIRCLE_ABOVE = 0.91
# Extended vocabulary, set on clean upright renders (200 each at 32 and 64 px, fixed-layout jitter): upright-
# box fill diamond 0.49-0.67 and triangle 0.50-0.62 < circle >= 0.72 (square ~1); top-bottom mirror overlap
# diamond >= 0.75 > triangle <= 0.44.
HALF_BOX_BELOW = 0.69
SYMMETRIC_ABOVE = 0.6
_ANGLES = np.deg2rad(np.arange(0.0, 90.0, 2.0))  # rectangle orientations tried (a 2-degree grid)

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


def _vocabulary(name: str) -> tuple[dict[str, tuple[int, int, int]], tuple[str, ...]]:
    if name not in VOCABULARIES:
        raise LdmkitError(f"unknown vocabulary {name!r}: use one of {', '.join(VOCABULARIES)}")
    return (PALETTE, SHAPE_NAMES) if name == "basic" else (EXTENDED_PALETTE, EXTENDED_SHAPE_NAMES)


def check_attributes(image, vocabulary: str = "basic") -> dict[str, str | None]:
    """Colour, position and shape of the one shape in `image`; all None when the image is (nearly) black.
    `vocabulary="extended"` also knows white and diamond (see the module docstring)."""
    palette, _ = _vocabulary(vocabulary)
    image = _to_uint8(image)
    h, w, _ = image.shape
    brightness = image.max(axis=2)  # (H, W)
    fg = _largest_blob(brightness)  # (H, W) bool
    if fg is None:
        return {"colour": None, "position": None, "shape": None}

    # Colour: median of the pixels close to full brightness (interior), then nearest palette entry.
    core = _core(fg, brightness)
    median = np.median(image[core].astype(np.float32), axis=0)  # (3,)
    names = list(palette)
    dist = np.linalg.norm(np.asarray(list(palette.values()), np.float32) - median, axis=1)
    colour = names[int(dist.argmin())]

    # Position: quadrant of the centroid (pixel centres at i + 0.5).
    ys, xs = np.nonzero(fg)
    top, left = ys.mean() + 0.5 < h / 2, xs.mean() + 0.5 < w / 2
    position = f"{'top' if top else 'bottom'} {'left' if left else 'right'}"

    shape = "diamond" if vocabulary == "extended" and _is_diamond(fg, ys, xs) else _shape(ys, xs)
    return {"colour": colour, "position": position, "shape": shape}


def _largest_blob(brightness: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected blob of pixels brighter than FOREGROUND, (H, W) bool; None when it has fewer
    than MIN_PIXELS pixels (nothing there)."""
    blobs, n = ndimage.label(brightness > FOREGROUND, structure=np.ones((3, 3)))
    if n == 0:
        return None
    sizes = np.bincount(blobs.ravel())[1:]  # pixels per blob, background excluded
    fg = blobs == 1 + int(sizes.argmax())  # (H, W) largest blob
    return fg if fg.sum() >= MIN_PIXELS else None


def _core(fg: np.ndarray, brightness: np.ndarray) -> np.ndarray:
    """The shape's interior: its pixels at least 3/4 as bright as its 90th percentile (not the blended rim)."""
    return fg & (brightness >= 0.75 * np.percentile(brightness[fg], 90))


def _is_diamond(fg: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> bool:
    """About half of the upright box filled and the same upside down (unlike the upright triangle)."""
    box = fg[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]  # (h, w) upright bounding box
    if box.mean() >= HALF_BOX_BELOW:
        return False
    overlap = (box & box[::-1]).sum() / (box | box[::-1]).sum()  # IoU with the top-bottom mirror image
    return bool(overlap > SYMMETRIC_ABOVE)


def _shape(ys: np.ndarray, xs: np.ndarray) -> str:
    """circle / square / triangle from the foreground pixels' coordinates (see the module docstring)."""
    n = len(ys)
    c, s = np.cos(_ANGLES)[:, None], np.sin(_ANGLES)[:, None]
    u, v = xs[None] * c + ys[None] * s, ys[None] * c - xs[None] * s  # (angles, n) rotated coordinates
    rect_fill = n / ((np.ptp(u, axis=1) + 1) * (np.ptp(v, axis=1) + 1)).min()  # +1: pixels have unit width
    if rect_fill < TRIANGLE_BELOW:
        return "triangle"
    reach = np.hypot(ys - ys.mean(), xs - xs.mean()).max()
    disc_fill = n / (np.pi * max(reach, 0.5) ** 2)
    return "circle" if disc_fill > CIRCLE_ABOVE else "square"


# --- strict shape (issue 31): the caption's ideal shape fitted to the sample ---------------------------------

# Set on clean renders and degraded ones (tests/test_attributes.py; the table in docs/shape-judge.md). The
# dataset's renders (32 and 64 px, both layouts, any angle) score IoU >= 0.963, solidity >= 0.958, corners >=
# 0.956; blurred (σ = 3 % of the side) IoU <= 0.900, lumpy circles (radius ± 10 %) IoU <= 0.895, pinched sides
# (midpoints pulled in by 6 % of the side) solidity <= 0.943, rounded corners (radius 0.3 r) corners <= 0.938.
STRICT_IOU = 0.92
STRICT_SOLIDITY = 0.95
STRICT_CORNERS = 0.945
_SUB = 8  # sub-samples per pixel side for the ideal's coverage
_CORNER_REACH = 0.5  # corner region: within this distance of a vertex, in the ideal's units (a square's side is 2)

# Ideal shapes centred on their centroid, in units where the square's half-side, the disc's radius and the
# triangle's and diamond's half-width are 1; y points down, angle 0 is upright (the triangle's apex up).
# (vertices clockwise on screen or None for the disc, area, the angles to search in degrees).
_IDEALS: dict[str, tuple[np.ndarray | None, float, tuple[float, float, float]]] = {
    "circle": (None, math.pi, (0.0, 0.0, 1.0)),
    "square": (np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]), 4.0, (0.0, 90.0, 3.0)),
    # base 2 and height 2 (the dataset's 2r x 2r box); its centroid is 1/3 of the height above the base
    "triangle": (np.array([(0.0, -4 / 3), (1.0, 2 / 3), (-1.0, 2 / 3)]), 2.0, (0.0, 360.0, 3.0)),
    # drawn upright only (the extended vocabulary): a small search about upright
    "diamond": (np.array([(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]), 2.0, (-9.0, 9.0, 3.0)),
}


@dataclass(frozen=True)
class ShapeFidelity:
    """How well a sample's shape matches the caption's ideal (see the module docstring)."""

    iou: float  # soft IoU with the fitted ideal
    solidity: float  # area / convex-hull area of the sub-pixel outline
    corners: float  # covered fraction of the ideal's corner regions (1 for the disc)
    angle: float  # fitted angle, degrees

    @property
    def passed(self) -> bool:
        return self.iou >= STRICT_IOU and self.solidity >= STRICT_SOLIDITY and self.corners >= STRICT_CORNERS


def shape_fidelity(image, shape: str) -> ShapeFidelity | None:
    """Fit the ideal `shape` (circle, square, triangle, diamond) to the one shape in `image` and score it; None
    when the image is (nearly) black. Whether the shape is the right class is `check_attributes`'s question."""
    if shape not in _IDEALS:
        raise LdmkitError(f"no ideal shape {shape!r}: use one of {', '.join(_IDEALS)}")
    brightness = _to_uint8(image).max(axis=2).astype(np.float64)  # (H, W)
    fg = _largest_blob(brightness)
    if fg is None:
        return None
    # per-pixel coverage: brightness over the interior's, on the blob and its 1-pixel rim (the blended outline
    # pixels darker than FOREGROUND); specks elsewhere are not the shape
    ref = float(np.median(brightness[_core(fg, brightness)]))
    rim = ndimage.binary_dilation(fg, structure=np.ones((3, 3)))
    c = np.where(rim, np.clip(brightness / ref, 0.0, 1.0), 0.0)  # (H, W) in [0, 1]
    iou, corners, angle = _fit(c, shape)
    return ShapeFidelity(iou=iou, solidity=_solidity(c), corners=corners, angle=angle)


def _fit(c: np.ndarray, shape: str) -> tuple[float, float, float]:
    """(IoU, corner coverage, angle) of the ideal centred on c's centroid, scaled to its area, at the best angle:
    a grid over the shape's angles (4x4 sub-samples a pixel), then 0.25-degree steps around the best (8x8)."""
    verts, area, (lo, hi, step) = _IDEALS[shape]
    mass = c.sum()
    py, px = np.mgrid[0 : c.shape[0], 0 : c.shape[1]] + 0.5  # pixel centres
    cy, cx = (c * py).sum() / mass, (c * px).sum() / mass  # centroid
    scale = math.sqrt(mass / area)  # the ideal's unit, in pixels
    # the window: the sample and the ideal at any angle, with a 1-pixel margin; beyond the image c is 0 (padded),
    # so an ideal that does not fit the sample is charged for all of itself
    reach = scale * (1.0 if verts is None else float(np.hypot(*verts.T).max()))
    ys, xs = np.nonzero(c)
    y0, y1 = min(ys.min(), math.floor(cy - reach)) - 1, max(ys.max() + 1, math.ceil(cy + reach)) + 1
    x0, x1 = min(xs.min(), math.floor(cx - reach)) - 1, max(xs.max() + 1, math.ceil(cx + reach)) + 1
    pad = max(0, -y0, -x0, y1 - c.shape[0], x1 - c.shape[1])
    win = np.pad(c, pad)[y0 + pad : y1 + pad, x0 + pad : x1 + pad]  # (h, w)
    h, w = win.shape

    def grid(n: int) -> tuple[np.ndarray, np.ndarray]:  # (h·n, w·n) sub-sample centres about the centroid
        sub = (np.arange(n) + 0.5) / n
        return np.meshgrid((np.arange(x0, x1)[:, None] + sub).ravel() - cx, (np.arange(y0, y1)[:, None] + sub).ravel() - cy)

    grids = {n: grid(n) for n in (_SUB // 2, _SUB)}

    def frame(deg: float, n: int = _SUB) -> tuple[np.ndarray, np.ndarray]:  # sub-samples in the ideal's turned frame
        gx, gy = grids[n]
        t = math.radians(deg)
        return (gx * math.cos(t) + gy * math.sin(t)) / scale, (gy * math.cos(t) - gx * math.sin(t)) / scale

    def pool(inside: np.ndarray) -> np.ndarray:  # (h·n, w·n) bool -> (h, w) coverage
        n = inside.shape[0] // h
        return inside.reshape(h, n, w, n).mean(axis=(1, 3))

    def iou(deg: float, n: int = _SUB) -> float:
        q = pool(_inside(verts, *frame(deg, n)))  # (h, w)
        return float(np.minimum(q, win).sum() / np.maximum(q, win).sum())

    if verts is None:
        return iou(0.0), 1.0, 0.0
    best = max(np.arange(lo, hi + 1e-9, step), key=lambda deg: iou(deg, _SUB // 2))
    best = float(max(np.arange(best - step, best + step + 1e-9, 0.25), key=iou))
    u, v = frame(best)
    inside = _inside(verts, u, v)
    fills = []
    for vx, vy in verts:
        q = pool(inside & ((u - vx) ** 2 + (v - vy) ** 2 <= _CORNER_REACH**2))  # (h, w) the corner region
        fills.append(np.minimum(q, win).sum() / q.sum())
    return iou(best), float(np.mean(fills)), best


def _inside(verts: np.ndarray | None, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Points (u, v) inside the ideal: the unit disc, or the convex polygon with clockwise (on screen) vertices."""
    if verts is None:
        return u * u + v * v <= 1.0
    ok = np.ones(u.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(verts, np.roll(verts, -1, axis=0)):
        ok &= (bx - ax) * (v - ay) - (by - ay) * (u - ax) >= 0  # on the inner side of edge a -> b
    return ok


def _solidity(c: np.ndarray) -> float:
    """Area inside the 1/2 contour of c (marching squares, sub-pixel) over the area of its convex hull."""
    contours = find_contours(np.pad(c, 1), 0.5)
    if not contours:
        return 0.0
    pts = max(contours, key=len)  # (K, 2) the outline of the largest piece
    y, x = pts[:, 0], pts[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
    try:
        hull = ConvexHull(pts).volume  # in 2-D, `volume` is the area
    except QhullError:  # a degenerate (flat) outline
        return 0.0
    return float(area / hull) if hull > 0 else 0.0


def parse_caption(text: str, vocabulary: str = "extended") -> tuple[str, str, str]:
    """'a red circle in the top left' -> (colour, shape, position); LdmkitError if it is not such a caption."""
    palette, shapes = _vocabulary(vocabulary)
    match = _CAPTION.match(" ".join(text.lower().split()))
    if not match or match[1] not in palette or match[2] not in shapes or match[3] not in POSITION_NAMES:
        raise LdmkitError(
            f"cannot score caption {text!r}: attribute scoring needs 'a {{colour}} {{shape}} in the {{position}}' "
            "captions from the shapes vocabulary"
        )
    return match[1], match[2], match[3]


def caption_vocabulary(captions: Iterable[str]) -> str:
    """"extended" when some caption names white or diamond, else "basic"."""
    return "extended" if any(set(t.lower().split()) & {"white", "diamond"} for t in captions) else "basic"


def score_captions(images: Iterable | torch.Tensor, captions: Sequence[str],
                   vocabulary: str | None = None, strict: bool = False) -> dict[str, float | int]:
    """Fraction of images whose colour / position / shape (and all three) match their caption.

    `images`: a (N, 3, H, W) tensor in [-1, 1], or a sequence of (3, H, W) tensors or uint8 (H, W, 3) arrays.
    `vocabulary`: the judge's words; None: extended when some caption needs it (`caption_vocabulary`).
    `strict`: also `shape_strict`, the fraction whose shape is the right class *and* drawn right
    (`shape_fidelity(...).passed`), and `all_strict`, colour and position right besides.
    """
    vocabulary = vocabulary or caption_vocabulary(captions)
    images = list(images)
    if len(images) != len(captions):
        raise LdmkitError(f"got {len(images)} images but {len(captions)} captions; pass one caption per image")
    hits = {"colour": 0, "position": 0, "shape": 0, "all": 0} | ({"shape_strict": 0, "all_strict": 0} if strict else {})
    for image, text in zip(images, captions, strict=True):
        colour, shape, position = parse_caption(text, vocabulary)
        found = check_attributes(image, vocabulary)
        ok = {"colour": found["colour"] == colour, "position": found["position"] == position,
              "shape": found["shape"] == shape}
        for key, value in ok.items():
            hits[key] += value
        hits["all"] += all(ok.values())
        if strict and ok["shape"]:
            fidelity = shape_fidelity(image, shape)
            drawn_right = fidelity is not None and fidelity.passed
            hits["shape_strict"] += drawn_right
            hits["all_strict"] += drawn_right and ok["colour"] and ok["position"]
    n = len(images)
    return {**{key: (value / n if n else 0.0) for key, value in hits.items()}, "n": n}
