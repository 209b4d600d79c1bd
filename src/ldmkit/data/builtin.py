"""Real images that ship inside installed packages, so training works offline with no download.

- `DigitsDataset`: scikit-learn's handwritten digits (1,797 greyscale 8x8 images, ink 0..16, 10 classes).
- `FacesDataset`: scikit-image's `lfw_subset.npy`: 200 greyscale 25x25 crops in [0, 1], of which only
  the first 100 are faces (the last 100 are background patches, kept there for face-detection demos).
- `PhotosDataset`: random crops, at many scales, of every photograph that ships inside the installed
  packages (scikit-image's data folder, scikit-learn's two sample images, matplotlib's sample photo);
  whole photographs are held out for validation. The other `skimage.data` images are fetched with
  pooch and are not used; synthetic images (logos, text, test patterns) are left out.

Held-out splits are fixed and independent of `seed`, so a model trained with any seed is never
evaluated on images it saw. The heavy packages are imported only when a dataset is built.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ldmkit.errors import LdmkitError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# The photographs that ship inside installed packages, as "package:file". motorcycle_right is left out:
# it is the other half of the stereo pair with motorcycle_left and would leak a near copy across the split.
TRAIN_PHOTOS = ("skimage:astronaut.png", "skimage:coffee.png", "skimage:rocket.jpg", "skimage:motorcycle_left.png",
                "skimage:hubble_deep_field.jpg", "skimage:ihc.png", "skimage:coins.png", "skimage:moon.png",
                "skimage:brick.png", "skimage:grass.png", "skimage:gravel.png", "skimage:retina.jpg",
                "skimage:cell.png", "skimage:clock_motion.png", "sklearn:china.jpg")  # not microaneurysms: 102 px
# Whole photographs held out, two of them from packages the training photographs do not come from
# (a flower close-up, a portrait), so validation measures compression of unseen photographs.
VAL_PHOTOS = ("skimage:chelsea.png", "skimage:camera.png", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg")
COLOUR_JITTER = 0.1  # train crops: brightness, contrast and saturation each scaled by U(1 - j, 1 + j)


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise LdmkitError(f"unknown split {split!r}: use 'train' or 'val'")


def _resize(grey: np.ndarray, size: int) -> torch.Tensor:
    """(N, h, w) float in [0, 1] -> (N, 3, size, size) float32 in [-1, 1], bicubic, grey replicated to RGB."""
    x = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))[:, None]  # (N, 1, h, w)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()  # bicubic overshoots; clamp first


class DigitsDataset(Dataset):
    """Handwritten digits, bright ink on black, captioned "a handwritten digit 7" and labelled 7.

    The last 10% of the images (180) are the val split; the rest train. `seed` is accepted for a
    uniform interface and has no effect (the data and the split are fixed).
    """

    name = "digits"
    num_classes = 10

    def __init__(self, size: int = 32, split: str = "train", seed: int = 0):
        _check_split(split)
        images, labels = _load_digits()
        n_val = len(images) // 10
        part = slice(len(images) - n_val, None) if split == "val" else slice(0, len(images) - n_val)
        self.labels = labels[part].tolist()
        self.images = _resize(images[part] / 16.0, size)  # (N, 3, size, size); 1,797 small images fit in memory

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        digit = self.labels[index]
        return {"image": self.images[index], "text": f"a handwritten digit {digit}", "label": digit}


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LdmkitError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    return digits.images, digits.target  # (1797, 8, 8) floats 0..16, (1797,) ints


def _skimage_data_dir() -> str:
    try:
        import skimage.data
    except ImportError:
        raise LdmkitError("this dataset needs scikit-image: pip install scikit-image") from None
    return os.path.dirname(skimage.data.__file__)


def _skimage_file(name: str) -> str:
    path = os.path.join(_skimage_data_dir(), name)
    if not os.path.exists(path):
        raise LdmkitError(
            f"scikit-image's bundled {name} is missing at {path}; reinstall it: pip install -U scikit-image"
        )
    return path


class FacesDataset(Dataset):
    """The 100 LFW faces bundled with scikit-image (greyscale, 25x25), unlabelled and uncaptioned.

    Faces 90..99 are the val split. `seed` has no effect (the data and the split are fixed).
    """

    name = "faces"
    num_classes = 0

    def __init__(self, size: int = 32, split: str = "train", seed: int = 0):
        _check_split(split)
        faces = np.load(_skimage_file("lfw_subset.npy"))[:100]  # (100, 25, 25) in [0, 1]; [100:] are not faces
        faces = faces[90:] if split == "val" else faces[:90]
        self.images = _resize(faces, size)  # (N, 3, size, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "text": "", "label": -1}


def _photo_file(spec: str) -> str:
    """The path of a bundled photograph named "package:file"."""
    package, name = spec.split(":", 1)
    if package == "skimage":
        return _skimage_file(name)
    try:
        if package == "sklearn":
            import sklearn.datasets

            folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
        else:
            import matplotlib

            folder = os.path.join(matplotlib.get_data_path(), "sample_data")
    except ImportError:
        raise LdmkitError(f"the photos dataset needs {package}: pip install {package.replace('sk', 'scikit-')}") from None
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        raise LdmkitError(f"{package}'s bundled {name} is missing at {path}; reinstall it: pip install -U {package}")
    return path


@functools.cache
def _load_photo(spec: str) -> Image.Image:
    with Image.open(_photo_file(spec)) as im:
        return im.convert("RGB")  # greyscale photos replicated to 3 channels


def _jitter(image: torch.Tensor, rng: np.random.Generator, amount: float) -> torch.Tensor:
    """Mild colour jitter of a (3, H, W) image in [-1, 1]: brightness, contrast, saturation."""
    b, c, s = rng.uniform(1 - amount, 1 + amount, size=3)
    x = (image + 1) / 2 * b  # brightness
    x = (x - x.mean()) * c + x.mean()  # contrast about the mean
    grey = x.mean(0, keepdim=True)
    x = (x - grey) * s + grey  # saturation about the pixel's grey
    return (x.clamp(0, 1) * 2 - 1).float()


class PhotosDataset(Dataset):
    """Random square crops of the bundled photographs, resized to `size`; for autoencoder training.

    Item i is a pure function of (seed, split, i): a photo, a crop side log-uniform between ~1/8 of
    the photo's short side (at least `size`) and all of it, a position, and (train only) a coin flip
    for a horizontal mirror and a mild colour jitter. Val crops come only from whole photographs that
    train never sees (`VAL_PHOTOS`). `length` defaults to 5,000 for train and 500 for val.
    """

    name = "photos"
    num_classes = 0

    def __init__(self, size: int = 32, split: str = "train", seed: int = 0, length: int | None = None):
        _check_split(split)
        self.size, self.seed, self.split = size, int(seed), split
        self._split_id = 0 if split == "train" else 1
        self.photos = VAL_PHOTOS if split == "val" else TRAIN_PHOTOS
        for name in self.photos:  # fail now, not in a worker, if a file is missing
            _photo_file(name)
        self.length = length if length is not None else (5000 if split == "train" else 500)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, self._split_id, index])
        photo = _load_photo(self.photos[rng.integers(len(self.photos))])
        w, h = photo.size
        short = min(w, h)
        low = min(short, max(self.size, short // 8))
        side = int(round(np.exp(rng.uniform(np.log(low), np.log(short)))))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photo.resize((self.size, self.size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side),
                            reducing_gap=2.0)  # reducing_gap: box-filter first, so large crops do not alias
        image = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, size, size)
        flip, jitter = rng.random() < 0.5, rng.random()  # drawn for both splits so crops stay seed-stable
        if self.split == "train":
            if flip:
                image = image.flip(-1)
            image = _jitter(image, np.random.default_rng([self.seed, 2, index, int(jitter * 2**31)]), COLOUR_JITTER)
        return {"image": image, "text": "", "label": -1}
