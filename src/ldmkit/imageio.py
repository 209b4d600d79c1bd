"""Tensors ↔ PNG files: single images and labelled grids; the output folders they go to."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmkit.errors import LdmkitError


def check_writable_dir(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work starts, an output folder that cannot be made or written: an existing
    file, or a folder (or its nearest existing parent) without write permission."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LdmkitError(f"{option} {path} is a file, not a folder; choose a folder path")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LdmkitError(f"{option} {path}: {probe} is a file, so the folder cannot be made there; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LdmkitError(f"{option} {path}: {probe} is not writable; choose a folder you can write to")
    return path


def make_dir(path: str | Path, option: str = "--out") -> Path:
    """mkdir -p, with a failure (no permission, no space, a file in the way) as one LdmkitError naming the path."""
    path = check_writable_dir(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LdmkitError(f"cannot create {option} {path}: {e.strerror or e}; choose another folder") from None
    return path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) in [-1, 1] → uint8 (H, W, 3) or (B, H, W, 3)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, upscale: int = 1) -> Image.Image:
    """(B, C, H, W) in [-1, 1] → one PIL image with `nrow` images per row and grey padding."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    arr = to_uint8(images)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 128, np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return img


def save_png(img: Image.Image, path: str | Path) -> None:
    """Write a PNG atomically, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    img.save(tmp, format="PNG")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> None:
    save_png(make_grid(images, nrow, upscale=upscale), path)
