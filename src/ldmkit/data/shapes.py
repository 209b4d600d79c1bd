"""`shapes`: procedural images of one coloured shape on black, with caption, class, mask and edges.

Every conditioning route can be trained *and measured* on it: the caption names three attributes
(shape, colour, position) that `ldmkit.evaluate.attributes` can read back from a generated image,
the class id names two of them, and the mask and edge map are exact ground truth for
concatenation and ControlNet conditioning.

Item i is a pure function of (seed, split, i), so runs are reproducible without storing anything.
Items come in blocks of 72: each block is a shuffled copy of all 72 (shape, colour, position)
combinations, so every prefix of 72·k items is perfectly balanced; only the jitter is random.

Two layouts. `fixed` (the dataset `shapes`) puts each shape near the centre of its quadrant at
nearly one size, so the caption decides almost all of the picture. `free` (the dataset
`shapes-free`) puts it anywhere in its quadrant where it fits, at radius 0.12–0.30 of the side, and
turns squares and triangles by a random angle: the caption still names shape, colour and the
quadrant of the shape's centroid, but only a spatial condition (mask, edges, an inpainting hole)
can say exactly where and how large — which is what the spatial routes must be measured on.

Two vocabularies. `basic` (the default) is the 3 shapes x 6 colours above. `extended`
(`data.vocabulary: extended`, fixed layout only) adds the colour `white` (240, 240, 240) and the shape
`diamond` (the points with |dx| + |dy| <= r, in the same 2r x 2r box as the circle): 4 x 7 x 4 = 112
combinations, blocks of 112, a concept a model trained on `basic` has never seen (issue 15's LoRA test).

Composition (`holdout=n`, `data.holdout`): the training split leaves out n of the 72 combinations
(`heldout_combos`), chosen so that every pair of their attributes (shape and colour, shape and
position, colour and position) still occurs in training; only the triple is new. The validation split
keeps all 72, so a model can be asked for what it saw only in parts. `labels="combo"` labels each item
with its combination's index k = shape·24 + colour·4 + position (72 classes, a mixed-radix number over
the factors (3, 6, 4)) instead of the class shape·6 + colour.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldmkit.errors import LdmkitError

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB, in class-id order
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cells of a 2x2 grid
NUM_CLASSES = len(SHAPES) * len(COLOURS)  # class id = shape_index * 6 + colour_index

# All 72 combinations; index k <-> caption all_captions()[k], and label = k // len(POSITIONS).
COMBOS = tuple((s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS)

# The extended vocabulary: the words a `basic` model never saw, appended after the basic ones.
EXTRA_SHAPES = ("diamond",)
EXTRA_COLOURS = {"white": (240, 240, 240)}
VOCABULARIES = ("basic", "extended")


def vocabulary(name: str = "basic") -> tuple[tuple[str, ...], dict[str, tuple[int, int, int]]]:
    """(shapes, colours) of vocabulary `name`; the extended one lists the basic words first."""
    if name == "basic":
        return SHAPES, COLOURS
    if name == "extended":
        return SHAPES + EXTRA_SHAPES, {**COLOURS, **EXTRA_COLOURS}
    raise LdmkitError(f"unknown shapes vocabulary {name!r}: use one of {', '.join(VOCABULARIES)}")


@functools.cache
def combos(vocab: str = "basic") -> tuple[tuple[str, str, str], ...]:
    """Every (shape, colour, position) of a vocabulary; `combos("basic") == COMBOS`."""
    shapes, colours = vocabulary(vocab)
    return tuple((s, c, p) for s in shapes for c in colours for p in POSITIONS)


def is_new(combo: tuple[str, str, str]) -> bool:
    """Whether a combination uses a word of the extended vocabulary (white and/or diamond)."""
    return combo[0] in EXTRA_SHAPES or combo[1] in EXTRA_COLOURS

COMBO_FACTORS = (len(SHAPES), len(COLOURS), len(POSITIONS))  # combo index k: digits (shape, colour, position)
LABEL_KINDS = ("class", "combo")


@functools.cache
def heldout_combos(n: int) -> tuple[tuple[str, str, str], ...]:
    """n basic combinations to hold out of training, none of whose attribute pairs is held out twice.

    A fixed shuffle of the 72 (seed 0) is walked, and a combination is taken when none of its three pairs
    (shape, colour), (shape, position), (colour, position) belongs to one already taken: each held-out
    pair then still occurs in training with the other 2 (position), 3 (colour) or 5 (shape) values of
    the third attribute, so a held-out triple is made only of parts seen together. 12 is the most such
    a set can hold (there are 12 (shape, position) pairs), and this shuffle reaches it."""
    if not 0 <= n <= 12:
        raise LdmkitError(f"data.holdout must be between 0 and 12 combinations, got {n}")
    taken: list[tuple[str, str, str]] = []
    pairs: set[tuple[int, str, str]] = set()
    for k in np.random.default_rng(0).permutation(len(COMBOS)):
        if len(taken) == n:
            break
        s, c, p = COMBOS[k]
        mine = {(0, s, c), (1, s, p), (2, c, p)}
        if not mine & pairs:
            taken.append(COMBOS[k])
            pairs |= mine
    if len(taken) < n:
        raise LdmkitError(f"cannot hold out {n} combinations without holding out one attribute pair twice")
    return tuple(taken)


SUPERSAMPLE = 4  # draw at 4x and box-average: coverage comes in steps of 1/16
RADIUS = (0.18, 0.21)  # circle radius as a fraction of the side (uniform); 0.2 without jitter
CENTRE_JITTER = 0.02  # max shift of the centre from its cell centre, fraction of the side
# With radius + jitter <= 0.23 < 0.25 no shape is ever clipped by the image border.
FREE_RADIUS = (0.12, 0.30)  # `free` layout: radius range, fraction of the side
FREE_MARGIN = 0.04  # `free` layout: the centroid keeps this far (fraction of the side) from the midlines,
# so the quadrant named by the caption is never a coin toss at the pixel level
LAYOUTS = ("fixed", "free")
SHAPES_DATASETS = ("shapes", "shapes-free")  # the dataset names of the two layouts


def caption(shape: str, colour: str, position: str) -> str:
    return f"a {colour} {shape} in the {position}"


def label(shape: str, colour: str, vocab: str = "basic") -> int:
    shapes, colours = vocabulary(vocab)
    return shapes.index(shape) * len(colours) + list(colours).index(colour)


def all_captions(vocab: str = "basic") -> list[str]:
    """The 72 captions (112 extended), in `combos(vocab)` order (shape, then colour, then position)."""
    return [caption(*combo) for combo in combos(vocab)]


@functools.cache
def _caption_table() -> dict[str, tuple[str, str, str]]:
    return {caption(*combo): combo for combo in combos("extended")}


def parse_caption(text: str) -> tuple[str, str, str]:
    """'a red circle in the top left' -> ('circle', 'red', 'top left'); LdmkitError outside the (extended) vocabulary."""
    combo = _caption_table().get(" ".join(text.lower().split()))
    if combo is None:
        shapes, colours = vocabulary("extended")
        raise LdmkitError(
            f"caption {text!r} is not a shapes caption: write 'a {{colour}} {{shape}} in the {{position}}' with "
            f"colour in {', '.join(colours)}, shape in {', '.join(shapes)}, position in {', '.join(POSITIONS)}"
        )
    return combo


def _outline(shape: str, cx: float, cy: float, r: float, angle: float | None = None) -> tuple[str, list[tuple[float, float]]]:
    """Geometry in pixel units (continuous, pixel i spans [i, i+1)): ('ellipse', bbox) or ('polygon', points).

    `angle=None` (the fixed layout): upright, (cx, cy) the centre of the 2r x 2r box. A number (the
    free layout): (cx, cy) is the shape's centroid and the polygon is turned by `angle` radians about it.
    """
    if shape == "circle":
        return "ellipse", [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        h = r * math.sqrt(math.pi) / 2  # same area as the circle
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        # Upward-pointing, same 2r x 2r bounding box as the circle (so it fills half of it; area 2r^2).
        pts = [(0.0, -r), (r, r), (-r, r)]
        if angle is not None:  # about the centroid, which lies r/3 below the box centre
            pts = [(x, y - r / 3) for x, y in pts]
    elif shape == "diamond":
        # |dx| + |dy| <= r: the circle's 2r x 2r box, half of it filled (area 2r^2, like the triangle),
        # but symmetric top-to-bottom where the triangle is not.
        pts = [(0.0, -r), (r, 0.0), (0.0, r), (-r, 0.0)]
    else:
        raise LdmkitError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES + EXTRA_SHAPES)}")
    if angle is not None:
        c, s = math.cos(angle), math.sin(angle)
        pts = [(x * c - y * s, x * s + y * c) for x, y in pts]
    return "polygon", [(cx + x, cy + y) for x, y in pts]


def _free_geometry(shape: str, position: str, size: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(cx, cy, r, angle) for the free layout: radius in FREE_RADIUS, a turn for squares and triangles,
    the centroid uniform over the places in its quadrant where the whole shape fits."""
    r = rng.uniform(*FREE_RADIUS) * size
    angle = 0.0 if shape == "circle" else rng.uniform(0.0, 2 * math.pi)
    _, pts = _outline(shape, 0.0, 0.0, r, angle)  # a circle's is its bounding box
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    row, col = divmod(POSITIONS.index(position), 2)
    half, margin = size / 2, FREE_MARGIN * size
    # The centroid's allowed interval on each axis: inside the image by the shape's extent, and on its
    # quadrant's side of the midline by the margin. Never empty: extent <= 4/3 * 0.30 = 0.40 < 0.46.
    lo_x, hi_x = (-min(xs), half - margin) if col == 0 else (half + margin, size - max(xs))
    lo_y, hi_y = (-min(ys), half - margin) if row == 0 else (half + margin, size - max(ys))
    return rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y), r, angle


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (mask minus its 4-neighbour erosion); 1 pixel wide."""
    m = np.pad(mask, 1, constant_values=False)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~interior


def render_shape(
    shape: str, colour: str, position: str, size: int = 32, rng: np.random.Generator | None = None,
    layout: str = "fixed",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one anti-aliased shape on black.

    Returns (image uint8 (size, size, 3), mask bool (size, size), edge bool (size, size)). The mask is
    coverage > 1/2, the edge its 1-pixel boundary; mask pixels off the edge are exactly the palette
    colour and only pixels touching the outline are blended with black. `rng=None` gives the nominal,
    jitter-free drawing (centred in its cell, radius 0.2·size); a Generator draws centre and size jitter,
    or, with `layout="free"`, place, radius and angle anywhere in the quadrant (see the module docstring).
    """
    if layout not in LAYOUTS:
        raise LdmkitError(f"unknown shapes layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if size < 16:
        raise LdmkitError(f"shapes images must be at least 16 pixels wide, got {size}; use --size 16 or more")
    palette = {**COLOURS, **EXTRA_COLOURS}
    if colour not in palette:
        raise LdmkitError(f"unknown colour {colour!r}: choose one of {', '.join(palette)}")
    if position not in POSITIONS:
        raise LdmkitError(f"unknown position {position!r}: choose one of {', '.join(POSITIONS)}")
    if layout == "free":
        if rng is None:
            raise LdmkitError("the free shapes layout draws its geometry at random: pass a numpy Generator")
        cx, cy, r, angle = _free_geometry(shape, position, size, rng)
    else:
        row, col = divmod(POSITIONS.index(position), 2)
        cx, cy, r, angle = (0.25 + 0.5 * col) * size, (0.25 + 0.5 * row) * size, 0.2 * size, None
        if rng is not None:
            dx, dy = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2) * size
            cx, cy, r = cx + dx, cy + dy, rng.uniform(*RADIUS) * size

    # Supersampled binary drawing -> box average = fractional coverage of each output pixel.
    f = SUPERSAMPLE
    canvas = Image.new("L", (size * f, size * f), 0)
    kind, points = _outline(shape, cx, cy, r, angle)
    # PIL fills a sub-pixel when its centre is inside; shift by half a sub-pixel to match [i, i+1) pixels.
    points = [(x * f - 0.5, y * f - 0.5) for x, y in points]
    draw = ImageDraw.Draw(canvas)
    if kind == "ellipse":
        draw.ellipse(points, fill=255)
    else:
        draw.polygon(points, fill=255)
    sub = np.asarray(canvas, dtype=np.float32).reshape(size, f, size, f)
    coverage = sub.mean(axis=(1, 3)) / 255.0  # (size, size) in [0, 1]

    mask = coverage > 0.5
    edge = _boundary(mask)
    # Inside the outline coverage is already 1 (so the colour is exact); pin it anyway so the contract
    # "interior == palette colour" holds even for a sliver pixel next to a sharp corner.
    coverage[mask & ~edge] = 1.0
    rgb = np.asarray(palette[colour], dtype=np.float32)
    image = np.rint(coverage[..., None] * rgb).astype(np.uint8)  # (size, size, 3)
    return image, mask, edge


@functools.lru_cache(maxsize=256)
def _block_order(seed: int, split_id: int, block: int, n: int = len(COMBOS)) -> np.ndarray:
    """The shuffled order of the `n` combinations (72, or 112 extended) in one block of items."""
    # Stream tag 0 = block order, 1 = per-item jitter, so the two never share random numbers.
    return np.random.default_rng([seed, split_id, 0, block]).permutation(n)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ShapesDataset(Dataset):
    """Procedural coloured shapes; items are dicts image/text/label/mask/edge (see module docstring).

    `length` defaults to 7,200 for train and 720 for val (100 and 10 of each combination). The split
    only changes the random stream: val images have the same captions but never the same jitter.
    `layout="free"` is the dataset `shapes-free` (see the module docstring); `vocabulary="extended"`
    adds white and diamond (fixed layout only; labels are then shape·7 + colour, 28 classes).
    """

    num_classes = NUM_CLASSES

    def __init__(self, size: int = 32, length: int | None = None, seed: int = 0, split: str = "train",
                 layout: str = "fixed", vocabulary: str = "basic", holdout: int = 0, labels: str = "class"):
        if layout not in LAYOUTS:
            raise LdmkitError(f"unknown shapes layout {layout!r}: use one of {', '.join(LAYOUTS)}")
        if vocabulary not in VOCABULARIES:
            raise LdmkitError(f"unknown shapes vocabulary {vocabulary!r}: use one of {', '.join(VOCABULARIES)}")
        if vocabulary != "basic" and layout != "fixed":
            raise LdmkitError("the extended shapes vocabulary needs the fixed layout: the free one turns squares, "
                              "and a square turned by 45 degrees is a diamond")
        if labels not in LABEL_KINDS:
            raise LdmkitError(f"unknown shapes labels {labels!r}: use one of {', '.join(LABEL_KINDS)}")
        if (holdout or labels != "class") and vocabulary != "basic":
            raise LdmkitError("data.holdout and data.labels: combo are for the basic shapes vocabulary")
        self.layout, self.vocabulary, self.holdout, self.labels = layout, vocabulary, int(holdout), labels
        self._combos = combos(vocabulary)
        self.num_classes = len(self._combos) // len(POSITIONS) if labels == "class" else len(COMBOS)
        self.name = "shapes" if layout == "fixed" else "shapes-free"
        if split not in ("train", "val"):
            raise LdmkitError(f"unknown split {split!r}: use 'train' or 'val'")
        if size < 16:
            raise LdmkitError(f"shapes images must be at least 16 pixels wide, got {size}; use --size 16 or more")
        self.size, self.seed, self.split = size, int(seed), split
        self._split_id = 0 if split == "train" else 1
        # the combinations items are drawn from: all, or (training split) all but the held-out ones
        held = set(heldout_combos(self.holdout)) if split == "train" else set()
        self._drawn = tuple(c for c in self._combos if c not in held)
        per_combo = 100 if split == "train" else 10
        self.length = length if length is not None else per_combo * len(self._combos)

    def __len__(self) -> int:
        return self.length

    def combo(self, index: int) -> tuple[str, str, str]:
        """(shape, colour, position) of item `index`, without rendering it."""
        n = len(self._drawn)
        block, k = divmod(index, n)
        return self._drawn[_block_order(self.seed, self._split_id, block, n)[k]]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        shape, colour, position = self.combo(index)
        rng = np.random.default_rng([self.seed, self._split_id, 1, index])
        image, mask, edge = render_shape(shape, colour, position, self.size, rng, self.layout)
        return {
            "image": _to_tensor(image),  # (3, H, W) in [-1, 1]
            "text": caption(shape, colour, position),
            "label": label(shape, colour, self.vocabulary) if self.labels == "class" else COMBOS.index((shape, colour, position)),
            "mask": torch.from_numpy(mask).float()[None],  # (1, H, W) in {0, 1}
            "edge": torch.from_numpy(edge).float()[None],  # (1, H, W) in {0, 1}
        }


def with_vocabulary(dataset: Dataset, vocab: str) -> Dataset:
    """`dataset` as `data.vocabulary` asks: itself for `basic`; for `extended`, the same shapes dataset
    (size, length, seed, split) over the extended vocabulary, or an error for any other dataset."""
    if vocab == "basic":
        return dataset
    if not isinstance(dataset, ShapesDataset):
        raise LdmkitError(f"data.vocabulary: {vocab} is for the shapes dataset; "
                          f"{getattr(dataset, 'name', type(dataset).__name__)} has its own captions")
    return _rebuilt(dataset, vocabulary=vocab)


def with_composition(dataset: Dataset, holdout: int, labels: str) -> Dataset:
    """`dataset` with `data.holdout` combinations left out of its training split and `data.labels`
    (class or combo), as `with_vocabulary`: itself when both are the defaults, else the same shapes
    dataset rebuilt with them, or an error for any other dataset."""
    if not holdout and labels == "class":
        return dataset
    if not isinstance(dataset, ShapesDataset):
        raise LdmkitError(f"data.holdout and data.labels are for the shapes datasets, not "
                          f"{getattr(dataset, 'name', type(dataset).__name__)}")
    return _rebuilt(dataset, holdout=holdout, labels=labels)


def _rebuilt(ds: ShapesDataset, **changes) -> ShapesDataset:
    """The same shapes dataset with `changes`: its size, seed, split, layout, vocabulary, holdout and labels
    kept unless changed, and its length kept unless it was the default (which then follows the change)."""
    default = (100 if ds.split == "train" else 10) * len(ds._combos)
    kw = dict(size=ds.size, length=None if ds.length == default else ds.length, seed=ds.seed, split=ds.split,
              layout=ds.layout, vocabulary=ds.vocabulary, holdout=ds.holdout, labels=ds.labels)
    return ShapesDataset(**(kw | changes))
