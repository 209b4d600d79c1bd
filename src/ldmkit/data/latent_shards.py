"""Latent shards written by `ldmkit encode`: a collection's posteriors q(z|x) = N(μ, σ²), read row by row.

    OUT/latents.json          format, the first stage's digest, the source, image size, latent shape,
                              count, and per shard its file, rows and SHA-256; written LAST
    OUT/00000.safetensors     "mean", "std" (n, c, h, w) float32, "label" (n,) int64;
                              metadata "text": the n captions as a JSON list
    OUT/00001.safetensors     ...

A training step reads its rows with `os.pread` at offsets computed from each shard's safetensors header
(8-byte little-endian header length, a JSON header giving each tensor's byte range, then the data): no
file is mapped or loaded whole, so memory does not depend on the number or size of the shards.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ldmkit.data.tensors import TensorData
from ldmkit.errors import LdmkitError

INDEX = "latents.json"
FORMAT = "ldmkit-latents"
VERSION = 1
_DTYPES = {"F32": (torch.float32, 4), "I64": (torch.int64, 8)}


def is_latent_spec(spec: str) -> bool:
    return os.path.isfile(os.path.join(spec, INDEX))


def read_header(path: str | Path) -> tuple[int, dict]:
    """(offset of the data section, the safetensors JSON header) of one file."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise LdmkitError(f"latent shard {path} is truncated; run `ldmkit encode` again to rewrite it")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise LdmkitError(f"latent shard {path} has a damaged header; run `ldmkit encode` again to rewrite it") from None
    return 8 + n, header


class LatentShards(Dataset):
    """Items {mean, std, label, text} of an `ldmkit encode` folder, read on demand (module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise LdmkitError(f"{self.folder / INDEX} is unreadable ({e}); run `ldmkit encode` again") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise LdmkitError(f"{self.folder} is not a version-{VERSION} latent folder of `ldmkit encode`; encode again")
        self.shape = tuple(self.index["latent_shape"])
        self.num_classes = int(self.index.get("num_classes", 0))
        self.name = self.index.get("source", str(folder))
        self.shards: list[tuple[Path, int, dict, list[str]]] = []  # (file, data offset, header, captions)
        self.starts: list[int] = []
        total = 0
        for entry in self.index["shards"]:
            path = self.folder / entry["file"]
            if not path.is_file():
                raise LdmkitError(f"latent shard {path} is missing; run `ldmkit encode` again to finish the folder")
            offset, header = read_header(path)
            captions = json.loads(header.get("__metadata__", {}).get("text", "[]"))
            self.starts.append(total)
            total += int(entry["count"])
            self.shards.append((path, offset, header, captions))
        self.count = total
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self.count

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.count:
            raise IndexError(index)
        lo, hi = 0, len(self.starts) - 1
        while lo < hi:  # the last shard starting at or before `index`
            mid = (lo + hi + 1) // 2
            if self.starts[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        return lo, index - self.starts[lo]

    def _row(self, shard: int, name: str, row: int) -> torch.Tensor:
        path, offset, header, _ = self.shards[shard]
        meta = header[name]
        dtype, width = _DTYPES[meta["dtype"]]
        per_row = width * math.prod(meta["shape"][1:])
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(path, os.O_RDONLY)
        raw = os.pread(fd, per_row, offset + meta["data_offsets"][0] + row * per_row)
        if len(raw) != per_row:
            raise LdmkitError(f"latent shard {path} is truncated; run `ldmkit encode` again to rewrite it")
        return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(meta["shape"][1:])

    def load(self, index: int, generator: torch.Generator | None = None) -> dict:
        shard, row = self._locate(index)
        return {"mean": self._row(shard, "mean", row), "std": self._row(shard, "std", row),
                "label": int(self._row(shard, "label", row)), "text": self.shards[shard][3][row]}

    def __getitem__(self, index: int) -> dict:
        return self.load(index)

    def preview(self, n: int) -> TensorData:
        """The first n items' conditions (sample grids and checks need captions and labels, not pixels)."""
        items = [self.load(i) for i in range(min(n, self.count))]
        return TensorData(images=torch.zeros(len(items), 3, 1, 1), labels=torch.tensor([it["label"] for it in items]),
                          texts=[it["text"] for it in items])

    def __getstate__(self) -> dict:  # DataLoader workers open their own descriptors
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state
