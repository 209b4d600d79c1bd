"""A folder of LoRA files used by name, as A1111's `<lora:name:weight>` and `GET /sdapi/v1/loras` use them.

    LoraLibrary(dir)            scans dir (and its subfolders) for *.safetensors LoRA files
      .names() .path(name)      the names a prompt may use (file name without extension)
      .hash(name)               A1111's short hash ("Lora hashes: name: 0123456789ab" in the PNG parameters)
      .a1111_listing()          GET /sdapi/v1/loras: [{"name", "alias", "path", "metadata"}]
      .applied(model, [(name, weight), ...])   merged into the model for one request, then undone exactly

The files are read with `interop.lora` (diffusers/peft and kohya layouts; `read_lora` reads safetensors
only, so .pt/.ckpt LoRAs are not listed). A file is read once and kept (per model: kohya names resolve
through the model's module names); `refresh()` rescans and forgets files that changed on disk.

Applying is `merge_lora` (W ← W + w·(α/r)·BA, Hu et al. 2021 eq. 3) per LoRA, after a copy of every
weight it touches is kept; leaving the context copies them back, so the model is bit-for-bit what it
was, whatever the float rounding of the merge. The copies cost the touched layers' size, for one request.

The hash is A1111's (extensions-builtin/Lora/network.py `NetworkOnDisk`, modules/hashes.py
`addnet_hash_safetensors`, from kohya's sd-scripts): sha256 of the bytes after the safetensors header
(8-byte length + JSON), so editing the metadata keeps it; its first 12 hex digits are the short hash. A1111
prefers the `sshs_model_hash` a kohya trainer stored in the metadata; ldmkit computes it from the bytes
always, so a file whose metadata lies still gets its true hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import LdmkitError
from ldmkit.interop.lora import Lora, _module, from_state_dict, merge_lora, model_parts, read_lora

MAX_WEIGHT = 10.0  # |w| of a <lora:name:w>; A1111's UI slider spans −2..2, trainers' extremes stay well inside 10
SHORT_HASH = 12  # hex digits of the short hash, as A1111's NetworkOnDisk.shorthash


def addnet_hash(path: str | Path) -> str:
    """sha256 (hex) of a safetensors file's tensor bytes: everything after its header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # the header's length, little-endian u64 (safetensors format)
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _header_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors header, without reading the tensors ({} when unreadable)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100 << 20:
                return {}
            doc = json.loads(f.read(n))
        meta = doc.get("__metadata__") if isinstance(doc, dict) else None
        return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


class LoraLibrary:
    """The LoRA files under `folder`, by name. Thread-safe: the server's worker applies while the event loop lists."""

    suffixes = (".safetensors",)
    max_weight = MAX_WEIGHT

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LdmkitError(f"--lora-dir {folder} is not a folder")
        self._lock = threading.RLock()
        self._files: dict[str, Path] = {}
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}  # path -> ((mtime_ns, size), sha256)
        self._read: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()  # model -> {(path, stat): Lora}
        self.refresh()

    # --- the folder ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rescan the folder (POST /sdapi/v1/refresh-loras). A name is the file name without its extension;
        two files with one name in different subfolders are named by their path under the folder instead."""
        files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in self.suffixes and p.is_file())
        stems = [p.stem for p in files]
        named = {}
        for p in files:
            name = p.stem if stems.count(p.stem) == 1 else p.relative_to(self.folder).with_suffix("").as_posix()
            named[name] = p
        with self._lock:
            self._files = named
            self._hashes = {p: v for p, v in self._hashes.items() if p in named.values()}
            for cache in self._read.values():
                for key in [k for k in cache if k[0] not in named.values()]:
                    del cache[key]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def path(self, name: str) -> Path:
        with self._lock:
            p = self._files.get(name)
            if p is None:
                names = sorted(self._files)
                have = ", ".join(names[:20]) + (", …" if len(names) > 20 else "") or "none"
                raise LdmkitError(f"no LoRA named '{name}' in {self.folder} (have: {have})")
            return p

    def hash(self, name: str) -> str:
        """A1111's short hash of the LoRA `name` (first 12 hex of `addnet_hash`), computed once per file version."""
        p = self.path(name)
        st = p.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            known = self._hashes.get(p)
            if known is not None and known[0] == stamp:
                return known[1][:SHORT_HASH]
        try:
            digest = addnet_hash(p)
        except OSError as e:
            raise LdmkitError(f"<lora:{name}>: cannot read {p} ({e.strerror})") from None
        with self._lock:
            self._hashes[p] = (stamp, digest)
        return digest[:SHORT_HASH]

    def a1111_listing(self) -> list[dict]:
        """GET /sdapi/v1/loras as A1111 answers it: name, alias (kohya's ss_output_name when the file has
        one), the file's path and its safetensors metadata."""
        out = []
        for name in self.names():
            p = self.path(name)
            meta = _header_metadata(p)
            out.append({"name": name, "alias": meta.get("ss_output_name") or name, "path": str(p.resolve()),
                        "metadata": meta})
        return out

    # --- applying ------------------------------------------------------------------------------------
    def load(self, name: str, model: nn.Module) -> Lora:
        """The LoRA `name` as adapters of `model`'s layers, read once per file version and model."""
        p = self.path(name)
        st = p.stat()
        key = (p, st.st_mtime_ns, st.st_size)
        with self._lock:
            cache = self._read.setdefault(model, {})
            if key in cache:
                return cache[key]
        try:
            sd, meta = read_lora(p)
            lora = from_state_dict(sd, meta, model)
            parts = model_parts(model)
            for path, a in lora.items():  # shapes checked now, so a bad file fails before anything is merged
                m = _module(parts, path)
                if tuple(a.delta().shape) != tuple(m.weight.shape):
                    raise LdmkitError(f"its {path} is {tuple(a.delta().shape)} but the model's weight is "
                                      f"{tuple(m.weight.shape)}: made for another model")
        except LdmkitError as e:
            raise LdmkitError(f"<lora:{name}> ({p}): {e}") from None
        with self._lock:
            for old in [k for k in cache if k[0] == p]:
                del cache[old]
            cache[key] = lora
        return lora

    @contextmanager
    def applied(self, model: nn.Module, loras: list[tuple[str, float]]) -> Iterator[dict[str, str]]:
        """Merge each (name, weight) into `model` for the duration of the block; yields {name: short hash}.
        Everything is checked and read before the first weight changes; on leaving (even by an exception)
        every touched weight is copied back from the copy kept before the merge, exactly."""
        for name, w in loras:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or abs(w) > MAX_WEIGHT:
                raise LdmkitError(f"<lora:{name}:{w}>: the weight must be a number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
        read = [(name, float(w), self.load(name, model)) for name, w in loras]
        hashes = {name: self.hash(name) for name, _, _ in read}
        parts = model_parts(model)
        kept: dict[nn.Module, torch.Tensor] = {}
        for _, _, lora in read:
            for path in lora:
                m = _module(parts, path)
                if m not in kept:
                    kept[m] = m.weight.detach().clone()
        try:
            with torch.no_grad():
                for _, w, lora in read:
                    merge_lora(model, lora, w)
            yield hashes
        finally:
            with torch.no_grad():
                for m, w0 in kept.items():
                    m.weight.copy_(w0)
            if any(p.startswith("text_encoder.") for _, _, lora in read for p in lora):
                enc = getattr(getattr(model, "conditioner", None), "text_encoder", None)
                if hasattr(enc, "_cache"):
                    enc._cache.clear()  # prompts encoded with the LoRA merged are stale now
