"""`ldmkit encode`: a collection's latent posteriors, once, into shards the second stage trains from.

The first stage is frozen while the second trains (Rombach et al. 2022, §3), so q(z|x) of each training
image is the same in every run; encoding it is the one pass over the pixels. `encode_source` streams the
source's training split (centre-cropped: a random crop cannot be frozen) through the encoder and writes
`data.latent_shards` folders. Output shard i holds items [i·S, (i+1)·S) of a map-style source (folder,
Hugging Face dataset, built-in set), or the samples of input tar shard i.

- Resumable: every shard is written whole under a temporary name and renamed; its metadata carries the
  run's key (a digest of the first stage's weights and config, the source, the size), so a rerun after
  a kill keeps the shards already written with that key and encodes the rest. latents.json comes last.
- Distributed: under torchrun, rank r encodes shards r, r + world, …; rank 0 writes latents.json after
  every rank is done.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ldmkit.autoencoder import AutoencoderKL
from ldmkit.data import DATASETS
from ldmkit.data.latent_shards import FORMAT, INDEX, VERSION
from ldmkit.data.shards import is_shard_spec, list_shards, read_items
from ldmkit.errors import LdmkitError
from ldmkit.imageio import atomic_write
from ldmkit.train.data import (
    PREVIEW,
    LoaderData,
    Repeated,
    _map_dataset,
    collate,
    epoch_of,
    tag_rule,
)
from ldmkit.train.latents import autoencoder_digest


def source_fingerprint(spec: str) -> str:
    """A digest of the (name, size, modification time) of every file a collection is made of: a changed,
    added or removed image gives new latents, never stale ones. Built-in sets are fixed by their name."""
    if spec in DATASETS:
        return spec
    if is_shard_spec(spec):
        paths = list_shards(spec)
    elif os.path.isdir(spec):  # an image folder, or a Hugging Face save_to_disk folder
        paths = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file())
    else:  # parquet files, given by a pattern that may be absolute
        paths = sorted(glob.glob(spec))
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def encode_key(digest: str, d, shard_size: int | None) -> str:
    """What a latent folder is valid for: the first stage, the collection as it is now, the size, the layout."""
    return hashlib.sha256(json.dumps({"autoencoder": digest, "source": source_fingerprint(d.dataset), "size": d.size,
                                      "shard_size": shard_size}).encode()).hexdigest()[:32]


def _map_source(d) -> Dataset:
    return _map_dataset(d.dataset, d, "train", False)


def _collate(items: list[dict]) -> dict:
    batch = collate(items)
    if "_error" in batch:
        raise LdmkitError(batch["_error"])
    return batch


@torch.no_grad()
def _encode_items(ae: AutoencoderKL, batches, device: torch.device) -> dict:
    """Posteriors, labels and captions of every batch; an input shard with no training samples gives an
    empty latent shard (left out of latents.json)."""
    means, stds, labels, texts = [], [], [], []
    for batch in batches:
        post = ae.encode(batch["image"].to(device))
        means.append(post.mean.float().cpu().contiguous())
        stds.append(post.std.float().cpu().contiguous())
        labels.append(batch["label"])
        texts += list(batch["text"])
    if not means:
        return {"mean": torch.zeros(0, 1), "std": torch.zeros(0, 1), "label": torch.zeros(0, dtype=torch.long), "text": []}
    return {"mean": torch.cat(means), "std": torch.cat(stds), "label": torch.cat(labels).long(), "text": texts}


def _shard_done(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("key") == key
    except Exception:  # noqa: BLE001 - a damaged file is simply redone
        return False


def encode_source(ae: AutoencoderKL, d, out: str | Path, shard_size: int = 4096, batch_size: int = 64,
                  workers: int = 2, rank: int = 0, world: int = 1, barrier=None, progress: bool = True) -> Path:
    """Encode the training split of `d.dataset` at `d.size` into OUT (module docstring); returns OUT."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(ae.parameters()).device
    digest = autoencoder_digest(ae)
    spec = d.dataset
    streamed = spec not in DATASETS and is_shard_spec(spec)
    if streamed:
        inputs = list_shards(spec)
        jobs = list(range(len(inputs)))
    else:
        dataset = _map_source(d)
        n = len(dataset)
        jobs = list(range((n + shard_size - 1) // shard_size))
    key = encode_key(digest, d, None if streamed else shard_size)
    mine = [j for j in jobs if j % world == rank]
    for j in tqdm(mine, desc="encoding shards", disable=not progress, leave=False):
        path = out / f"{j:05d}.safetensors"
        if _shard_done(path, key):
            continue
        if streamed:  # every training sample of input shard j, centre-cropped
            items = read_items([inputs[j]], d.size, "train", limit=-1)
            batches = [_collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
        else:
            part = Subset(dataset, range(j * shard_size, min((j + 1) * shard_size, n)))
            batches = DataLoader(part, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
        enc = _encode_items(ae, batches, device)
        data = save_safetensors({k: enc[k] for k in ("mean", "std", "label")},
                                metadata={"key": key, "text": json.dumps(enc["text"])})
        atomic_write(path, data)
    if barrier is not None:
        barrier()
    if rank == 0:
        _write_index(out, jobs, key, digest, spec, d.size)
    if barrier is not None:
        barrier()
    return out


def _write_index(out: Path, jobs: list[int], key: str, digest: str, spec: str, size: int) -> None:
    shards, shape, labels = [], None, -1
    for j in jobs:
        path = out / f"{j:05d}.safetensors"
        if not _shard_done(path, key):
            raise LdmkitError(f"latent shard {path} was not written; run `ldmkit encode` again to finish")
        with safe_open(str(path), "pt") as f:
            count = f.get_slice("label").get_shape()[0]
            if count:
                shape = f.get_slice("mean").get_shape()[1:]
                labels = max(labels, int(f.get_tensor("label").max()))
        shards.append({"file": path.name, "count": int(count), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    shards = [s for s in shards if s["count"]]
    if not shards:
        raise LdmkitError(f"no training images in {spec}; nothing to encode")
    index = {"format": FORMAT, "version": VERSION, "key": key, "autoencoder": digest, "source": spec, "image_size": size,
             "latent_shape": list(shape), "count": sum(s["count"] for s in shards), "num_classes": labels + 1,
             "shards": shards}
    atomic_write(out / INDEX, (json.dumps(index, indent=2) + "\n").encode())


def cached_latent_source(ae: AutoencoderKL, d, batch_size: int, dist, accum: int, progress: bool):
    """`data.latent_cache` for a lazily read collection: its latents encoded once into
    CACHE/latents-<key>/ (reused while the first stage and the collection are unchanged), then read from there."""
    import warnings

    from ldmkit.data.latent_shards import LatentShards
    from ldmkit.train.distributed import micro_batches

    if d.crop == "random":
        warnings.warn("data.latent_cache freezes each image's crop: the latents are of centre crops", stacklevel=2)
    folder = Path(d.latent_cache) / f"latents-{encode_key(autoencoder_digest(ae), d, 4096)}"
    if not (folder / INDEX).is_file():
        encode_source(ae, d, folder, shard_size=4096, workers=d.workers, rank=dist.rank, world=dist.world,
                      barrier=dist.barrier if dist.enabled else None, progress=progress)
    ds = LatentShards(folder)
    pieces = micro_batches(batch_size, dist, accum)
    epoch = epoch_of(_map_source(d))  # kohya repeats: the latents are the folder's items in its order, once each
    source = LoaderData(Repeated(ds, epoch) if epoch else ds, batch_size, d.seed, (pieces[0][0], pieces[-1][1]),
                        d.workers, ds.preview(PREVIEW), ds.num_classes)
    source.tags = tag_rule(d)
    return source
