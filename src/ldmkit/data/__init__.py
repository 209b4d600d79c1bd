"""Datasets: built-in (procedural shapes in two layouts, digits, faces, photos) and a user's image folder.

Every dataset returns dicts {"image": (3, H, W) float32 in [-1, 1], "text": str, "label": int, ...}
and has `num_classes` and `name`. `build_dataset` turns a command-line string into one of them.
Heavy packages (scikit-learn, scikit-image) are imported only when their dataset is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch.utils.data import Dataset

from ldmkit.errors import LdmkitError


def _shapes(size: int, split: str, seed: int = 0, length: int | None = None) -> Dataset:
    from ldmkit.data.shapes import ShapesDataset

    return ShapesDataset(size=size, length=length, seed=seed, split=split)


def _shapes_free(size: int, split: str, seed: int = 0, length: int | None = None) -> Dataset:
    from ldmkit.data.shapes import ShapesDataset

    return ShapesDataset(size=size, length=length, seed=seed, split=split, layout="free")


def _digits(size: int, split: str, seed: int = 0, length: int | None = None) -> Dataset:
    from ldmkit.data.builtin import DigitsDataset

    return DigitsDataset(size=size, split=split, seed=seed)  # fixed data: `length` does not apply


def _faces(size: int, split: str, seed: int = 0, length: int | None = None) -> Dataset:
    from ldmkit.data.builtin import FacesDataset

    return FacesDataset(size=size, split=split, seed=seed)  # fixed data: `length` does not apply


def _photos(size: int, split: str, seed: int = 0, length: int | None = None) -> Dataset:
    from ldmkit.data.builtin import PhotosDataset

    return PhotosDataset(size=size, split=split, seed=seed, length=length)


# name -> factory(size, split, seed, length); the CLI takes its choices from these keys. The factories are
# private and underscored so they never collide with the submodules ldmkit.data.shapes etc.
DATASETS: dict[str, Callable[..., Dataset]] = {"shapes": _shapes, "shapes-free": _shapes_free, "digits": _digits,
                                               "faces": _faces, "photos": _photos}


def dataset_names() -> list[str]:
    return list(DATASETS)


def build_dataset(name_or_path: str, size: int, split: str, seed: int = 0, skip_bad: bool = False,
                  length: int | None = None, allow_outside_links: bool = False, caption_extension: str = ".txt",
                  filename_captions: bool = False, mask: str = "none") -> Dataset:
    """A built-in dataset by name, the first items of tar shards, a Hugging Face dataset, or an
    `ImageFolderDataset` for a folder path.

    `length` sets the number of items of procedural datasets (shapes, photos) and is ignored by
    fixed ones; `skip_bad` only matters for folders; `caption_extension` and `mask` for folders and
    shards, `filename_captions` for folders (the `data.*` options of the same names). A built-in name
    wins over a folder of that name.
    """
    if name_or_path in DATASETS:
        return DATASETS[name_or_path](size=size, split=split, seed=seed, length=length)
    from ldmkit.data.hf import is_hf_spec
    from ldmkit.data.shards import ShardItems, is_shard_spec

    if is_shard_spec(name_or_path):  # a stream: its first items (training streams them: ldmkit.train.data)
        from ldmkit.data.shards import caption_field

        return ShardItems(name_or_path, size, split, limit=length or 1024, skip_bad=skip_bad,
                          caption=caption_field(caption_extension), mask=mask)
    if is_hf_spec(name_or_path):
        from ldmkit.data.hf import HFImageDataset

        return HFImageDataset(name_or_path, size, split)
    if os.path.isdir(name_or_path):
        from ldmkit.data.folder import ImageFolderDataset

        return ImageFolderDataset(name_or_path, size=size, split=split, seed=seed, skip_bad=skip_bad,
                                  allow_outside_links=allow_outside_links, caption_extension=caption_extension,
                                  filename_captions=filename_captions, mask=mask)
    raise LdmkitError(
        f"unknown dataset {name_or_path!r}: use one of {', '.join(DATASETS)}, or the path of a folder of images "
        "(no such folder exists)"
    )
