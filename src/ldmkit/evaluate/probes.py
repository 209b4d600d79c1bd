"""Spatial probes: shape maps drawn for the evaluation, independently of the training renderer.

A spatial route is only measured when its map says something the caption does not. A probe is one
shape placed anywhere in its quadrant, at radius 0.12–0.30 of the side and (squares, triangles) any
angle, with its mask (pixel centres inside the outline), its edge map (the mask's 1-pixel inner
boundary), the right caption, and a caption naming another quadrant. Nothing here is shared with
`ldmkit.data.shapes`: the geometry is sampled by its own rules from its own seeds and rasterised by
point-in-shape tests instead of a supersampled PIL drawing, so a route that only memorised the
training renderer's pictures gains nothing; only the vocabulary (the same three shapes, with the same
proportions: the square of the circle's area, the triangle in the circle's 2r x 2r box) is common.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ldmkit.evaluate.attributes import PALETTE, POSITION_NAMES, SHAPE_NAMES

RADIUS = (0.12, 0.30)  # fraction of the side
MARGIN = 0.05  # the centroid keeps this far from the midlines (fraction of the side): its quadrant is unambiguous


@dataclass
class Probes:
    """n probes at `size` pixels: masks and edges (n, 1, size, size) in {0, 1}; per probe the shape,
    colour and quadrant, the right caption and one naming another quadrant."""

    masks: torch.Tensor
    edges: torch.Tensor
    shapes: list[str]
    colours: list[str]
    quadrants: list[str]
    captions: list[str]
    other_quadrants: list[str]
    other_captions: list[str]

    def __len__(self) -> int:
        return len(self.shapes)

    def maps(self, kind: str) -> torch.Tensor:
        """The control maps of kind 'edge' or 'mask', (n, 1, size, size) in {0, 1}."""
        return self.edges if kind == "edge" else self.masks


def _vertices(shape: str, r: float, angle: float) -> np.ndarray:
    """(k, 2) polygon (x, y) about the shape's centroid, counter-clockwise on screen (y down)."""
    if shape == "square":
        h = r * math.sqrt(math.pi) / 2
        pts = np.array([(-h, -h), (-h, h), (h, h), (h, -h)])
    else:  # the triangle: apex up, base 2r, height 2r; its centroid is 2/3 of the height below the apex
        pts = np.array([(0.0, -4 * r / 3), (-r, 2 * r / 3), (r, 2 * r / 3)])
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _inside(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """(size, size) bool: pixel centres inside the shape."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    pts = _vertices(shape, r, angle) + (cx, cy)
    inside = np.ones((size, size), bool)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        cross = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        inside &= cross <= 0  # the same side of every edge of a convex polygon
    return inside


def draw_probes(n: int, size: int, seed: int = 0) -> Probes:
    """n probes from their own random stream (`seed`); see the module docstring."""
    rng = np.random.default_rng([seed, 0x5EED])
    colours = list(PALETTE)
    masks, out = [], {k: [] for k in ("shapes", "colours", "quadrants", "captions", "other_quadrants", "other_captions")}
    for _ in range(n):
        shape, colour = SHAPE_NAMES[rng.integers(3)], colours[rng.integers(len(colours))]
        q = int(rng.integers(4))
        r = rng.uniform(*RADIUS) * size
        angle = 0.0 if shape == "circle" else rng.uniform(0, 2 * math.pi)
        pts = np.array([(-r, -r), (r, r)]) if shape == "circle" else _vertices(shape, r, angle)
        (x_lo, y_lo), (x_hi, y_hi) = pts.min(0), pts.max(0)
        half, m = size / 2, MARGIN * size
        col, row = q % 2, q // 2
        cx = rng.uniform(-x_lo, half - m) if col == 0 else rng.uniform(half + m, size - x_hi)
        cy = rng.uniform(-y_lo, half - m) if row == 0 else rng.uniform(half + m, size - y_hi)
        masks.append(_inside(shape, cx, cy, r, angle, size))
        other = int(rng.choice([k for k in range(4) if k != q]))
        out["shapes"].append(shape)
        out["colours"].append(colour)
        out["quadrants"].append(POSITION_NAMES[q])
        out["other_quadrants"].append(POSITION_NAMES[other])
        out["captions"].append(f"a {colour} {shape} in the {POSITION_NAMES[q]}")
        out["other_captions"].append(f"a {colour} {shape} in the {POSITION_NAMES[other]}")
    mask = torch.from_numpy(np.stack(masks)).float()[:, None]  # (n, 1, S, S)
    # inner boundary: mask pixels with a 4-neighbour outside (erosion by a plus-shaped min-filter)
    pad = F.pad(mask, (1, 1, 1, 1))
    eroded = torch.stack([pad[..., 1:-1, 1:-1], pad[..., :-2, 1:-1], pad[..., 2:, 1:-1],
                          pad[..., 1:-1, :-2], pad[..., 1:-1, 2:]]).amin(0)
    return Probes(masks=mask, edges=mask - eroded, **out)
