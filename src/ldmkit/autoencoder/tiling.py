"""Tiled encode/decode for the first stage: an image (or latent) too large for memory is processed in
overlapping tiles whose outputs are blended with linear feathering across the overlap, so the seams
do not show (the approach of diffusers' `enable_tiling` and of tiled VAE decoding in SD front-ends).
`AutoencoderKL.enable_tiling` switches it on; the tile and overlap sizes are in latent cells.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from ldmkit.errors import LdmkitError


class Tiling(NamedTuple):
    """Tile side and overlap of tiled encode/decode, both in latent pixels (image pixels / f)."""

    tile_latent: int
    overlap_latent: int


def check_tiling(tile_latent: int, overlap_latent: int) -> Tiling:
    if isinstance(tile_latent, bool) or not isinstance(tile_latent, int) or tile_latent < 1:
        raise LdmkitError(f"tile_latent must be a positive integer (latent pixels per tile side), got {tile_latent!r}")
    if isinstance(overlap_latent, bool) or not isinstance(overlap_latent, int) or not 0 <= overlap_latent < tile_latent:
        raise LdmkitError(
            f"overlap_latent must be an integer with 0 <= overlap_latent < tile_latent, got overlap_latent="
            f"{overlap_latent!r} for tile_latent={tile_latent}; use a smaller overlap (about a quarter of the tile)"
        )
    return Tiling(tile_latent, overlap_latent)


class _Span(NamedTuple):
    """One tile along one axis, in latent pixels: [start, end), overlapping its neighbours by `left`/`right`."""

    start: int
    end: int
    left: int
    right: int


def _tile_spans(length: int, tile: int, overlap: int) -> list[_Span]:
    """The fewest tiles of side `tile` covering [0, length) with neighbours overlapping by at least
    `overlap`, spread evenly so that every tile is full-sized (no thin last tile): n tiles need
    (n - 1)·(tile - overlap) + tile >= length."""
    if length <= tile:
        return [_Span(0, length, 0, 0)]
    n = -(-(length - overlap) // (tile - overlap))  # ceil; n >= 2
    # integer strides differ by at most one and never exceed tile - overlap, so overlaps stay >= overlap
    starts = [k * (length - tile) // (n - 1) for k in range(n)]
    ends = [a + tile for a in starts]
    return [
        _Span(starts[k], ends[k], ends[k - 1] - starts[k] if k > 0 else 0, ends[k] - starts[k + 1] if k < n - 1 else 0)
        for k in range(n)
    ]


def _feather(span: _Span, scale: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Blend weights along one axis of a tile's output, `scale` output pixels per latent pixel: 1 inside,
    rising linearly over the overlap with the previous tile and falling over the next. Where exactly two
    tiles overlap, their ramps (i+1)/(o+1) and (o-i)/(o+1) sum to 1, a linear cross-fade."""
    w = torch.ones((span.end - span.start) * scale, device=device, dtype=torch.float64)
    left, right = span.left * scale, span.right * scale
    if left:
        w[:left] = torch.arange(1, left + 1, device=device, dtype=torch.float64) / (left + 1)
    if right:
        ramp = torch.arange(right, 0, -1, device=device, dtype=torch.float64) / (right + 1)
        w[-right:] = torch.minimum(w[-right:], ramp)  # a tile thinner than both overlaps: keep the smaller
    return w.to(dtype)


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiling: Tiling, in_scale: int, out_scale: int
) -> torch.Tensor:
    """fn applied to overlapping tiles of x and blended with feathered weights.

    The grid is laid out in latent pixels; x has `in_scale` pixels per latent pixel (f for images, 1 for
    latents) and fn's output `out_scale` (1 for moments, f for images). Each output pixel is the
    weighted mean Σ w_k·fn(tile_k) / Σ w_k of the tiles covering it, accumulated in one buffer of the
    output's size, so at most one tile's activations are alive at a time.
    """
    rows = _tile_spans(x.shape[-2] // in_scale, *tiling)
    cols = _tile_spans(x.shape[-1] // in_scale, *tiling)
    if len(rows) == len(cols) == 1:
        return fn(x)  # one tile: exactly the untiled computation
    out, weight = None, None
    for r in rows:
        for c in cols:
            y = fn(x[..., r.start * in_scale : r.end * in_scale, c.start * in_scale : c.end * in_scale])  # (B, C', t·s, t·s)
            if out is None:
                size = (rows[-1].end * out_scale, cols[-1].end * out_scale)
                out = y.new_zeros(*y.shape[:2], *size)  # (B, C', H', W')
                weight = y.new_zeros(size)  # (H', W')
            w = torch.outer(_feather(r, out_scale, y.device, y.dtype), _feather(c, out_scale, y.device, y.dtype))
            rs = slice(r.start * out_scale, r.end * out_scale)
            cs = slice(c.start * out_scale, c.end * out_scale)
            out[..., rs, cs] += y * w
            weight[rs, cs] += w
    return out / weight  # weight is 1 wherever at most two tiles meet; dividing makes any overlap a mean
