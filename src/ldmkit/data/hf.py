"""Hugging Face `datasets` as a source: a dataset saved with `save_to_disk`, or parquet files.

The Arrow table is memory-mapped by `datasets`, so a DataLoader worker reads one row at a time and
memory does not grow with the table. Columns are named by config (`data.image_column`,
`data.text_column`, `data.label_column`); unset, the usual names are tried ("image"/"img",
"text"/"caption", "label"/"labels"). A DatasetDict's "train" split trains; its "validation" or "test"
split validates, else the rows are split by hashing their index, as image folders hash file names.
"""

from __future__ import annotations

import glob
import io
import os

import torch
from PIL import Image
from torch.utils.data import Dataset

from ldmkit.data.transforms import resize_crop
from ldmkit.errors import LdmkitError
from ldmkit.imageio import ImageProblem, open_image, to_rgb

IMAGE_COLUMNS, TEXT_COLUMNS, LABEL_COLUMNS = ("image", "img", "pixel_values"), ("text", "caption", "prompt"), ("label", "labels")


def is_hf_spec(spec: str) -> bool:
    """A `save_to_disk` folder (dataset_info.json / state.json / dataset_dict.json) or parquet file(s)."""
    if spec.endswith(".parquet"):
        return True
    return os.path.isdir(spec) and any(os.path.isfile(os.path.join(spec, n)) for n in
                                       ("dataset_dict.json", "state.json", "dataset_info.json"))


def _load(spec: str):
    try:
        import datasets
    except ImportError:
        raise LdmkitError(f"{spec} is a Hugging Face dataset; install the `datasets` package "
                          "(pip install 'ldmkit[hf]')") from None
    datasets.disable_progress_bars()
    if spec.endswith(".parquet"):
        files = sorted(glob.glob(spec))
        if not files:
            raise LdmkitError(f"no parquet files match {spec!r}")
        return datasets.load_dataset("parquet", data_files=files, split="train")
    return datasets.load_from_disk(spec)


def _column(names: list[str], chosen: str | None, candidates: tuple[str, ...], what: str, spec: str,
            required: bool) -> str | None:
    if chosen:
        if chosen not in names:
            raise LdmkitError(f"{spec} has no column {chosen!r} (data.{what}_column); it has {', '.join(names)}")
        return chosen
    found = next((c for c in candidates if c in names), None)
    if found is None and required:
        raise LdmkitError(f"{spec} has no {what} column ({', '.join(candidates)}); name it with data.{what}_column "
                          f"(columns: {', '.join(names)})")
    return found


class HFImageDataset(Dataset):
    """Rows of a Hugging Face dataset as items {image, text, label}; see the module docstring."""

    def __init__(self, spec: str, size: int, split: str = "train", val_fraction: float = 0.05,
                 image_column: str | None = None, text_column: str | None = None, label_column: str | None = None,
                 random_crop: bool = False):
        if split not in ("train", "val", "all"):
            raise LdmkitError(f"unknown split {split!r}: use 'train', 'val' or 'all'")
        ds, hashed = _load(spec), split != "all"
        if hasattr(ds, "keys"):  # a DatasetDict: its own held-out split, when it has one, replaces hashing
            names = list(ds.keys())
            held = next((n for n in ("validation", "test", "val") if n in names), None)
            train = "train" if "train" in names else names[0]
            ds = ds[held] if split == "val" and held is not None else ds[train]
            hashed = hashed and held is None
        cols = list(ds.column_names)
        self.image_col = _column(cols, image_column, IMAGE_COLUMNS, "image", spec, True)
        self.text_col = _column(cols, text_column, TEXT_COLUMNS, "text", spec, False)
        self.label_col = _column(cols, label_column, LABEL_COLUMNS, "label", spec, False)
        self.ds, self.size, self.spec, self.random_crop = ds, size, spec, random_crop and split != "val"
        self.name = os.path.basename(os.path.normpath(spec))
        self.rows = None  # every row of `ds`, else the hashed split's row ids
        if hashed:
            from ldmkit.data.folder import _hash_fraction

            self.rows = [i for i in range(len(ds)) if (_hash_fraction(str(i)) < val_fraction) == (split == "val")]
        if len(self) == 0:
            raise LdmkitError(f"the {split} split of {spec} is empty ({len(ds)} rows in all); add rows")
        self.num_classes = 0
        if self.label_col is not None:
            feature = ds.features[self.label_col]
            names = getattr(feature, "names", None)
            self.num_classes = len(names) if names else int(max(ds[self.label_col])) + 1

    def __len__(self) -> int:
        return len(self.ds) if self.rows is None else len(self.rows)

    def load(self, index: int, generator: torch.Generator | None = None) -> dict:
        row_id = index if self.rows is None else self.rows[index]
        row = self.ds[row_id]
        value = row[self.image_col]
        where = f"{self.spec} row {row_id}"
        try:
            if isinstance(value, Image.Image):
                image = value
                image.load()
            elif isinstance(value, dict) and value.get("bytes") is not None:
                image = open_image(io.BytesIO(value["bytes"]), self.size, what=f"image of {where}")
            elif isinstance(value, dict) and value.get("path"):
                image = open_image(value["path"], self.size, what=f"image of {where}")
            else:
                raise LdmkitError(f"{where}: column {self.image_col!r} holds {type(value).__name__}, not an image")
        except (OSError, ValueError) as e:
            raise ImageProblem("image of", where, str(e)[:80]) from None
        x, _, _ = resize_crop(to_rgb(image), self.size, generator if self.random_crop else None)
        label = int(row[self.label_col]) if self.label_col is not None and row[self.label_col] is not None else -1
        text = str(row[self.text_col] or "") if self.text_col is not None else ""
        return {"image": x, "text": text, "label": label}

    def __getitem__(self, index: int) -> dict:
        return self.load(index)
