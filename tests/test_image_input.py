"""Images users give: one opener for folders and for --init-image / --mask / --control (16-bit, palette,
EXIF orientation, decompression bombs), and data folders that cannot be made to read outside themselves."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ldmkit.data.folder import ImageFolderDataset
from ldmkit.errors import LdmkitError
from ldmkit.imageio import open_image
from ldmkit.sample import read_image


def bomb_png(path, side: int = 60000) -> None:
    """A valid PNG signature and header claiming side x side RGB pixels, with a tiny body: opening it must
    be refused from the header, before anything is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_init_image_16_bit_palette_and_exif(tmp_path):
    sixteen = tmp_path / "16bit.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(sixteen)  # white in 16 bits
    assert Image.open(sixteen).mode.startswith("I")
    x = read_image(sixteen, 3, 8, "init image", True)
    assert x.shape == (1, 3, 8, 8) and x.min() > 0.99  # scaled, not clipped to 255/65535 (almost black)

    palette = tmp_path / "palette.png"
    Image.fromarray(np.tile(np.array([0, 255], np.uint8), (8, 4))).convert("P").save(palette)
    x = read_image(palette, 3, 8, "init image", True)
    assert x[0, :, :, 0].max() < -0.99 and x[0, :, :, 1].min() > 0.99  # black and white columns kept

    # EXIF orientation 6 (rotate 90° clockwise to view): the left half black becomes the top half
    rotated = tmp_path / "exif.jpg"
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, 8:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(rotated, exif=exif, quality=95)
    x = read_image(rotated, 3, 16, "init image", True)
    assert x[0, :, :8].mean() < -0.9 and x[0, :, 8:].mean() > 0.9  # top black, bottom white (after rotation)


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb_png(bomb)
    with pytest.raises(LdmkitError, match="decompression bomb"):
        open_image(bomb)
    with pytest.raises(LdmkitError, match="init image"):
        read_image(bomb, 3, 8, "init image", True)
    bomb_png(bomb, side=17000)  # over ldmkit's 2^28 pixels, under PIL's own guard: ldmkit's check names the size
    with pytest.raises(LdmkitError, match="17000x17000"):
        open_image(bomb)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{i}.png")
    bomb_png(folder / "z.png")
    with pytest.raises(LdmkitError, match="z.png"):
        ImageFolderDataset(str(folder), size=8)


def _folder(tmp_path, names):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n}) + "\n" for n in names))
    return root


def test_metadata_cannot_name_files_outside_the_folder(tmp_path):
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
    for name in ("../secret.png", str(outside), "sub/../../secret.png"):
        sub = tmp_path / f"case{abs(hash(name))}"
        sub.mkdir()
        root = _folder(sub, ["0.png", "1.png", name])
        with pytest.raises(LdmkitError, match="leaves the data folder"):
            ImageFolderDataset(str(root), size=8)


def test_symlinks_out_of_the_folder_need_the_opt_in(tmp_path):
    outside = tmp_path / "store"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "x.png")
    root = _folder(tmp_path, ["0.png", "1.png", "2.png", "link.png"])
    (root / "link.png").symlink_to(outside / "x.png")
    with pytest.raises(LdmkitError, match="allow_outside_links"):
        ImageFolderDataset(str(root), size=8)
    (root / "metadata.jsonl").unlink()  # the scanned folder checks its files the same way
    with pytest.raises(LdmkitError, match="outside the data folder"):
        ImageFolderDataset(str(root), size=8)
    ds = ImageFolderDataset(str(root), size=8, allow_outside_links=True)
    assert len(ds) + len(ImageFolderDataset(str(root), size=8, split="val", allow_outside_links=True)) == 4
