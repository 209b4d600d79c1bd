"""An on-disk cache of the training set's latent posteriors, for second-stage training, and the
second stage's use of them: `encode_dataset` (encode, or read the cache) and `sample_latents`
(z ~ q(z|x) for a step's rows).

The LDM recipe trains the second stage on a fixed, frozen first stage (Rombach et al. 2022, §3:
"we train ... once and reuse it for many diffusion models"). So q(z|x) = N(μ, σ²) of every training
image never changes between runs, while encoding it is the one expensive pass over the pixels a
second-stage run makes. This module encodes once and keeps μ and σ on disk; later runs (a resume,
a new U-Net, another learning rate) read them back in seconds.

A cache is only reused when it is certainly the same computation. Its folder is named by a digest
of everything the result depends on:

    the autoencoder   every state_dict tensor (name, dtype, shape, bytes, in sorted name order)
                      and its config JSON
    the images        the tensor's dtype, shape and bytes: another dataset, resolution, resize or
                      crop, or order changes the bytes
    augmentation      a label for any augmentation not visible in `images` (e.g. "hflip")
    FORMAT            the layout version below

so a changed ingredient gives a new folder that is built from scratch, never a stale read. Not in
the key: batch size and device. They change μ, σ by float rounding at most, and changing them (to
fit memory, or on another machine) should not cost a re-encode; index.json records both.

    CACHE/<key>/
        shard_00000.safetensors     "mean" and "std", (n_i, c, h, w) float32, n_i <= shard_size
        shard_00001.safetensors     ...
        index.json                  the key's ingredients in readable form, N, latent shape, dtype,
                                    and per shard its item range and SHA-256; written LAST

Every file is written to a temporary name and moved into place with `os.replace` (atomic on POSIX),
and index.json goes last: a folder without index.json is an unfinished cache (a killed run) and is
deleted and rebuilt, never read. Once index.json exists nothing writes to the folder again.

A complete cache whose shard does not match index.json (truncated, a flipped bit, missing) raises
`LdmkitError` naming the file and asking to delete the folder, rather than rebuilding silently:
every shard was complete when index.json was written, so damage means the disk, a copy or a person
changed it, which the user should hear about; and under torch.distributed every rank reads, but
only rank 0 may write, so a reading rank cannot repair the folder without racing the others.

Distributed runs: when torch.distributed is initialised with world size > 1, rank 0 builds the cache
(if needed), all ranks meet at `torch.distributed.barrier()`, then the other ranks read it. Every
rank must pass the same weights and the whole (unsharded) image tensor, since each computes the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from ldmkit.autoencoder import AutoencoderKL
from ldmkit.data.tensors import TensorData
from ldmkit.errors import LdmkitError
from ldmkit.imageio import atomic_write
from ldmkit.rng import BatchRandom, step_generator

CAPTION_CACHE = 8192  # captions a lazily read collection keeps encoded (the most recent)
FORMAT = 1  # bump when the layout or what is stored changes: old caches then get new keys
INDEX = "index.json"


# --- the key -------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t` (any dtype, any device) as a buffer hashlib reads without a copy."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().data


def _sha256_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def autoencoder_digest(ae: AutoencoderKL) -> str:
    """SHA-256 over the first stage's config and every weight: latents are only valid for this one."""
    sd = ae.state_dict()
    text = json.dumps(ae.config.model_dump(mode="json"), sort_keys=True) + _sha256_tensors((k, sd[k]) for k in sorted(sd))
    return hashlib.sha256(text.encode()).hexdigest()


def key_ingredients(ae: AutoencoderKL, images: torch.Tensor, augmentation: str = "none") -> dict:
    """What the cache key is a digest of, in readable form (stored in index.json)."""
    sd = ae.state_dict()
    return {
        "format": FORMAT,
        "autoencoder": {
            "config": ae.config.model_dump(mode="json"),
            "tensors": len(sd),
            "parameters": sum(v.numel() for v in sd.values()),
            "sha256": _sha256_tensors((k, sd[k]) for k in sorted(sd)),
        },
        "images": {
            "shape": list(images.shape),
            "dtype": str(images.dtype),
            "sha256": _sha256_tensors([("images", images)]),
        },
        "augmentation": augmentation,
    }


def _digest(ingredients: dict) -> str:
    text = json.dumps(ingredients, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]  # 128 bits: the folder name


def cache_key(ae: AutoencoderKL, images: torch.Tensor, augmentation: str = "none") -> str:
    """The cache folder's name: 32 hex digits of SHA-256 over `key_ingredients`."""
    return _digest(key_ingredients(ae, images, augmentation))


# --- encoding ------------------------------------------------------------------------------------


@torch.no_grad()
def encode_batches(ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 128,
                   progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Posterior (mean, std) of images[i : i + batch_size] for i = 0, batch_size, ..., on the AE's
    device. The same batches as `encode_dataset`, so the results are bit-identical."""
    device = next(ae.parameters()).device
    for i in tqdm(range(0, len(images), batch_size), desc="encoding latents", disable=not progress, leave=False):
        x = images[i : i + batch_size].to(device)  # (B, 3, H, W)
        post = ae.encode(x)  # checks channels and that H, W are multiples of the factor
        # Contiguous (NCHW): the encoder may hand them out channels-last, and the U-Net would then run its
        # first convolution in that layout, with oneDNN's other summation order (1e-6 differences between
        # a run from these and a run from the cache, whose files hold them contiguous).
        yield post.mean.contiguous(), post.std.contiguous()  # (B, c, H/f, W/f) each


# --- files ---------------------------------------------------------------------------------------


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _build(ae: AutoencoderKL, images: torch.Tensor, folder: Path, ingredients: dict, key: str,
           shard_size: int, batch_size: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image, writing each shard as soon as it is full and index.json at the end."""
    if folder.exists():  # no index.json: an unfinished cache from a killed run
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    n = len(images)
    t0 = time.time()
    mean = std = None  # (N, c, h, w) float32 on CPU, allocated from the first batch's shape
    shards: list[dict] = []
    filled = written = 0
    for m, s in encode_batches(ae, images, batch_size, progress):
        if mean is None:
            mean = torch.empty((n, *m.shape[1:]), dtype=torch.float32)
            std = torch.empty_like(mean)
        mean[filled : filled + len(m)] = m.float()
        std[filled : filled + len(s)] = s.float()
        filled += len(m)
        while filled - written >= shard_size or (filled == n and written < n):
            end = min(written + shard_size, n)
            data = save_safetensors({"mean": mean[written:end], "std": std[written:end]},
                                    metadata={"key": key, "start": str(written), "stop": str(end)})
            name = _shard_name(len(shards))
            atomic_write(folder / name, data)
            shards.append({"file": name, "start": written, "stop": end, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
            written = end
    index = {
        "key": key,
        "ingredients": ingredients,
        "count": n,
        "latent_shape": list(mean.shape[1:]),
        "dtype": "float32",
        "shard_size": shard_size,
        "num_shards": len(shards),
        "shards": shards,
        "encoded_with": {"device": str(next(ae.parameters()).device), "batch_size": batch_size,
                         "torch": torch.__version__, "seconds": round(time.time() - t0, 2)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write(folder / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    return mean, std


def _damaged(path: Path, folder: Path, why: str) -> LdmkitError:
    return LdmkitError(f"latent cache file {path} is damaged ({why}); delete the folder {folder} and run again to rebuild it")


def _read(folder: Path, key: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached (mean, std), every shard checked against index.json."""
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
        count, shape, shards = int(index["count"]), [int(d) for d in index["latent_shape"]], index["shards"]
        shard_size, num_shards = int(index["shard_size"]), int(index["num_shards"])
        stored_key, dtype = index["key"], index["dtype"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise _damaged(path, folder, f"{type(e).__name__}: {e}") from e
    if stored_key != key:
        raise _damaged(path, folder, f"it is for key {stored_key}")
    if count != n:
        raise _damaged(path, folder, f"{count} items, expected {n}")
    if dtype != "float32":
        raise _damaged(path, folder, f"dtype {dtype}, expected float32")
    if shard_size < 1 or num_shards != len(shards) or num_shards != math.ceil(n / shard_size):
        raise _damaged(path, folder, f"{len(shards)} shards listed for {n} items of {shard_size} per shard")
    mean = torch.empty((n, *shape), dtype=torch.float32)
    std = torch.empty_like(mean)
    for i, entry in enumerate(shards):
        file = folder / _shard_name(i)
        start, stop = i * shard_size, min((i + 1) * shard_size, n)
        if entry.get("file") != file.name or entry.get("start") != start or entry.get("stop") != stop:
            raise _damaged(path, folder, f"shard {i} is listed as {entry}")
        try:
            data = file.read_bytes()
        except OSError as e:
            raise _damaged(file, folder, f"{type(e).__name__}: {e}") from e
        if len(data) != entry.get("bytes"):
            raise _damaged(file, folder, f"{len(data)} bytes, index.json says {entry.get('bytes')}")
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise _damaged(file, folder, "its SHA-256 differs from index.json")
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise _damaged(file, folder, f"{type(e).__name__}: {e}") from e
        want = (stop - start, *shape)
        for name, out in (("mean", mean), ("std", std)):
            t = tensors.get(name)
            if t is None or t.dtype != torch.float32 or tuple(t.shape) != want:
                got = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise _damaged(file, folder, f"'{name}' is {got}, expected float32 {want}")
            out[start:stop] = t
    return mean, std


# --- the entry point -----------------------------------------------------------------------------


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cached_latents(ae: AutoencoderKL, images: torch.Tensor, cache_dir: str | Path, *, augmentation: str = "none",
                   shard_size: int = 4096, batch_size: int = 128,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, (N, c, h, w) float32 on CPU each, from
    `cache_dir/<cache_key(...)>/` when a complete cache is there, else encoded and written there.

    `images` (N, 3, H, W) are the training images exactly as the model sees them; `augmentation`
    names any augmentation the caller applies that is not visible in `images`. A fresh build gives
    the same bits as `encode_dataset(ae, data, batch_size)` (moved to CPU).
    `shard_size` only shapes the files of a new cache; a complete cache is read whatever it is."""
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    if len(images) == 0:
        raise LdmkitError("no images to encode: the training set is empty")
    ingredients = key_ingredients(ae, images, augmentation)
    key = _digest(ingredients)
    folder = Path(cache_dir) / key
    rank, world = _rank_and_world()
    built = None
    if rank == 0 and not (folder / INDEX).is_file():
        built = _build(ae, images, folder, ingredients, key, shard_size, batch_size, progress)
    if world > 1:
        device = next(ae.parameters()).device
        if device.type == "cuda" and torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[device.index if device.index is not None else torch.cuda.current_device()])
        else:
            torch.distributed.barrier()
    if built is not None:
        return built
    if not (folder / INDEX).is_file():  # only a rank > 0 gets here
        raise LdmkitError(
            f"rank {rank}: no latent cache at {folder} after rank 0 built one; every rank must pass the same "
            "autoencoder weights and the whole image tensor, since each rank computes the cache key"
        )
    return _read(folder, key, len(images))


# --- what a second-stage trainer uses ----------------------------------------------------------


def encode_dataset(ae: AutoencoderKL, data: TensorData, batch_size: int = 128, progress: bool = True,
                   cache: str | None = None):
    """Posterior mean and std of every training image, (N, c, h, w) each, on the AE's device; read
    from / written to the on-disk latent cache when `cache` names a folder."""
    device = next(ae.parameters()).device
    if data.images.shape[-1] % ae.downsample_factor:
        raise LdmkitError(f"image size {data.images.shape[-1]} is not divisible by the autoencoder's factor "
                          f"{ae.downsample_factor}")
    if cache:
        mean, std = cached_latents(ae, data.images, cache, batch_size=batch_size, progress=progress)
        return mean.to(device), std.to(device)
    with torch.no_grad():
        parts = list(encode_batches(ae, data.images, batch_size, progress))
    return torch.cat([m for m, _ in parts]).to(device), torch.cat([s for _, s in parts]).to(device)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, optim, step: int, lo: int, hi: int,
                   shift: float, scale: float, latents: str = "sample") -> tuple[BatchRandom, torch.Tensor]:
    """Rows [lo, hi) of step `step`'s global batch, given their posteriors `mean`, `std` (b, c, h, w):
    (the step's BatchRandom, z0 = (z − shift)·scale with z ~ q(z|x) fresh each step, or z = the mean when
    `latents` is "mean", `DiffusionConfig.latents`). Every draw is made for the whole global batch and sliced,
    so the result does not depend on how many processes / micro-batches share the batch; the step's later
    draws continue from the returned BatchRandom."""
    r = BatchRandom(step_generator(optim.seed, step), optim.batch_size, lo, hi)
    return r, draw_z0(r, mean, std, shift, scale, latents)


def draw_z0(r, mean: torch.Tensor, std: torch.Tensor, shift: float, scale: float, latents: str) -> torch.Tensor:
    """z0 = (z − shift)·scale for the posteriors `mean`, `std` (b, c, h, w), the ε of z ~ q(z|x) drawn from the
    BatchRandom `r` (`posterior_z`): the one place a training row's latent is made from its cached posterior."""
    eps = r.randn(*mean.shape[1:]).to(mean.device)  # (b, c, h, w)
    return (posterior_z(mean, std, eps, latents) - shift) * scale


def posterior_z(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, latents: str) -> torch.Tensor:
    """z ~ q(z|x) = mean + std·ε, or the mean itself when `latents` (`diffusion.latents`) is "mean". The caller
    draws ε either way, so the draws after it (noise, t, flips, rows) do not depend on the choice."""
    return mean if latents == "mean" else mean + std * eps


def warm_caption_cache(text_encoder, texts: list[str]) -> None:
    """Encode every distinct caption (and the empty one, which classifier-free guidance's dropped
    condition uses) once, in batches of 512, so the text encoder's cache is full before the clock
    starts and no training step pays for an encoder pass."""
    distinct = sorted(set(texts) | {""})
    for i in range(0, len(distinct), 512):
        text_encoder(distinct[i : i + 512])
