"""A distribution distance for generated images: the Fréchet distance in the features of a small CNN
trained on the bundled data — or, given a local Inception weights file, the real FID.

The Fréchet distance between two sets of features, each summarised as a Gaussian N(μ, Σ), is
(Heusel et al., 2017, "GANs trained by a two time-scale update rule…", eq. 6; Dowson & Landau, 1982)

    d² = ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).

FID is that distance in the 2048-d pool features of one particular Inception-v3 (the TensorFlow graph
of 2015-12-05). On 25x25 greyscale faces or 32-pixel crops of photographs that network is far from
its training images, and its weights are not bundled, so by default ldmkit measures the same formula
in the features of a network trained here, on the bundled images of the dataset itself, and names it
for what it is: "FD-faces", never "FID". Its values are comparable between models evaluated with the
same dataset, image size and `VERSION`, and with nothing else (not with published FIDs).

The feature network learns without labels where the data has none, by *instance discrimination*
(Dosovitskiy et al., 2014, "Discriminative unsupervised feature learning with exemplar CNNs"): a
classifier of which bundled image a randomly shifted, scaled, mirrored and colour-jittered view comes
from — which of the 90 training faces, which of the 15 training photographs a crop was cut from. It is
the simplest objective that needs nothing but the images. `shapes` and `digits` carry labels, so there
it classifies the caption (72 shape × colour × position combinations) or the digit. The augmentations
are geometric and photometric only, never blur or noise, so the degradations the tests apply are
measured, not trained for. Such a classifier learns to ignore pixel noise, so the features add a
texture statistic of the network's first layer to its content features (see `FeatureNet`).

The D features are standardised to zero mean and unit variance over the clean training images. Two
independent samples of the same images are not at distance 0: the estimate has a floor that grows with
D and shrinks with the number of images on each side (50 faces against 50 others: about 7), so use
several times D images per side, and the same numbers of images for every model compared.

The formula itself is torchmetrics' `FrechetInceptionDistance` (`pip install ldmkit[study]`), given
these features as its `feature` module; the real FID is the same class with its Inception-v3, from
torch-fidelity (`pip install ldmkit[fid]`), loaded from the user's local weights file.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldmkit.errors import LdmkitError

VERSION = 1  # part of the cache key: bump it whenever the network, its data or its training change
WIDTH = 32  # content features and first-layer filters; D = 2 * WIDTH = 64 features in all
FEATURES = 2 * WIDTH  # D: small, so the covariance of a few hundred images is well estimated
DATASETS = ("faces", "photos", "shapes", "shapes-free", "digits")
STEPS = 300  # optimiser steps: about 15 s of one CPU thread at 32 px, 25 s at 64 px
BATCH = 32  # images per step at 32 px and below; above, BATCH * 32 / size, so a 64-px net costs ~1.5x
SEED = 0
# torch-fidelity's port of the TensorFlow Inception graph that defines FID (Heusel et al., 2017), the file
# its own download fetches (a state dict of FeatureExtractorInceptionV3), from INCEPTION_URL
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"

_loaded: dict[tuple[str, int], nn.Module] = {}  # (dataset, size) -> network, for this process


class FeatureNet(nn.Module):
    """A small CNN and the two kinds of feature it gives, concatenated and standardised (N, 2·WIDTH):

    - *content*: conv stages down to 4x4, global average pool, a linear map to WIDTH features — what
      the training objective taught it to tell apart (which face, which photograph, which caption);
    - *texture*: the spatial standard deviation of each of the WIDTH first-layer filter responses, at
      full resolution — the energy of fine detail per filter, the diagonal of the Gram statistics of
      Gatys et al. (2015, "Texture synthesis using convolutional neural networks", eq. 1). A classifier
      of 90 faces learns to ignore pixel noise, so its content features alone barely move under noise
      that any viewer sees (measured: noise of σ = 0.1 sat below the real-vs-real floor); this half
      moves with noise and blur alike.

    Stages halve the side until it is 4; channels follow the side (32 at 32 px and above, then 64,
    128), so a 64-px image costs about three times a 32-px one, not more. `num_features` tells
    torchmetrics D without a trial forward pass. The classifier head exists only during training.
    """

    def __init__(self, size: int, classes: int, width: int = WIDTH):
        super().__init__()
        self.size, self.num_features = size, 2 * width
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU())
        layers: list[nn.Module] = []
        c, side = width, size
        while side > 4:
            side = math.ceil(side / 2)
            out = width if side >= 32 else 64 if side >= 16 else 128
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            c = out
        self.trunk = nn.Sequential(*layers)
        self.proj = nn.Linear(c, width)
        self.head = nn.Linear(width, classes) if classes else None
        self.register_buffer("mean", torch.zeros(2 * width))
        self.register_buffer("std", torch.ones(2 * width))

    def content_and_texture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h0 = self.stem(x)  # (N, W, S, S) first-layer responses at full resolution
        h = self.trunk(h0)  # (N, C, 4, 4)
        return self.proj(h.mean((2, 3))), h0.flatten(2).std(2)  # (N, W), (N, W)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.content_and_texture(x), 1)  # (N, D = 2W), not standardised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.embed(x) - self.mean) / self.std  # (N, D), ~N(0, 1) per feature on the training images


def _cache_dir() -> Path:
    """$LDMKIT_CACHE/frechet (default ~/.cache/ldmkit/frechet), as the image-folder index is found."""
    return Path(os.environ.get("LDMKIT_CACHE") or Path.home() / ".cache" / "ldmkit") / "frechet"


def _cache_file(dataset: str, size: int) -> Path:
    return _cache_dir() / f"{dataset}-{size}px-v{VERSION}.safetensors"


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise LdmkitError(f"no Fréchet feature network for dataset {dataset!r}: it is trained on bundled data, "
                          f"one of {', '.join(DATASETS)}; for other images pass a local Inception file for FID")


def _photo_crops(size: int, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random square crops of the training photographs at `size` px and the index of each one's photo.
    Crop sides are log-uniform from 1/8 of the photo's short side to all of it, as `PhotosDataset` cuts."""
    from PIL import Image

    from ldmkit.data.builtin import TRAIN_PHOTOS, _load_photo

    photos = [_load_photo(p) for p in TRAIN_PHOTOS]
    images, labels = [], []
    for _ in range(n):
        k = int(rng.integers(len(photos)))
        w, h = photos[k].size
        short = min(w, h)
        low = min(short, max(size, short // 8))
        side = int(round(np.exp(rng.uniform(np.log(low), np.log(short)))))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = photos[k].resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side), reducing_gap=2.0)
        images.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
        labels.append(k)
    return torch.stack(images).float() / 127.5 - 1, torch.tensor(labels)  # (n, 3, size, size), (n,)


def _training_set(dataset: str, size: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(images (N, 3, size, size) in [-1, 1], class of each, whether mirroring keeps the class)."""
    from ldmkit.data import build_dataset

    if dataset == "faces":  # instance discrimination: each training face is its own class
        images = build_dataset("faces", size, "train").images
        return images, torch.arange(len(images)), True
    if dataset == "photos":  # which training photograph a crop was cut from
        images, labels = _photo_crops(size, 2000, np.random.default_rng(SEED))
        return images, labels, True
    if dataset == "digits":
        data = build_dataset("digits", size, "train")
        return data.images, torch.tensor(data.labels), False
    data = build_dataset(dataset, size, "train", seed=SEED, length=1440)  # shapes: 20 of each caption
    items = [data[i] for i in range(len(data))]
    captions = sorted({it["text"] for it in items})
    labels = torch.tensor([captions.index(it["text"]) for it in items])
    return torch.stack([it["image"] for it in items]), labels, False  # mirroring swaps left and right


def _augment(x: torch.Tensor, g: torch.Generator, mirror: bool) -> torch.Tensor:
    """Random view of each image: scale 0.85–1.15, shift up to 1/16 of the side, optional mirror,
    brightness and contrast ±10 %. Geometric and photometric only — never blur or noise."""
    n = x.shape[0]
    u = torch.rand(n, 6, generator=g)
    scale = 0.85 + 0.3 * u[:, 0]
    flip = torch.where((u[:, 1] < 0.5) & mirror, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = flip / scale, 1 / scale
    theta[:, :, 2] = (u[:, 2:4] - 0.5) * (2 / 8)  # grid units span 2: ±1/16 of the side
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    b = (0.2 * u[:, 4] - 0.1).view(n, 1, 1, 1)
    c = (0.9 + 0.2 * u[:, 5]).view(n, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean + b).clamp(-1, 1)


def _train(dataset: str, size: int) -> tuple[FeatureNet, dict]:
    """Train the feature network of `dataset` at `size` px, deterministically (fixed seed; the caller's
    global RNG is left as it was)."""
    start, cpu = time.perf_counter(), time.process_time()
    images, labels, mirror = _training_set(dataset, size)
    batch = max(8, BATCH * 32 // max(size, 32))
    # enable_grad: the first call may come from inside a caller's torch.no_grad() (an evaluation)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(SEED)
        g = torch.Generator().manual_seed(SEED)
        net = FeatureNet(size, int(labels.max()) + 1)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=STEPS, pct_start=0.1)
        net.train()
        for _ in range(STEPS):
            idx = torch.randint(len(images), (batch,), generator=g)
            x = _augment(images[idx], g, mirror)  # (B, 3, size, size)
            loss = F.cross_entropy(net.head(net.content_and_texture(x)[0]), labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        f = torch.cat([net.embed(images[i:i + 256]) for i in range(0, len(images), 256)])  # (N, D) clean images
        acc = (net.head(f[:, :WIDTH]).argmax(1) == labels).float().mean().item()
        net.mean.copy_(f.mean(0))
        net.std.copy_(f.std(0).clamp_min(1e-6))
    net.head = None
    meta = {"dataset": dataset, "size": size, "version": VERSION, "features": FEATURES, "steps": STEPS,
            "classes": int(labels.max()) + 1, "train_images": len(images), "train_accuracy": round(acc, 4),
            "batch": batch, "train_seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1), "threads": torch.get_num_threads()}
    return net, meta


def feature_network(dataset: str, size: int) -> torch.nn.Module:
    """The feature network of `dataset` ("faces", "photos", "shapes", "shapes-free", "digits") for
    images (N, 3, size, size) in [-1, 1], giving (N, D) features, in eval mode with no gradients.

    Trained once (well under a minute on one CPU thread) and cached under $LDMKIT_CACHE/frechet, keyed
    by dataset, size and `VERSION`; later calls load the file."""
    from safetensors.torch import load_file, save_file

    _check_dataset(dataset)
    size = int(size)
    if size < 8:
        raise LdmkitError(f"the Fréchet feature network needs images of at least 8 pixels, got {size}")
    if (dataset, size) in _loaded:
        return _loaded[(dataset, size)]
    path = _cache_file(dataset, size)
    net = FeatureNet(size, 0)
    try:
        net.load_state_dict(load_file(path))
    except (OSError, RuntimeError, ValueError):  # missing, unreadable or stale: train it again
        net, meta = _train(dataset, size)
        try:  # a cache: a read-only home only costs the next process the training again
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(net.state_dict(), tmp, metadata={"meta": json.dumps(meta)})
            os.replace(tmp, path)
        except OSError:
            pass
    net.eval().requires_grad_(False)
    _loaded[(dataset, size)] = net
    return net


def network_info(dataset: str, size: int) -> dict:
    """What the cached network of (dataset, size) recorded when it was trained: classes, training
    accuracy, seconds, threads. Empty when it has not been cached."""
    from safetensors import safe_open

    try:
        with safe_open(_cache_file(dataset, size), "pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except (OSError, ValueError):
        return {}


def _fid_class():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        if not (e.name or "").startswith("torchmetrics"):
            raise  # torchmetrics is there and something it imports is broken: show that, not the advice below
        raise LdmkitError("the Fréchet distance needs torchmetrics: pip install ldmkit[study]") from None
    return FrechetInceptionDistance


class _Given(nn.Module):
    """Features already computed: torchmetrics' metric is fed them as its 'images'."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f


def frechet_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """d² = ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) between two feature sets (N1, D) and (N2, D),
    with unbiased covariances, computed in float64 by torchmetrics."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise LdmkitError(f"feature sets must be (N, D) with one D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < 2 or len(fake) < 2:
        raise LdmkitError(f"a Fréchet distance needs at least 2 images on each side, got {len(real)} and {len(fake)}")
    metric = _fid_class()(feature=_Given(real.shape[1]), sync_on_compute=False)  # local sets: never all-reduce
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    return max(0.0, float(metric.compute()))  # d² ≥ 0; rounding can leave -1e-20 for identical sets


def _as_rgb(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
        raise LdmkitError(f"{name} images must be (N, 3, S, S) in [-1, 1], got shape {tuple(x.shape)}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def _features(net: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    device = next(net.parameters()).device
    return torch.cat([net(x[i:i + batch].to(device).float()).cpu() for i in range(0, len(x), batch)])  # (N, D)


def _inception_fid(real: torch.Tensor, fake: torch.Tensor, weights: str) -> float:
    """FID with torch-fidelity's Inception-v3 loaded from `weights` (no download): torchmetrics resizes
    to 299 px as the TensorFlow original did and takes the 2048-d pool features."""
    if not os.path.isfile(weights):
        raise LdmkitError(f"no Inception weights file at {weights}: FID needs torch-fidelity's {INCEPTION_FILE} "
                          f"(from {INCEPTION_URL})")
    metric_cls = _fid_class()
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception-v3 is torch-fidelity's)
    except ImportError:
        raise LdmkitError("FID with a local Inception file needs torch-fidelity: pip install ldmkit[fid]") from None
    try:
        metric = metric_cls(feature=2048, feature_extractor_weights_path=weights, sync_on_compute=False)
    except Exception as e:  # a wrong file: unpickling or state-dict errors of every kind
        raise LdmkitError(f"{weights} is not torch-fidelity's {INCEPTION_FILE} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0].rstrip(':') if str(e) else ''})") from None

    def uint8(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (N, 3, S, S), as a PNG holds it

    with torch.no_grad():
        for x, is_real in ((real, True), (fake, False)):
            for i in range(0, len(x), 64):
                metric.update(uint8(x[i:i + 64]).cpu(), real=is_real)
    return max(0.0, float(metric.compute()))


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, dataset: str, inception: str | None = None) -> float:
    """The Fréchet distance between real and generated images (N, 3, S, S) in [-1, 1].

    With `inception` (a local torch-fidelity Inception-v3 file) it is the real FID, at 299 px; without,
    the distance in the D features of `feature_network(dataset, S)`. Name it with `distance_name`."""
    real, fake = _as_rgb(real, "real"), _as_rgb(fake, "generated")
    if real.shape[-1] != fake.shape[-1]:
        raise LdmkitError(f"real and generated images differ in size: {real.shape[-1]} and {fake.shape[-1]} px")
    if len(real) < 2 or len(fake) < 2:
        raise LdmkitError(f"a Fréchet distance needs at least 2 images on each side, got {len(real)} and {len(fake)}")
    if inception is not None:
        return _inception_fid(real, fake, inception)
    net = feature_network(dataset, real.shape[-1])
    return frechet_from_features(_features(net, real), _features(net, fake))


def distance_name(dataset: str, inception: str | None = None) -> str:
    """How a report names the distance: "FID" only for the real Inception features."""
    if inception is not None:
        return "FID"
    _check_dataset(dataset)
    return (f"FD-{dataset} (Fréchet distance in the {FEATURES}-d features of a small CNN trained on the "
            f"bundled {dataset})")
