"""A user's folder of images, with an optional `metadata.jsonl` (Hugging Face imagefolder convention).

Without metadata every image under the root (recursively, sorted) is an item with no caption and
no label. With `metadata.jsonl` in the root, its lines define the items, one JSON object a line:

    {"file_name": "cats/001.png", "text": "a cat", "label": 3, "conditioning_image": "edges/001.png"}

`file_name` is required; `text`, `label` and `conditioning_image` (paths relative to the root) are
optional, but `conditioning_image` must be on every line or on none, so batches stay uniform.

Every file is opened and fully decoded once at construction, so a corrupt download fails now,
by name, instead of hours into training inside a DataLoader worker. The results are kept in an index
outside the folder (`index_path`: $LDMKIT_CACHE, default ~/.cache/ldmkit), keyed by each file's size
and modification time, so the next run, or `ldmkit data check FOLDER` beforehand, decodes only the
files that changed.

Images become RGB: greyscale is replicated, palette images expanded, 16-bit scaled to 8-bit, and
transparency is composited onto WHITE; EXIF orientation is applied (`ldmkit.imageio.open_image`, which
also refuses decompression bombs by their header).

Captions, in order of precedence (kohya's sd-scripts, SimpleTuner and ai-toolkit read the same files):

    1. metadata.jsonl's "text"
    2. a caption file beside the image, `NAME` + `caption_extension` (default ".txt"), UTF-8 with or
       without a byte-order mark, stripped
    3. the word of its kohya repeat folder (below)
    4. with `filename_captions`, the file name's stem, underscores as spaces; else none, as kohya

kohya repeat folders: an image whose first folder under the root is named `N_word` (e.g. `10_sks dog/`)
appears N times in each epoch, and `word` captions it when 1 and 2 give nothing. Other folders repeat
once. The repeats are `epoch`: the item indices of one epoch, each as often as it repeats.

Loss masks (`mask`): "alpha" keeps the image's alpha channel as the mask; "files" reads `NAME_mask.png`
beside the image, or metadata.jsonl's "mask" column. An image without one trains whole (a mask of ones);
with "files", `*_mask.png` files beside an image of the same name are masks, not training images. Items
then carry "loss_mask" (1, H, W) in [0, 1], and the pixels it leaves out (0) take the value of the nearest
pixel it keeps (`transforms.fill_unmasked`: nothing outside the mask reaches the latents that train).

Every path must stay inside the folder: a metadata line naming `../x.png` or an absolute path is
refused, and so is a symlink that resolves outside the folder, unless `allow_outside_links` (config
`data.allow_outside_links`) says the user means it (e.g. a folder of links into a shared image store).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ldmkit.errors import LdmkitError
from ldmkit.data.transforms import alpha_of, crop_mask, fill_unmasked, resize_crop
from ldmkit.imageio import ImageProblem, atomic_write, open_image, to_rgb

INDEX_VERSION = 2  # 2: each entry also holds the image's width and height (aspect-ratio buckets)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"
MAX_NAMED = 5  # bad files named in one error message; the rest are counted
REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")  # kohya's `N_word`: N repeats, `word` the default caption
MASK_SUFFIX = "_mask.png"
MASK_MODES = ("none", "alpha", "files")


@dataclass(frozen=True)
class _Item:
    file: str  # path relative to the root, "/"-separated
    text: str = ""
    label: int = -1
    control: str | None = None  # conditioning image, relative to the root
    mask: str | None = None  # loss mask image (data.mask=files), relative to the root
    repeats: int = 1  # times in each epoch (kohya repeat folder)


def _problem(path: str, size: int) -> tuple[str | None, int, int]:
    """(None if the file decodes, else a short reason; its upright width and height at full scale)."""
    w = h = 0
    try:
        with Image.open(path) as im:  # the header alone: JPEG's draft decode in open_image shrinks the image
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn it a quarter
                w, h = h, w
    except Exception:  # noqa: BLE001 - open_image below names what is wrong with the file
        pass
    try:
        open_image(path, size)
    except ImageProblem as exc:
        return exc.reason, 0, 0
    return None, w, h


def index_path(root: str) -> Path:
    """Where the check results of image folder `root` are kept: never inside the user's data."""
    cache = Path(os.environ.get("LDMKIT_CACHE") or Path.home() / ".cache" / "ldmkit")
    return cache / "index" / (hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:32] + ".json")


def _load_index(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc.get("files", {}) if isinstance(doc, dict) and doc.get("version") == INDEX_VERSION else {}


def read_caption(path: str) -> str | None:
    """A caption file's text, stripped; UTF-8 with or without a BOM ("utf-8-sig" drops one if present).
    None when there is no such file."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise LdmkitError(f"caption file {path} cannot be read as UTF-8 text ({e}); save it as UTF-8") from None


def repeat_folder(file: str) -> tuple[int, str] | None:
    """(repeats, word) when the first folder of `file` (relative, "/"-separated) is a kohya `N_word` folder."""
    parts = file.split("/")
    m = REPEAT_FOLDER.match(parts[0]) if len(parts) > 1 else None
    if m is None:
        return None
    return int(m.group(1)), m.group(2).strip()


def _hash_fraction(name: str) -> float:
    """A stable number in [0, 1) from a file name: the split never changes when other files are added."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


class ImageFolderDataset(Dataset):
    """Images from a folder (see the module docstring); items: image, text, label, and control if given.

    Train/val split by hashing each file name: a file is val when its hash fraction < `val_fraction`;
    split "all" takes every image (to evaluate on a folder the model never trained on).
    If that leaves val empty in a folder of two or more images, the file with the smallest hash is val.
    Images are resized so the shorter side is `size`, then centre-cropped; with `center_crop=False`
    the train split crops at a random place instead (val always centres, to be comparable run to run),
    drawn from torch's RNG so DataLoader worker seeding applies. `seed` is accepted for a uniform
    interface; the split does not depend on it, so no seed ever trains on another run's val images.
    """

    def __init__(self, root: str, size: int = 32, split: str = "train", val_fraction: float = 0.05, seed: int = 0,
                 skip_bad: bool = False, center_crop: bool = True, allow_outside_links: bool = False,
                 caption_extension: str = ".txt", filename_captions: bool = False, mask: str = "none"):
        if split not in ("train", "val", "all"):
            raise LdmkitError(f"unknown split {split!r}: use 'train', 'val' or 'all'")
        if mask not in MASK_MODES:
            raise LdmkitError(f"unknown data.mask {mask!r}: use one of {', '.join(MASK_MODES)}")
        if not caption_extension or "/" in caption_extension or "\\" in caption_extension:
            raise LdmkitError(f"caption extension {caption_extension!r} is not a file extension; give e.g. .txt or .caption")
        caption_extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        self.caption_extension, self.filename_captions, self.mask = caption_extension, filename_captions, mask
        if not os.path.isdir(root):
            raise LdmkitError(f"image folder {root} does not exist or is not a folder; give a folder of images")
        self.root, self.size, self.split, self.seed = root, size, split, seed
        self.allow_outside_links = allow_outside_links
        self.random_crop = split == "train" and not center_crop
        self.name = os.path.basename(os.path.normpath(os.path.abspath(root)))

        items = self._read_metadata() if os.path.exists(self._path(METADATA)) else self._scan()
        if not items:
            raise LdmkitError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}; add images or fix the path")
        items = [self._complete(item) for item in items]
        items = self._verify(items, skip_bad)
        labels = [item.label for item in items]
        self.num_classes = max(labels) + 1 if max(labels) >= 0 else 0  # over both splits, so they agree

        fractions = {item.file: _hash_fraction(item.file) for item in items}
        val = {f for f, frac in fractions.items() if frac < val_fraction}
        if not val and len(items) >= 2 and val_fraction > 0:
            val = {min(fractions, key=fractions.get)}
        self.items = items if split == "all" else [item for item in items if (item.file in val) == (split == "val")]
        if not self.items:
            raise LdmkitError(f"the {split} split of {root} is empty ({len(items)} images in all); add more images")

    @property
    def epoch(self) -> list[int]:
        """The item indices of one epoch: each as often as its kohya repeat folder says (once elsewhere)."""
        return [i for i, item in enumerate(self.items) for _ in range(item.repeats)]

    def _complete(self, item: _Item) -> _Item:
        """The item with its caption (module docstring: metadata, caption file, folder word, file name),
        its repeats and, with mask="files", its mask file when one lies beside it."""
        stem = os.path.splitext(item.file)[0]
        folder = repeat_folder(item.file)
        text = item.text
        if not text:
            text = read_caption(self._inside(stem + self.caption_extension, f"caption of {item.file}")) or ""
        if not text and folder is not None:
            text = folder[1]
        if not text and self.filename_captions:
            text = os.path.basename(stem).replace("_", " ").strip()
        repeats = 1
        if folder is not None:
            repeats = folder[0]
            if repeats < 1:
                raise LdmkitError(f"{item.file}: its repeat folder {item.file.split('/')[0]!r} says 0 repeats; "
                                  "name it 1_... or more, or move the images out")
        mask = item.mask
        if self.mask == "files" and mask is None and os.path.isfile(self._path(stem + MASK_SUFFIX)):
            self._inside(stem + MASK_SUFFIX, f"mask of {item.file}")
            mask = stem + MASK_SUFFIX
        return _Item(item.file, text, item.label, item.control, mask, repeats)

    def _path(self, relative: str) -> str:
        return os.path.join(self.root, *relative.split("/"))

    def _inside(self, relative: str, where: str) -> str:
        """`relative` as a path under the root, refusing one that leaves it (by `..`, an absolute path or,
        unless allowed, a symlink resolving outside)."""
        if not relative or "\x00" in relative:
            raise LdmkitError(f"{where}: {relative!r} is not a file name; name a file inside {self.root}")
        parts = relative.replace("\\", "/").split("/")
        if os.path.isabs(relative) or ".." in parts:
            raise LdmkitError(f"{where}: {relative!r} leaves the data folder {self.root}; name files inside it")
        path = self._path(relative)
        root = os.path.realpath(self.root)
        if not self.allow_outside_links and os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise LdmkitError(f"{where}: {relative!r} is a link to {os.path.realpath(path)}, outside the data folder "
                              f"{self.root}; set data.allow_outside_links=true if that is meant")
        return path

    def _scan(self) -> list[_Item]:
        files = []
        for folder, dirs, names in os.walk(self.root):
            dirs.sort()
            files += [os.path.relpath(os.path.join(folder, n), self.root).replace(os.sep, "/")
                      for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
        if self.mask == "files":  # NAME_mask.png beside NAME.ext is NAME's mask, not an image to train on
            stems = {os.path.splitext(f)[0] for f in files}
            files = [f for f in files if not (f.endswith(MASK_SUFFIX) and f[: -len(MASK_SUFFIX)] in stems)]
        for file in files:
            self._inside(file, f"image folder {self.root}")
        return [_Item(file) for file in sorted(files)]

    def _read_metadata(self) -> list[_Item]:
        path, items, with_control = self._path(METADATA), [], None
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LdmkitError(f"{where} is not valid JSON ({exc.msg}); write one JSON object a line") from None
                if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                    raise LdmkitError(f'{where} has no "file_name"; '
                                      'each line needs {"file_name": "path/in/folder.png", ...}')
                text, label, control = row.get("text", ""), row.get("label", -1), row.get("conditioning_image")
                mask = row.get("mask") if self.mask == "files" else None
                if mask is not None and not isinstance(mask, str):
                    raise LdmkitError(f'{where}: "mask" must be a file name inside the folder, got {mask!r}')
                if not isinstance(text, str):
                    raise LdmkitError(f'{where}: "text" must be a string, got {text!r}')
                if isinstance(label, bool) or not isinstance(label, int) or label < -1:
                    raise LdmkitError(f'{where}: "label" must be a non-negative integer, got {label!r}')
                for key, name in (("file_name", row["file_name"]), ("conditioning_image", control), ("mask", mask)):
                    if name is not None and not os.path.isfile(self._inside(name, f"{where}: {key}")):
                        raise LdmkitError(f"{where}: {key} {name!r} not found under {self.root}; fix the line")
                if with_control is None:
                    with_control = control is not None
                elif with_control != (control is not None):
                    raise LdmkitError(f'{where}: "conditioning_image" must be given on every line or on none')
                items.append(_Item(row["file_name"], text, label, control, mask))
        return items

    def _verify(self, items: list[_Item], skip_bad: bool) -> list[_Item]:
        """Decode every image not already checked in its present form (threads: PIL releases the GIL while
        decoding); report or drop bad ones. `self.checked` = (files, of which reused from the index)."""
        files = sorted({item.file for item in items} | {item.control for item in items if item.control}
                       | {item.mask for item in items if item.mask})
        index_file = index_path(self.root)
        index, stamps, problems, dims = _load_index(index_file), {}, {}, {}
        for f in files:
            try:
                st = os.stat(self._path(f))
                stamps[f] = [st.st_size, st.st_mtime_ns]
            except OSError:
                stamps[f] = None  # vanished since the listing: decoding it names the problem
            entry = index.get(f)
            if stamps[f] is not None and isinstance(entry, list) and len(entry) == 5 and entry[:2] == stamps[f]:
                problems[f], dims[f] = entry[2], tuple(entry[3:])
        todo = [f for f in files if f not in problems]
        self.checked = (len(files), len(files) - len(todo))
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(lambda f: _problem(self._path(f), self.size), todo)
            for f, (why, w, h) in tqdm(zip(todo, results), total=len(todo), desc="checking images", leave=False,
                                       disable=len(todo) < 2000):
                problems[f], dims[f] = why, (w, h)
        self.dims = dims  # file -> (width, height): aspect-ratio buckets place each image without opening it
        if todo:
            index.update({f: stamps[f] + [problems[f], *dims[f]] for f in todo if stamps[f] is not None})
            try:  # a cache: a read-only home only costs the next run its decode
                index_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(index_file, json.dumps({"version": INDEX_VERSION, "root": os.path.realpath(self.root),
                                                     "files": index}).encode())
            except OSError:
                pass
        bad = {f: why for f, why in problems.items() if why is not None}
        if not bad:
            return items
        listed = ", ".join(f"{f} ({why})" for f, why in list(bad.items())[:MAX_NAMED])
        if len(bad) > MAX_NAMED:
            listed += f", and {len(bad) - MAX_NAMED} more"
        summary = f"{len(bad)} unreadable image file{'s' if len(bad) > 1 else ''} in {self.root}: {listed}"
        if not skip_bad:
            raise LdmkitError(f"{summary}; fix or remove them, or pass --skip-bad-images (skip_bad=True) to skip them")
        warnings.warn(f"skipping {summary}", stacklevel=3)
        kept = [item for item in items if item.file not in bad and item.control not in bad and item.mask not in bad]
        if not kept:
            raise LdmkitError(f"no readable images left in {self.root}; {summary}")
        return kept

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, generator: torch.Generator | None = None, target: tuple[int, int] | None = None) -> dict:
        """Item `index` at `target` (height, width; default size x size), cut at a random place drawn from
        `generator` when this split crops at random (else centred). The streaming loader passes a generator
        seeded by (seed, step, row), so crops resume exactly. "original_size_crop" is (original height,
        width, crop top, left), SDXL's micro-conditioning values."""
        item = self.items[index]
        decoded = open_image(self._path(item.file), max(target) if target else self.size)
        image = to_rgb(decoded)
        control = to_rgb(open_image(self._path(item.control), self.size)) if item.control is not None else None
        x, c, record = resize_crop(image, target or self.size, generator if self.random_crop else None, control)
        out = {"image": x, "text": item.text, "label": item.label, "original_size_crop": torch.tensor(record)}
        if c is not None:
            out["control"] = c
        if self.mask != "none":  # every item carries one, so batches stay uniform
            mask = alpha_of(decoded) if self.mask == "alpha" else (
                to_rgb(open_image(self._path(item.mask), self.size, "mask")) if item.mask is not None else None)
            out["loss_mask"] = crop_mask(mask, record, target or self.size)  # (1, H, W)
            out["image"] = fill_unmasked(x, out["loss_mask"])  # nothing outside the mask reaches the encoder
        return out

    def __getitem__(self, index: int) -> dict:
        generator = None
        if self.random_crop:  # drawn from torch's RNG, so DataLoader worker seeding applies
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        return self.load(index, generator)
