"""The checkpoints a server was started with: their names and hashes as the A1111 API lists them, the
one that new requests use, and the loaded modules (one model in memory at a time).

A checkpoint is anything `ldmkit sample --checkpoint` takes: an ldmkit run or checkpoint folder, a
`train-control` folder (its ControlNet/adapter plus the base it names), a diffusers pipeline folder or an
original single file. What each model can do (size, text, inpainting, a control map) is read from the
loaded module, so the page and the request checks follow the model, never a guess.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldmkit.device import autocast
from ldmkit.errors import LdmkitError


@dataclass
class Loaded:
    """A loaded checkpoint: the LatentDiffusion, its control network (or None) and what it can do."""

    ldm: object
    control: object | None
    sha256: str | None
    tiny: object | None = None  # the server's tiny decoder for this model (`generation.tiny_decoder`), or None

    @property
    def size(self) -> int:
        return self.ldm.config.image_size

    @property
    def granularity(self) -> int:
        """Image sides must be multiples of this: the autoencoder's factor f times the U-Net's 2^(levels−1)
        (SD 1.5: 8 · 8 = 64 px), so every U-Net level has whole latent cells."""
        return self.ldm.config.autoencoder.downsample_factor * self.ldm.config.unet.size_multiple

    @property
    def text(self) -> bool:
        return bool(self.ldm.config.conditioner.text_encoder)

    @property
    def concat(self) -> str | None:
        cc = self.ldm.config.concat
        return cc.kind if cc is not None else None

    @property
    def hint_channels(self) -> int | None:
        return self.control.config.hint_channels if self.control is not None else None

    def capabilities(self) -> dict:
        return {"size": self.size, "granularity": self.granularity, "text": self.text, "labels": self.ldm.config.conditioner.num_classes,
                "inpainting": self.concat == "inpaint", "lowres": self.concat == "lowres",
                "control": type(self.control).__name__ if self.control is not None else None,
                "control_channels": self.hint_channels}


@dataclass
class Entry:
    """One checkpoint given on the command line. `title` is the name clients send back to switch to it."""

    path: str
    title: str
    sha256: str | None = None
    caps: dict | None = None  # Loaded.capabilities(), kept after the module is dropped: requests are checked by it
    sampling: dict = field(default_factory=dict)  # meta.sampling: how the checkpoint asks to be sampled (sampler, steps, guidance)
    loaded: Loaded | None = field(default=None, repr=False)

    def describe(self) -> dict:
        """An item of GET /sdapi/v1/sd-models (A1111's SDModelItem)."""
        return {"title": self.title, "model_name": self.title, "hash": self.sha256[:10] if self.sha256 else None,
                "sha256": self.sha256, "filename": str(Path(self.path).resolve()), "config": None}


def _titles(paths: list[str]) -> list[str]:
    """Folder (or file) names; where two share a name, their parent is prefixed (free/text, fixed/text)."""
    names = [Path(p).resolve().name for p in paths]
    return [f"{Path(p).resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def load_checkpoint(path: str, device: torch.device, skip: frozenset[str] = frozenset()) -> Loaded:
    """The LatentDiffusion (and control network) a checkpoint holds, as `ldmkit sample` reads it (`skip`: as
    `ldmkit.load` takes it)."""
    import ldmkit
    from ldmkit.checkpoint import is_checkpoint, load_control, read_config, weights_sha256
    from ldmkit.pipeline import LatentDiffusion

    if not Path(path).exists():
        raise LdmkitError(f"--checkpoint {path} does not exist")
    control = None
    if is_checkpoint(path) and read_config(path)[1] in ("controlnet", "adapter"):
        control, ldm, _ = load_control(path, device=device)
    else:
        ldm = ldmkit.load(path, device=device, skip=skip)
    if not isinstance(ldm, LatentDiffusion):
        raise LdmkitError(f"--checkpoint {path} holds a {type(ldm).__name__}, not a diffusion model; give a folder "
                          "`ldmkit train` or `ldmkit train-control` wrote, or a Stable Diffusion pipeline")
    return Loaded(ldm.eval().requires_grad_(False), control, weights_sha256(path))


class ModelStore:
    """The server's checkpoints. `current` is the one new requests are checked against and run with; only
    the worker thread loads (`get`), so loading never races a generation. `networks`: the LoRA library
    (`--lora-dir`, `<lora:name:w>` in prompts) or None; `embeddings`: the textual-inversion library
    (`--embeddings-dir`) or None; `tiny`: the tiny autoencoder of `--tiny-decoder` (checked against each model as it
    loads) for live previews, and for the final images too when `tiny_final`. `precision` (autocast, `auto`:
    `device.resolve_precision`), `backend` and `backend_cache`: as `ldmkit sample` takes them
    (`generation.openvino.with_backend`)."""

    def __init__(self, paths: list[str], device: torch.device | str = "cpu", lora_dir: str | None = None,
                 embeddings_dir: str | None = None, tiny_decoder: str | None = None, tiny_final: bool = False,
                 precision: str = "auto", backend: str = "torch", backend_cache: str | None = None):
        if not paths:
            raise LdmkitError("give at least one --checkpoint")
        for p in paths:
            if not Path(p).exists():
                raise LdmkitError(f"--checkpoint {p} does not exist")
        self.device = torch.device(device)
        self.precision, self.backend, self.backend_cache = precision, backend, backend_cache
        autocast(precision, self.device, "--precision")  # fp16 off CUDA is refused before any model loads
        self.networks = self.embeddings = None
        if lora_dir is not None:
            from ldmkit.interop.lora_library import LoraLibrary

            self.networks = LoraLibrary(lora_dir)
        if embeddings_dir is not None:
            from ldmkit.conditioning.embeddings import EmbeddingLibrary  # another branch's module: imported only when asked

            self.embeddings = EmbeddingLibrary(embeddings_dir)
        self.tiny, self.tiny_path, self.tiny_final = None, tiny_decoder, tiny_final
        if tiny_decoder is not None:
            import ldmkit

            if not Path(tiny_decoder).exists():
                raise LdmkitError(f"--tiny-decoder {tiny_decoder} does not exist")
            self.tiny = ldmkit.load(tiny_decoder, device=self.device).requires_grad_(False)
        elif tiny_final:
            raise LdmkitError("--tiny-final decodes the results with the tiny decoder: give it with --tiny-decoder DIR")
        self.entries = [Entry(p, t) for p, t in zip(paths, _titles(paths))]
        self.current = self.entries[0]
        self._lock = threading.Lock()
        self.get(self.current)  # the first model loads at start, so a bad checkpoint stops the server at once

    def find(self, name: str) -> Entry | None:
        """The entry a client names: its title, its title with a "[hash]" suffix (as A1111 titles), its path."""
        name = str(name).strip()
        bare = name.split(" [")[0]
        for e in self.entries:
            if name in (e.title, e.path, str(Path(e.path).resolve())) or bare == e.title:
                return e
        return None

    def get(self, entry: Entry) -> Loaded:
        """The loaded model of `entry`; another one loaded before is dropped first (one model in memory)."""
        from ldmkit.interop.convert import sampling_defaults_any

        with self._lock:
            if entry.loaded is None:
                for other in self.entries:
                    other.loaded = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                source, skip = None, frozenset()
                if self.backend != "torch" and self.networks is None and self.embeddings is None:  # else refused below
                    from ldmkit.sample import load_skip

                    # the parts whose IR is cached for these files are not read (most of a warm start's loading)
                    source, skip = load_skip(self.backend, entry.path, None, self.backend_cache, self.device,
                                             precision=self.precision)
                loaded = load_checkpoint(entry.path, self.device, skip)
                if self.embeddings is not None and loaded.text:  # before it counts as loaded: a refusal leaves none
                    from ldmkit.conditioning.embeddings import attach_embeddings

                    attach_embeddings(loaded.ldm.conditioner, self.embeddings)  # their names expand in prompts
                if self.backend != "torch":
                    from ldmkit.generation.openvino import with_backend

                    loaded.ldm = with_backend(loaded.ldm, self.backend, self.precision, self.backend_cache, source, **{
                        "--lora-dir": self.networks, "--embeddings-dir": self.embeddings, "a ControlNet": loaded.control})
                if self.tiny is not None:  # refused here, for this model, when its latents do not fit
                    from ldmkit.generation import tiny_decoder

                    loaded.tiny = tiny_decoder(loaded.ldm, self.tiny, f"--tiny-decoder {self.tiny_path}")
                entry.loaded = loaded
                entry.sha256, entry.caps = loaded.sha256, loaded.capabilities()
                entry.sampling = sampling_defaults_any(entry.path)
            return entry.loaded

    def autocast(self):
        """The autocast generation runs under (none for OpenVINO, which carries its own precision)."""
        return autocast(self.precision if self.backend == "torch" else "fp32", self.device, "--precision")

    def capabilities(self) -> dict:
        """What the current model can do, for the page (GET /ldmkit/v1/model)."""
        e = self.current
        return {"title": e.title, "hash": e.sha256[:10] if e.sha256 else None, **e.caps,
                "models": [x.title for x in self.entries]}
