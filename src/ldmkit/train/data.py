"""Where a training step's batch comes from: held in memory, read lazily by DataLoader workers, or streamed.

Every trainer asks `source.batch(step, lo, hi)` for rows [lo, hi) of step `step`'s global batch, and
gets {image, label, text[, control, mask, edge]} (or {mean, std, label, text} from latent shards).

    MemoryData   the built-in sets and small collections, stacked tensors (`data.tensors`); no per-item
                 Python work competes with the model for the CPU's cores.
    LoaderData   map-style sources too big for memory (image folders, Hugging Face datasets, latent
                 shards): DataLoader workers decode this process's rows of each step ahead of time.
                 The order is `batch_indices(step)` and each item's crop is drawn from a generator seeded
                 by (seed, step, row), so a resume at any step repeats the run exactly, on any number of
                 processes; memory holds a few batches, whatever the collection's size.
    StreamData   tar shards (`data.shards.ShardStream`): each process and worker reads its own shards;
                 each reader's place is checkpointed (`state_dict`) and restored on resume.

Two per-item rules apply to every source alike, so each resumes exactly:

    repeats      a folder's kohya `N_word` repeat folders (`ImageFolderDataset.epoch`): one epoch lists an
                 item N times, and `batch_indices` permutes that list (MemoryData keeps each image once in
                 memory and maps the epoch's rows onto it; LoaderData reads through `Repeated`)
    tags         `data.shuffle_tags`, `data.keep_tokens`, `data.tag_dropout` (`data.transforms.TagRule`):
                 each caption of a batch is rewritten with draws seeded by (seed, step, row)

`data.in_memory: auto` keeps built-in sets, and map-style collections whose float32 pixels would take
at most IN_MEMORY_BYTES, in memory (measured faster on 2 cores: benchmarks/data.py); the rest is lazy.
"""

from __future__ import annotations

import itertools
import warnings
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldmkit.data import DATASETS, build_dataset
from ldmkit.data.shapes import with_composition, with_vocabulary
from ldmkit.data.shards import ShardItems, ShardStream, caption_field, is_shard_spec, list_shards
from ldmkit.data.tensors import TensorData, materialize
from ldmkit.data.transforms import TagRule, item_seed
from ldmkit.errors import LdmkitError
from ldmkit.train.loop import batch_indices

IN_MEMORY_BYTES = 256 << 20
PREVIEW = 64  # items kept in memory from a lazy source: sample-grid conditions, caption checks


def collate(items: list[dict]) -> dict:
    """Items -> a batch; an item that failed to load (a dict with "_error") makes the batch that error."""
    for it in items:
        if "_error" in it:
            return {"_error": it["_error"]}
    out: dict[str, Any] = {}
    for k in items[0]:
        values = [it[k] for it in items]
        if isinstance(values[0], torch.Tensor):
            out[k] = torch.stack(values)
        elif isinstance(values[0], int):
            out[k] = torch.tensor(values, dtype=torch.long)
        else:
            out[k] = values
    return out


class _Keyed(Dataset):
    """`dataset[(index, seed)]` = the item, its random crop drawn from a generator seeded by `seed`;
    a load error comes back as {"_error": message} (raised in the training process, with its own words)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]) -> dict:
        index, seed, *target = key  # target: a bucket's (height, width)
        try:
            if target:
                return self.dataset.load(index, torch.Generator().manual_seed(seed), tuple(target))
            if hasattr(self.dataset, "load"):
                return self.dataset.load(index, torch.Generator().manual_seed(seed))
            return self.dataset[index]
        except LdmkitError as e:
            return {"_error": f"{e}; fix or remove it (ldmkit data check names every bad file)"}


class _StepBatches(Sampler):
    """Per step from `start`: this process's rows [lo, hi) of the global batch `batch_indices(step)`,
    each as (index, augmentation seed of (seed, step, row))."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, lo: int, hi: int):
        self.n, self.batch_size, self.seed, self.start, self.lo, self.hi = n, batch_size, seed, start, lo, hi

    def __iter__(self):  # without end: the trainer decides how many steps it takes
        for step in itertools.count(self.start):
            idx = batch_indices(step, self.n, self.batch_size, self.seed)
            rows = range(self.lo, self.hi)
            yield [(int(idx[r]), item_seed(self.seed, step, r)) for r in rows]


class _BucketBatches(_StepBatches):
    """As `_StepBatches`, each global batch drawn from one aspect-ratio bucket (`BucketOrder`); keys carry
    the bucket's (height, width)."""

    def __init__(self, order, buckets: list[tuple[int, int]], seed: int, start: int, lo: int, hi: int):
        self.order, self.buckets, self.seed, self.start, self.lo, self.hi = order, buckets, seed, start, lo, hi

    def __iter__(self):
        for step in itertools.count(self.start):
            bucket, idx = self.order(step)
            h, w = self.buckets[bucket]
            yield [(idx[r], item_seed(self.seed, step, r), h, w) for r in range(self.lo, self.hi)]


class Repeated(Dataset):
    """A map-style dataset read in the order of an epoch list (`ImageFolderDataset.epoch`: each item as often
    as its kohya repeat folder says); `items` and `dims` follow, so buckets place each repeat."""

    def __init__(self, dataset: Dataset, epoch: list[int]):
        self.dataset, self.epoch = dataset, epoch
        self.items = [dataset.items[i] for i in epoch] if hasattr(dataset, "items") else None
        self.dims = getattr(dataset, "dims", {})

    def __len__(self) -> int:
        return len(self.epoch)

    def load(self, index: int, generator: torch.Generator | None = None, target: tuple[int, int] | None = None) -> dict:
        return self.dataset.load(self.epoch[index], generator, target)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.epoch[index]]


def epoch_of(ds: Dataset) -> list[int] | None:
    """A folder's epoch list when some item repeats (kohya folders); None when every item is seen once."""
    epoch = getattr(ds, "epoch", None)
    return epoch if epoch is not None and len(epoch) != len(ds) else None


def tag_rule(d) -> TagRule:
    """The caption-tag rule of a data config (inactive unless shuffle_tags or tag_dropout asks)."""
    return TagRule(seed=d.seed, shuffle=getattr(d, "shuffle_tags", False), keep_tokens=getattr(d, "keep_tokens", 0),
                   dropout=getattr(d, "tag_dropout", 0.0))


class TrainData(ABC):
    """A training set as the trainers see it (module docstring)."""

    preview: TensorData  # a few items in memory: sample-grid conditions, caption/label checks
    num_classes: int = 0
    tags: TagRule = TagRule()  # set by open_train_data from the data config

    def _tagged(self, batch: dict, step: int, lo: int) -> dict:
        """The batch with each caption rewritten by `tags` for its (step, global row lo + i)."""
        if self.tags.active and "text" in batch:
            batch["text"] = [self.tags(t, step, lo + i) for i, t in enumerate(batch["text"])]
        return batch

    @abstractmethod
    def batch(self, step: int, lo: int, hi: int) -> dict:
        """Rows [lo, hi) of step `step`'s global batch (lo, hi inside this process's rows)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryData(TrainData):
    """`data` in memory; `epoch` (kohya repeats) lists rows of `data`, each as often as it repeats: the
    order permutes that list, and each image is held (and encoded) once."""

    def __init__(self, data: TensorData, batch_size: int, seed: int, num_classes: int = 0,
                 epoch: list[int] | None = None):
        self.data, self.preview, self.batch_size, self.seed = data, data, batch_size, seed
        self.num_classes = num_classes
        self.epoch = torch.tensor(epoch, dtype=torch.long) if epoch is not None else None

    def __len__(self) -> int:
        return len(self.data) if self.epoch is None else len(self.epoch)

    def indices(self, step: int) -> torch.Tensor:
        """Rows of `data` in step `step`'s global batch."""
        idx = batch_indices(step, len(self), self.batch_size, self.seed)
        return idx if self.epoch is None else self.epoch[idx]

    def batch(self, step: int, lo: int, hi: int) -> dict:
        rows = self.indices(step)[lo:hi]
        return self._tagged({**self.data.batch(rows), "_rows": rows}, step, lo)


class _Prefetched(TrainData):
    """The per-step batches of an iterator over this process's rows [lo, hi) of each global batch."""

    def __init__(self, rows: tuple[int, int], workers: int):
        self.rows, self.workers = rows, workers
        self._iter = None
        self._step: int | None = None  # the step whose batch `_current` holds
        self._current: dict | None = None

    @abstractmethod
    def _start(self, step: int):
        """A fresh iterator whose first batch is step `step`'s."""

    def _consumed(self, batch: dict) -> None:
        """Called with each batch taken from the iterator (stream positions)."""

    def batch(self, step: int, lo: int, hi: int) -> dict:
        if self._step != step:
            if self._iter is None or self._step is None or step != self._step + 1:
                self.close()
                self._iter = self._start(step)
            got = next(self._iter)
            if "_error" in got:
                self.close()
                raise LdmkitError(got["_error"])
            self._consumed(got)
            self._current, self._step = got, step
        a, b = lo - self.rows[0], hi - self.rows[0]
        if not 0 <= a < b <= self.rows[1] - self.rows[0]:
            raise ValueError(f"rows [{lo}, {hi}) are not this process's rows {self.rows}")
        return self._tagged({k: v[a:b] for k, v in self._current.items() if not k.startswith("_")}, step, lo)

    def close(self) -> None:
        self._iter = None  # a DataLoader iterator shuts its workers down when collected
        self._step = None


class LoaderData(_Prefetched):
    """A map-style dataset read by DataLoader workers in `batch_indices` order (module docstring)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rows: tuple[int, int],
                 workers: int, preview: TensorData, num_classes: int = 0, buckets: list[tuple[int, int]] | None = None):
        super().__init__(rows, workers)
        self.buckets, self.order = buckets, None
        if buckets:  # every item to the bucket nearest its aspect ratio (the folder index knows each size)
            from ldmkit.data.buckets import BucketOrder, nearest

            sizes = [dataset.dims[item.file] for item in dataset.items]
            assignment = [nearest(w, h, buckets) for w, h in sizes]
            self.order = BucketOrder(assignment, len(buckets), batch_size, seed)
            self.bucket_counts = [assignment.count(b) for b in range(len(buckets))]
        if len(dataset) < batch_size:
            raise LdmkitError(f"the dataset has {len(dataset)} items, fewer than one batch of {batch_size}; "
                              "lower optim.batch_size")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.preview, self.num_classes = preview, num_classes

    def __len__(self) -> int:
        return len(self.dataset)

    def _start(self, step: int):
        if self.order is not None:
            sampler = _BucketBatches(self.order, self.buckets, self.seed, step, *self.rows)
        else:
            sampler = _StepBatches(len(self.dataset), self.batch_size, self.seed, step, *self.rows)
        loader = DataLoader(_Keyed(self.dataset), batch_sampler=sampler, num_workers=self.workers, collate_fn=collate,
                            prefetch_factor=4 if self.workers else None, persistent_workers=False)
        return iter(loader)


class StreamData(_Prefetched):
    """Tar shards streamed by `ShardStream`; `state_dict()` is this process's readers' places."""

    def __init__(self, shards: list[str], size: int, batch_size: int, seed: int, rows: tuple[int, int], rank: int,
                 world: int, workers: int, random_crop: bool, skip_bad: bool, preview: TensorData,
                 caption: str = "txt", mask: str = "none"):
        super().__init__(rows, workers)
        self.args = dict(shards=shards, size=size, batch=rows[1] - rows[0], seed=seed, rank=rank, world=world,
                         workers=max(1, workers), random_crop=random_crop, skip_bad=skip_bad, caption=caption,
                         mask=mask)
        self.preview = preview
        self.num_classes = int(preview.labels.max()) + 1 if len(preview) and preview.labels.max() >= 0 else 0
        self.readers = ShardStream(**self.args).workers  # after the cut to the shards available
        self.position = {"batches": 0, "slots": {}, "world": world, "workers": self.readers}

    def _start(self, step: int):
        stream = ShardStream(**self.args, state={"batches": self.position["batches"], "slots": self.position["slots"]})
        workers = self.readers if self.workers else 0  # data.workers=0: read in this process
        loader = DataLoader(stream, batch_size=None, num_workers=workers,
                            prefetch_factor=4 if workers else None, persistent_workers=False)
        return iter(loader)

    def _consumed(self, batch: dict) -> None:
        slot, epoch, k, offset = (int(v) for v in batch["_pos"])
        self.position["batches"] += 1
        self.position["slots"][str(slot)] = [epoch, k, offset]

    def state_dict(self) -> dict:
        return {"batches": self.position["batches"], "slots": dict(self.position["slots"]),
                "world": self.position["world"], "workers": self.position["workers"]}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state.get("world") != self.position["world"] or state.get("workers") != self.readers:
            warnings.warn(f"the shards were read by {state.get('world')} processes x {state.get('workers')} workers "
                          f"before and now by {self.position['world']} x {self.readers}: the stream restarts at the "
                          "earliest epoch it had reached, so some items of that epoch are seen twice", stacklevel=2)
            epoch = min((v[0] for v in state.get("slots", {}).values()), default=0)
            self.position.update(batches=0, slots={str(s): [epoch, 0, 0] for s in range(self.readers)})
        else:
            self.position.update(batches=int(state["batches"]), slots={k: list(v) for k, v in state["slots"].items()})
        self.close()


def _map_dataset(spec: str, d, split: str, random_crop: bool) -> Dataset:
    from ldmkit.data.hf import HFImageDataset, is_hf_spec

    mask = getattr(d, "mask", "none")
    if mask != "none" and (spec in DATASETS or is_hf_spec(spec)):
        raise LdmkitError(f"data.mask={mask} reads masks from an image folder or tar shards, not {spec!r}; "
                          "set data.mask=none or train from a folder")
    if is_hf_spec(spec):
        return HFImageDataset(spec, d.size, split, image_column=d.image_column, text_column=d.text_column,
                              label_column=d.label_column, random_crop=random_crop)
    ds = build_dataset(spec, d.size, split, seed=d.seed, skip_bad=d.skip_bad_images, length=d.length,
                       allow_outside_links=d.allow_outside_links, caption_extension=getattr(d, "caption_extension", ".txt"),
                       filename_captions=getattr(d, "filename_captions", False), mask=mask)
    ds = with_vocabulary(ds, getattr(d, "vocabulary", "basic"))  # shapes' extended words (fine-tuning a concept)
    ds = with_composition(ds, getattr(d, "holdout", 0), getattr(d, "labels", "class"))  # shapes' composition test
    if random_crop and hasattr(ds, "random_crop") and split == "train":
        ds.random_crop = True
    return ds


def open_train_data(d, batch_size: int, seed: int, dist, accum: int, progress: bool, masked_loss: bool = False) -> TrainData:
    """The training split of `d.dataset` as a TrainData for this process (`d`: the config's data section).
    `masked_loss`: the trainer weights its loss by the batches' "loss_mask"; any other refuses data.mask."""
    source = _open_train_data(d, batch_size, seed, dist, accum, progress, masked_loss)
    source.tags = tag_rule(d)
    return source


def _open_train_data(d, batch_size: int, seed: int, dist, accum: int, progress: bool, masked_loss: bool) -> TrainData:
    from ldmkit.train.distributed import micro_batches

    mask = getattr(d, "mask", "none")
    if mask != "none" and not masked_loss:
        raise LdmkitError(f"data.mask={mask} weights the second stage's denoising loss (ldmkit train); this trainer "
                          "does not read masks: set data.mask=none")
    pieces = micro_batches(batch_size, dist, accum)
    rows = (pieces[0][0], pieces[-1][1])  # this process's rows of every global batch
    spec, random_crop = d.dataset, d.crop == "random"
    if spec not in DATASETS and is_shard_spec(spec):
        if d.in_memory is True:
            raise LdmkitError("tar shards are always streamed; set data.in_memory to auto or false")
        caption = caption_field(getattr(d, "caption_extension", ".txt"))
        preview = materialize(ShardItems(spec, d.size, "train", PREVIEW, d.skip_bad_images, caption, mask), progress=False)
        return StreamData(list_shards(spec), d.size, batch_size, d.seed, rows, dist.rank, dist.world, d.workers, random_crop,
                          d.skip_bad_images, preview, caption, mask)
    if spec not in DATASETS:
        from ldmkit.data.latent_shards import LatentShards, is_latent_spec

        if is_latent_spec(spec):
            if mask != "none":
                raise LdmkitError(f"latent shards ({spec}) hold no masks: data.mask={mask} needs the images; train "
                                  "from the image folder, or set data.mask=none")
            ds = LatentShards(spec)
            return LoaderData(ds, batch_size, seed, rows, d.workers, ds.preview(PREVIEW), ds.num_classes)
    ds = _map_dataset(spec, d, "train", random_crop)
    num_classes = getattr(ds, "num_classes", 0)
    epoch = epoch_of(ds)
    if d.buckets:
        from ldmkit.data.buckets import make_buckets
        from ldmkit.data.folder import ImageFolderDataset

        if not isinstance(ds, ImageFolderDataset):
            raise LdmkitError("data.buckets needs each image's size before training: use an image folder "
                              f"(not {spec!r}), or turn data.buckets off")
        if d.in_memory is True:
            raise LdmkitError("aspect-ratio buckets give batches of different shapes: set data.in_memory=auto or false")
        buckets = ([tuple(b) for b in d.buckets] if isinstance(d.buckets, list)
                   else make_buckets(d.size, d.bucket_step or max(8, d.size // 8)))
        preview = materialize(ds, limit=PREVIEW, progress=False)
        return LoaderData(Repeated(ds, epoch) if epoch else ds, batch_size, seed, rows, d.workers, preview, num_classes,
                          buckets=buckets)
    in_memory = d.in_memory
    if in_memory == "auto":
        in_memory = spec in DATASETS or len(ds) * 3 * d.size * d.size * 4 <= IN_MEMORY_BYTES
    if in_memory:
        return MemoryData(materialize(ds, desc="train data", progress=progress), batch_size, seed, num_classes, epoch)
    if mask != "none" and d.latent_cache:
        raise LdmkitError(f"data.latent_cache stores latents without masks: data.mask={mask} with a collection read "
                          "lazily needs the images each step; unset data.latent_cache (or fit it in memory)")
    preview = materialize(ds, limit=PREVIEW, progress=False)
    return LoaderData(Repeated(ds, epoch) if epoch else ds, batch_size, seed, rows, d.workers, preview, num_classes)


def check_buckets(source: TrainData, multiple: int, what: str) -> None:
    """Every bucket's sides must be multiples of `multiple` (the first stage's factor, times the U-Net's)."""
    for h, w in getattr(source, "buckets", None) or []:
        if h % multiple or w % multiple:
            raise LdmkitError(f"bucket {h}x{w} is not a multiple of {multiple} ({what}); set data.bucket_step to a "
                              f"multiple of {multiple} or list data.buckets yourself")


def open_val_data(d, limit: int, progress: bool) -> TensorData:
    """Up to `limit` held-out items of `d.dataset`, centre-cropped, in memory (validation is small)."""
    if d.dataset not in DATASETS and is_shard_spec(d.dataset):  # the stream's first held-out samples, no more
        caption = caption_field(getattr(d, "caption_extension", ".txt"))
        return materialize(ShardItems(d.dataset, d.size, "val", limit, d.skip_bad_images, caption), progress=False)
    return materialize(_map_dataset(d.dataset, d, "val", False), limit, "val data", progress)


def posterior_of(batch: dict, mean: torch.Tensor | None, std: torch.Tensor | None, ae, device: torch.device):
    """(mean, std) of q(z|x) for a batch's rows: looked up in the in-memory set's encoded posteriors (its
    "_rows"), read from latent shards, or encoded now from the batch's images (a lazily read collection)."""
    if "_rows" in batch:
        rows = batch["_rows"].to(mean.device)
        return mean[rows], std[rows]
    if "mean" in batch:
        return batch["mean"].to(device), batch["std"].to(device)
    with torch.no_grad():
        post = ae.encode(batch["image"].to(device))
    return post.mean.contiguous(), post.std.contiguous()  # (b, c, h, w) each


def check_lazy_source(source: TrainData, ldm, cfg) -> None:
    """A lazy source for the second stage: latent shards must come from this first stage, at this size."""
    ds = getattr(source, "dataset", None)
    from ldmkit.data.latent_shards import LatentShards

    if not isinstance(ds, LatentShards):
        return
    from ldmkit.train.latents import autoencoder_digest

    if cfg.concat is not None:
        raise LdmkitError("a concatenation route needs the images themselves; train it from the images, not latent shards")
    if ds.index.get("autoencoder") != autoencoder_digest(ldm.autoencoder):
        raise LdmkitError(f"the latents in {ds.folder} were encoded by another first stage than {cfg.autoencoder}; "
                          "encode again with this one (ldmkit encode --autoencoder ...) or point `autoencoder:` at that one")
    if ds.index.get("image_size") != cfg.data.size:
        raise LdmkitError(f"the latents in {ds.folder} are of {ds.index.get('image_size')} px images but data.size is "
                          f"{cfg.data.size}; set data.size={ds.index.get('image_size')}")
