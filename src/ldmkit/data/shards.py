"""WebDataset tar shards: the convention of LAION-scale training, read as a stream with bounded memory.

A shard is a plain POSIX tar file. Files that share a *key* (the member name up to the first dot of its
base name) form one sample, and the rest of the name is the field:

    000042.jpg | .jpeg | .png | .webp    the image (required)
    000042.txt                            the caption (UTF-8)
    000042.json                           {"text": ..., "label": ...} (either key optional)
    000042.cls                            the class id as decimal text
    000042.control.png | .control.jpg     a conditioning image, registered with the image
    000042.mask.png | .mask.jpg | …       a loss mask (`data.mask=files`; "alpha" reads the image's alpha)

The caption field is `txt` unless `data.caption_extension` names another (".caption" reads 000042.caption).
kohya repeat folders do not carry into shards: a shard lists each sample once.

Reading a stream (`ShardStream`) so that a kill and a resume see each item as often as an uninterrupted
run would, on any number of processes:

- Readers. Every torchrun rank has `workers` DataLoader workers; reader g = slot·world + rank of the
  world·workers readers takes, in epoch e, the shards at positions g, g + R, g + 2R, … of the epoch's
  shard permutation (seeded by (seed, e)). Each shard of an epoch is read by exactly one reader, so each
  item is seen exactly once per epoch across all ranks. Each reader streams its epochs one after another
  without end; training decides how many steps to take.
- Order inside a shard. The tar headers are listed first (no image is read), the samples shuffled by
  (seed, e, shard), then read one by one with a seek: memory holds one shard's headers, never its images.
- Position. A reader's place is (epoch, k-th shard of its list, offset in the shard); every batch it
  yields carries its place after that batch, and the training loop checkpoints the place of each
  reader. A DataLoader hands out batches from its workers in turn, so after c batches the next comes
  from slot c mod workers; on resume worker w plays slot (w + c) mod workers, and the sequence of
  batches continues exactly.

The train/val split hashes each sample's key (as image folders hash file names), so it never depends
on the shard layout; validation reads the first shards until it has enough val samples.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from ldmkit.data.folder import ImageFolderDataset, _hash_fraction  # one split rule for folders and shards
from ldmkit.data.transforms import alpha_of, crop_mask, fill_unmasked, resize_crop
from ldmkit.errors import LdmkitError
from ldmkit.imageio import ImageProblem, atomic_write, open_image, to_rgb

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
CONTROL_FIELDS = ("control.png", "control.jpg", "control.jpeg", "control.webp")
MASK_FIELDS = ("mask.png", "mask.jpg", "mask.jpeg", "mask.webp")


# --- naming shards -------------------------------------------------------------------------------


def _expand_braces(spec: str) -> list[str]:
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar'] (the WebDataset / bash range syntax;
    the width of the first bound is kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if not m:
        return [spec]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    if hi < lo:
        raise LdmkitError(f"shard range {m.group(0)} in {spec!r} runs backwards; write {{{lo:0{width}d}..{hi}}} low to high")
    out = []
    for i in range(lo, hi + 1):
        out += _expand_braces(spec[: m.start()] + f"{i:0{width}d}" + spec[m.end() :])
    return out


def is_shard_spec(spec: str) -> bool:
    """True for a tar file, a pattern of tar files, or a folder holding only .tar shards."""
    if spec.endswith(".tar") or ".tar" in spec and ("{" in spec or "*" in spec):
        return True
    return os.path.isdir(spec) and any(n.endswith(".tar") for n in os.listdir(spec)) and not any(
        n.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".jsonl")) for n in os.listdir(spec))


def list_shards(spec: str) -> list[str]:
    """The shard files `spec` names: a brace range, a glob, one file, or a folder of .tar files."""
    if os.path.isdir(spec):
        paths = sorted(glob(os.path.join(spec, "*.tar")))
    else:
        paths = []
        for part in _expand_braces(spec):
            paths += sorted(glob(part)) if any(ch in part for ch in "*?[") else [part]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LdmkitError(f"shard {missing[0]}{more} named by {spec!r} does not exist; check the pattern")
    if not paths:
        raise LdmkitError(f"no .tar shards match {spec!r}; give e.g. 'shards/{{00000..00009}}.tar' or a folder of .tar files")
    return paths


# --- reading one shard ---------------------------------------------------------------------------


def _split_name(name: str) -> tuple[str, str]:
    folder, base = os.path.split(name)
    key, _, field = base.partition(".")
    return (f"{folder}/{key}" if folder else key), field.lower()


def list_samples(path: str) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """The samples of one shard in file order: (key, {field: member}), from the tar headers alone."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
    except (OSError, tarfile.TarError) as e:
        raise LdmkitError(f"shard {path} is not a readable tar file ({e}); re-create it (ldmkit data make-shards)") from None
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in members:
        if m.isfile():
            key, field = _split_name(m.name)
            samples.setdefault(key, {})[field] = m
    return [(k, v) for k, v in samples.items() if any(f in v for f in IMAGE_FIELDS)]


def caption_field(caption_extension: str = ".txt") -> str:
    """The shard field of a caption file extension: ".txt" -> "txt"."""
    return caption_extension.lstrip(".").lower()


def decode_sample(tar: tarfile.TarFile, path: str, key: str, fields: dict[str, tarfile.TarInfo], size: int,
                  generator: torch.Generator | None, caption: str = "txt", mask: str = "none") -> dict:
    """One sample as an item {image, text, label[, control][, loss_mask]}; an undecodable one raises
    ImageProblem. `caption`: the caption field; `mask`: data.mask (module docstring)."""
    def read(field: str) -> bytes:
        return tar.extractfile(fields[field]).read()

    where = f"{path}:{key}"
    image_field = next(f for f in IMAGE_FIELDS if f in fields)
    text, label = "", -1
    if "json" in fields:
        try:
            meta = json.loads(read("json"))
        except ValueError:
            raise ImageProblem("sample", where, "its .json is not valid JSON") from None
        if isinstance(meta, dict):
            text = meta.get("text", meta.get("caption", "")) or ""
            label = meta.get("label", -1)
    if caption in fields:  # utf-8-sig: a byte-order mark is not part of the caption
        text = read(caption).decode("utf-8-sig", errors="replace").strip()
    if "cls" in fields:
        try:
            label = int(read("cls").decode().strip())
        except ValueError:
            raise ImageProblem("sample", where, "its .cls is not an integer") from None
    if not isinstance(label, int) or isinstance(label, bool) or label < -1:
        raise ImageProblem("sample", where, f"label {label!r} is not a non-negative integer")
    def decoded(field: str):
        try:
            return open_image(io.BytesIO(read(field)), size)
        except ImageProblem as e:
            raise ImageProblem("image", f"{where}.{field}", e.reason) from None

    control_field = next((f for f in CONTROL_FIELDS if f in fields), None)
    control = to_rgb(decoded(control_field)) if control_field is not None else None
    raw = decoded(image_field)
    x, c, record = resize_crop(to_rgb(raw), size, generator, control)
    item = {"image": x, "text": str(text), "label": label}
    if c is not None:
        item["control"] = c
    if mask != "none":  # every item carries one (ones where the sample has none), so batches stay uniform
        mask_field = next((f for f in MASK_FIELDS if f in fields), None)
        m = alpha_of(raw) if mask == "alpha" else (to_rgb(decoded(mask_field)) if mask_field is not None else None)
        item["loss_mask"] = crop_mask(m, record, size)  # (1, H, W)
        item["image"] = fill_unmasked(x, item["loss_mask"])  # nothing outside the mask reaches the encoder
    return item


def in_split(key: str, split: str, val_fraction: float) -> bool:
    return split == "all" or (_hash_fraction(key) < val_fraction) == (split == "val")


def read_items(shards: list[str], size: int, split: str, limit: int, val_fraction: float = 0.05,
               skip_bad: bool = False, caption: str = "txt", mask: str = "none") -> list[dict]:
    """The first `limit` samples of `split` in shard order (all of them for a negative `limit`),
    centre-cropped (validation, sample grids, encoding)."""
    out: list[dict] = []
    for path in shards:
        samples = list_samples(path)  # names an unreadable shard
        with tarfile.open(path, "r:") as tar:
            for key, fields in samples:
                if in_split(key, split, val_fraction):
                    try:
                        out.append(decode_sample(tar, path, key, fields, size, None, caption, mask))
                    except LdmkitError as e:
                        if skip_bad:
                            continue
                        raise LdmkitError(f"{e}; fix or remove it, or pass --skip-bad-images") from None
                    if len(out) == limit:
                        return out
    return out


class ShardItems(Dataset):
    """The first `limit` samples of a split of tar shards, decoded and centre-cropped, as a map-style
    dataset: what evaluation and validation read from a collection that trains as a stream."""

    def __init__(self, spec: str, size: int, split: str = "val", limit: int = 1024, skip_bad: bool = False,
                 caption: str = "txt", mask: str = "none"):
        if split not in ("train", "val", "all"):
            raise LdmkitError(f"unknown split {split!r}: use 'train', 'val' or 'all'")
        self.items = read_items(list_shards(spec), size, split, limit, skip_bad=skip_bad, caption=caption, mask=mask)
        if not self.items:
            raise LdmkitError(f"the {split} split of the shards {spec!r} is empty; add samples")
        self.name = os.path.basename(os.path.normpath(spec.split("{")[0])) or spec
        self.num_classes = max(it["label"] for it in self.items) + 1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


# --- the stream ----------------------------------------------------------------------------------


def collate(items: list[dict]) -> dict:
    """Items -> a batch {image (B, 3, H, W), label (B,), text [B], control (B, 3, H, W) if present}."""
    batch = {"image": torch.stack([it["image"] for it in items]),
             "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
             "text": [it["text"] for it in items]}
    for k in ("control", "loss_mask"):
        if all(k in it for it in items):
            batch[k] = torch.stack([it[k] for it in items])
    return batch


class ShardStream(IterableDataset):
    """This rank's endless stream of batches of `batch` items from tar shards (module docstring), each a
    collated batch plus "_pos": (slot, epoch, k, offset), its reader's place after the batch, and
    "_epochs": the epoch each item was read in.

    `state` ({"batches": c, "slots": {slot: [epoch, k, offset]}}) continues a checkpointed stream.
    An item that does not decode stops the stream with its shard and key named (a dict {"_error": why}
    is yielded, which the training loop raises) unless `skip_bad`, which drops it and counts it."""

    def __init__(self, shards: list[str], size: int, batch: int, *, seed: int = 0, split: str = "train",
                 val_fraction: float = 0.05, rank: int = 0, world: int = 1, workers: int = 1,
                 random_crop: bool = False, skip_bad: bool = False, state: dict | None = None,
                 caption: str = "txt", mask: str = "none"):
        if len(shards) < world:
            raise LdmkitError(f"{len(shards)} shards for {world} processes: each process needs at least one shard; "
                              "write smaller shards (ldmkit data make-shards --shard-size)")
        self.shards, self.size, self.batch, self.seed, self.split = shards, size, batch, seed, split
        self.val_fraction, self.rank, self.world = val_fraction, rank, world
        self.workers = max(1, min(workers, len(shards) // world))  # every reader needs a shard each epoch
        self.random_crop, self.skip_bad, self.caption, self.mask = random_crop, skip_bad, caption, mask
        self.state = state or {"batches": 0, "slots": {}}

    def shards_of(self, slot: int, epoch: int) -> list[int]:
        """Indices of the shards reader (rank, slot) reads in `epoch`, in reading order."""
        perm = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        g, readers = slot * self.world + self.rank, self.world * self.workers
        return perm[g::readers].tolist()

    def samples_of(self, shard: int, epoch: int) -> list[tuple[str, dict]]:
        path = self.shards[shard]
        samples = [s for s in list_samples(path) if in_split(s[0], self.split, self.val_fraction)]
        g = torch.Generator().manual_seed((self.seed * 7919 + epoch) * 1_000_003 + shard)
        return [samples[i] for i in torch.randperm(len(samples), generator=g).tolist()]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = (worker + self.state["batches"]) % self.workers
        epoch, k, offset = self.state["slots"].get(str(slot), (0, 0, 0))
        items: list[dict] = []
        empty_epochs = 0
        while True:
            got = False
            order = self.shards_of(slot, epoch)
            while k < len(order):
                shard, path = order[k], self.shards[order[k]]
                samples = self.samples_of(shard, epoch)
                with tarfile.open(path, "r:") as tar:
                    while offset < len(samples):
                        key, fields = samples[offset]
                        offset += 1
                        g = None
                        if self.random_crop:
                            g = torch.Generator().manual_seed(((self.seed * 7919 + epoch) * 1_000_003 + shard) * 65_537 + offset)
                        try:
                            items.append({**decode_sample(tar, path, key, fields, self.size, g, self.caption,
                                                          self.mask), "_epoch": epoch})
                        except LdmkitError as e:
                            if self.skip_bad:
                                continue
                            yield {"_error": f"{e}; fix or remove it, or pass --skip-bad-images"}
                            return
                        got = True
                        if len(items) == self.batch:
                            yield {**collate(items), "_epochs": [it["_epoch"] for it in items], "_pos": (slot, epoch, k, offset)}
                            items = []
                k, offset = k + 1, 0
            epoch, k = epoch + 1, 0
            empty_epochs = 0 if got else empty_epochs + 1
            if empty_epochs >= 2:
                yield {"_error": f"the {self.split} split of the shards read by process {self.rank} is empty; "
                                 "add samples or use fewer shards per process"}
                return


# --- writing shards ------------------------------------------------------------------------------


def make_shards(folder: str, out: str | Path, shard_size: int = 1000, skip_bad: bool = False,
                progress: bool = True, mask: str = "none") -> list[Path]:
    """Write the images of an image folder (and its metadata.jsonl captions, labels and conditioning
    images) as tar shards OUT/00000.tar, 00001.tar, … of `shard_size` samples, the files' bytes unchanged.
    `mask` is data.mask: with "files" each image's mask file travels as KEY.mask.EXT (and `*_mask.png` files
    are masks, not samples, as the folder reads them); an image's alpha always travels with it (re-encoded
    formats are written as RGBA PNG), so "alpha" reads the same masks from the shards as from the folder.
    Each shard is written whole to a temporary name and renamed, so a killed run leaves only whole shards."""
    if shard_size < 1:
        raise LdmkitError(f"--shard-size must be at least 1, got {shard_size}")
    ds = ImageFolderDataset(folder, size=8, split="all", skip_bad=skip_bad, mask=mask)  # checks every file (indexed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    items = ds.items
    for start in tqdm(range(0, len(items), shard_size), desc="writing shards", disable=not progress, leave=False):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i, item in enumerate(items[start : start + shard_size], start):
                key = f"{i:08d}"
                files = {**_image_field("", item.file, ds, IMAGE_FIELDS)}
                meta = {"file_name": item.file}
                if item.text:
                    files["txt"] = item.text.encode()
                if item.label >= 0:
                    files["cls"] = str(item.label).encode()
                if item.control is not None:
                    cext = os.path.splitext(item.control)[1].lower().lstrip(".")
                    if f"control.{cext}" in CONTROL_FIELDS:
                        files[f"control.{cext}"] = Path(ds._path(item.control)).read_bytes()
                    else:
                        raise LdmkitError(f"conditioning image {item.control}: shards carry png/jpg/webp; convert it")
                if item.mask is not None:
                    files.update(_image_field("mask.", item.mask, ds, MASK_FIELDS))
                files["json"] = json.dumps(meta).encode()
                for field, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible shards
                    tar.addfile(info, io.BytesIO(data))
        path = out / f"{start // shard_size:05d}.tar"
        atomic_write(path, buf.getvalue())
        written.append(path)
    return written


def _image_field(prefix: str, file: str, ds: ImageFolderDataset, allowed: tuple[str, ...]) -> dict[str, bytes]:
    """{field: bytes} of one image file: its bytes unchanged where the shard format names its type (png, jpg,
    webp), else (bmp, gif, tiff) re-encoded losslessly as PNG, keeping an alpha channel (a loss mask may be read
    from it) so the reader composites it onto white exactly as the folder does."""
    ext = os.path.splitext(file)[1].lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if prefix + ext in allowed:
        return {prefix + ext: Path(ds._path(file)).read_bytes()}
    from PIL import Image

    png = io.BytesIO()
    with Image.open(ds._path(file)) as im:
        (im.convert("RGBA") if alpha_of(im) is not None else to_rgb(im)).save(png, format="PNG")
    return {prefix + "png": png.getvalue()}
