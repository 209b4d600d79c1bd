"""Image files in and out: opening any image a user gives (the one place that does: folders, init images,
masks, control maps), tensors ↔ PNG files, labelled grids, and the output folders they go to.

Opening: the header is read first and an image claiming more than MAX_PIXELS pixels is refused before
anything is decoded (a "decompression bomb": a few KB of PNG header can claim 60000x60000); the whole
file is then decoded (which catches truncated files) and EXIF orientation applied. `to_rgb` makes any
mode 8-bit RGB: greyscale replicated, palette expanded, 16-bit scaled (PIL's convert() would clip it),
transparency composited onto white (a cut-out is meant to be seen on a page; on black, dark strokes vanish).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldmkit.errors import LdmkitError

MAX_PIXELS = 1 << 28  # 268M pixels (16384²): far above any training image, far below a bomb's claim
# PIL's own guard (a warning above 89M pixels, an error above twice that, inside Image.open) is moved
# to the same limit, so that an image ldmkit refuses is refused by `open_image`'s check, naming its size.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageProblem(LdmkitError):
    """An image file that cannot be used; `reason` is the short why (folder checks list several)."""

    def __init__(self, what: str, path: str | Path, reason: str):
        super().__init__(f"{what} {path}: {reason}")
        self.reason = reason


def open_image(path: str | Path, size: int | None = None, what: str = "image") -> Image.Image:
    """Open, check, fully decode and orient one image; `size` lets JPEG decode at a reduced scale (still
    >= size). A missing, unreadable, truncated or oversized file is one ImageProblem naming it and `what`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says it
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageProblem(what, path, f"claims {w}x{h} pixels, more than ldmkit reads ({MAX_PIXELS:,}): "
                                       "damaged or a decompression bomb; downscale it if it is real")
                if size is not None:
                    im.draft("RGB", (size, size))  # JPEG only: DCT scaling, much faster for big photos
                im.load()  # decodes everything: this is what catches truncated files (verify() does not)
                return ImageOps.exif_transpose(im)
    except FileNotFoundError:
        raise ImageProblem(what, path, "does not exist") from None
    except UnidentifiedImageError:
        raise ImageProblem(what, path, "not an image PIL can read") from None
    except Image.DecompressionBombError:  # PIL's own guard, at twice its limit, fires inside Image.open
        raise ImageProblem(what, path, "claims more pixels than ldmkit reads: damaged or a decompression bomb; "
                           "downscale it if it is real") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageProblem(what, path, "truncated" if "truncated" in text else text[:80]) from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit scaled down, alpha composited onto white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        grey = np.asarray(im, dtype=np.float64)
        # PIL's own convert() clips 16-bit values at 255 instead of scaling; do it by hand.
        if im.mode.startswith("I;16") or (im.mode == "I" and grey.max() > 255):
            grey = grey / 257.0
        elif im.mode == "F" and grey.max() <= 1.0:
            grey = grey * 255.0
        im = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        page = Image.new("RGB", im.size, (255, 255, 255))
        page.paste(im, mask=im.getchannel("A"))
        return page
    return im.convert("RGB")


_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights, RGB → gray


def convert_channels(image: torch.Tensor, want: int) -> torch.Tensor | None:
    """A float image batch (B, C, H, W) → `want` channels (init images, masks, control maps): RGBA/gray-alpha
    → drop alpha; gray → RGB by repetition; RGB → gray by BT.601 luma. None = no rule."""
    c = image.shape[1]
    if c == want:
        return image
    if c in (2, 4) and want in (1, 3):
        image, c = image[:, : c - 1], c - 1  # drop the alpha channel
        if c == want:
            return image
    if c == 1 and want == 3:
        return image.expand(-1, 3, -1, -1)  # (B, 3, H, W)
    if c == 3 and want == 1:
        w = torch.tensor(_LUMA, dtype=image.dtype, device=image.device)
        return (image * w[None, :, None, None]).sum(1, keepdim=True)  # (B, 1, H, W)
    return None


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


def png_bytes(img: Image.Image, text: dict[str, str] | None = None) -> bytes:
    """The PNG file of `img` as bytes; `text` becomes iTXt chunks (e.g. the A1111 `parameters` chunk that
    image tools read back)."""
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)  # iTXt: UTF-8, so any prompt survives
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(img: Image.Image, path: str | Path, text: dict[str, str] | None = None) -> None:
    """Write a PNG (`png_bytes`) atomically (`atomic_write`), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, png_bytes(img, text))


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_dir(folder: str | Path):
    """A temporary sibling folder that is renamed to `folder` (absent or empty) if the block succeeds, and
    removed if it fails: a reader (or a crash) never finds half a model folder at `folder`."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        yield tmp
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file in the same folder, fsync, then rename it over `path`, so a
    reader (or a crash, or a full disk) never leaves half a file there; the file gets the usual
    permissions (mkstemp makes 0600 files)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> None:
    save_png(make_grid(images, nrow, upscale=upscale), path)
