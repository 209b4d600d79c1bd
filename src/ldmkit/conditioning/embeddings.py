"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): a few learned vectors in
the text encoder's token-embedding space, named by their file, written in a prompt like a word.

Files read (the name is the file's stem, A1111's rule: `embeddings/bad-hands.pt` is `bad-hands`):

| layout                         | content                                                           |
| ------------------------------ | ----------------------------------------------------------------- |
| A1111 `.pt` / `.bin`           | `{"string_to_param": {"*": (n, d)}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}` |
| A1111 `.safetensors`           | `{"emb_params": (n, d)}`                                          |
| diffusers `learned_embeds.*`   | `{token: (d,) or (n, d)}` (one entry), `.safetensors` or `.bin`    |
| SDXL (either program)          | `{"clip_l": (n, 768), "clip_g": (n, 1280)}`: clip_l into CLIP ViT-L, clip_g into OpenCLIP bigG (the refiner: clip_g alone) |

`.pt`/`.bin` are read with `torch.load(weights_only=True)`: plain tensors and dicts only, never code, so
an old pickle holding a `ParameterDict` (the original textual-inversion repository's) is refused with a
message, not run. A1111's PNG/WebP embeddings (vectors hidden in an image) are not read.

In a prompt read with A1111 syntax, a word equal to a loaded embedding's name (matched by its tokens, as
A1111 does) becomes the embedding's n vectors at the transformer's input (`text.CachedTextEncoder`); an
unknown word stays text; the name of a damaged file or of one whose width does not fit the model is
refused with one line naming the file, so nothing is generated from a prompt that silently lost a word.
An SDXL model's library is keyed by part (`width` {"clip_l": 768, "clip_g": 1280}): each encoder reads its own
vectors; an SD 1/2 file there, or an SDXL file on an SD 1/2 model, is listed as skipped and refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldmkit.errors import LdmkitError

SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass
class Embedding:
    name: str
    path: Path
    vectors: torch.Tensor | None  # (n, d) float32; None for an SDXL file
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    sdxl: dict[str, torch.Tensor] | None = None  # {"clip_l": (n, 768), "clip_g": (n, 1280)}

    @property
    def shape(self) -> int:
        """The vector width (A1111's `shape`; for SDXL the two widths added, as A1111 reports it)."""
        if self.sdxl is not None:
            return sum(v.shape[-1] for v in self.sdxl.values())
        return self.vectors.shape[-1]

    @property
    def count(self) -> int:
        """Number of vectors (tokens the embedding takes in a prompt)."""
        return (next(iter(self.sdxl.values())) if self.sdxl is not None else self.vectors).shape[0]


def _vectors(path: Path, key: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (1, 2) or t.numel() == 0:
        what = f"a {t.dim()}-d {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise LdmkitError(f"embedding file {path}: '{key}' holds {what}, not vectors (n, d)")
    t = t.detach().float().reshape(-1, t.shape[-1])  # (n, d)
    if not torch.isfinite(t).all():
        raise LdmkitError(f"embedding file {path}: '{key}' holds NaN or infinite values (damaged training run)")
    return t


def load_embedding(path: str | Path) -> Embedding:
    """One textual-inversion file in any layout above → `Embedding`; a file that cannot be read or holds
    something else: `LdmkitError` naming the file and what is wrong."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise LdmkitError(f"embedding file {path}: expected a .pt, .bin or .safetensors file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a torch/safetensors error of any kind means the file cannot be used
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise LdmkitError(f"embedding file {path} cannot be read ({type(e).__name__}: {reason}); "
                          "is it damaged or not a textual-inversion file?") from None
    if not isinstance(data, dict):
        raise LdmkitError(f"embedding file {path} holds a {type(data).__name__}, not a textual-inversion dict")
    meta = {}
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            n = len(params) if isinstance(params, dict) else type(params).__name__
            raise LdmkitError(f"embedding file {path}: string_to_param must hold one term, found {n}")
        (key, t), = params.items()
        vectors = _vectors(path, f"string_to_param/{key}", t)
        step = data.get("step")
        meta = dict(step=int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None,
                    sd_checkpoint=data.get("sd_checkpoint") if isinstance(data.get("sd_checkpoint"), str) else None,
                    sd_checkpoint_name=data.get("sd_checkpoint_name")
                    if isinstance(data.get("sd_checkpoint_name"), str) else None)
        return Embedding(path.stem, path, vectors, **meta)
    if "clip_l" in data and "clip_g" in data:
        sdxl = {k: _vectors(path, k, data[k]) for k in ("clip_l", "clip_g")}
        if sdxl["clip_l"].shape[0] != sdxl["clip_g"].shape[0]:
            raise LdmkitError(f"embedding file {path}: clip_l and clip_g hold different numbers of vectors")
        return Embedding(path.stem, path, None, sdxl=sdxl)
    if "emb_params" in data:
        return Embedding(path.stem, path, _vectors(path, "emb_params", data["emb_params"]))
    if len(data) == 1:  # diffusers: {placeholder token: (d,) or (n, d)}
        (key, t), = data.items()
        return Embedding(path.stem, path, _vectors(path, str(key), t))
    keys = ", ".join(sorted(map(str, data))[:6])
    raise LdmkitError(f"embedding file {path} holds none of string_to_param, emb_params, clip_l/clip_g or a single "
                      f"token's vectors (keys: {keys})")


class EmbeddingLibrary:
    """The embeddings of one folder (searched recursively, hidden files skipped), reloaded by `refresh()`.

    `width`: the text encoder's token-embedding width, set by `attach_embeddings` (SDXL: {part: width}); files of
    another width or of the other family are kept apart as skipped, as A1111 lists them. `version` changes at every refresh,
    so encoders drop prompts they cached with the old vectors."""

    def __init__(self, folder: str | Path, width: int | dict[str, int] | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LdmkitError(f"embeddings folder {self.folder} does not exist")
        self.width = width
        self.version = 0
        self._loaded: dict[str, Embedding] = {}
        self._skipped: dict[str, tuple[Embedding, str]] = {}
        self._damaged: dict[str, str] = {}  # name → the loader's one-line message
        self.refresh()

    def refresh(self) -> EmbeddingLibrary:
        """Read the folder again (new, changed and removed files)."""
        loaded, skipped, damaged = {}, {}, {}
        files = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(self.folder).parts))
        for p in files:
            if p.stem in loaded or p.stem in skipped or p.stem in damaged:
                continue  # two files of one name: the first in path order wins
            try:
                emb = load_embedding(p)
            except LdmkitError as e:
                damaged[p.stem] = str(e)
                continue
            why = self._mismatch(emb)
            if why:
                skipped[emb.name] = (emb, f"embedding '{emb.name}' ({p}) {why}")
            elif isinstance(self.width, int) and emb.shape != self.width:
                skipped[emb.name] = (emb, f"embedding '{emb.name}' ({p}) has {emb.shape}-wide vectors; this model's "
                                          f"text encoder takes {self.width} (it was trained for another model)")
            else:
                loaded[emb.name] = emb
        self._loaded, self._skipped, self._damaged = loaded, skipped, damaged
        self.version += 1
        return self

    def _mismatch(self, emb: Embedding) -> str | None:
        """Why an embedding does not fit this library's model family (SD 1/2: one vector set; SDXL: clip_l/clip_g)."""
        if emb.sdxl is not None and not isinstance(self.width, dict):
            return ("is an SDXL embedding (clip_l/clip_g); this model has one CLIP text encoder (SD 1/2): use it with an "
                    "SDXL model, or an embedding made for SD 1/2")
        if emb.sdxl is None and isinstance(self.width, dict):
            return (f"is an SD 1/2 embedding ({emb.shape}-wide vectors); this model is SDXL, whose embeddings hold "
                    "clip_l and clip_g vectors: use one made for SDXL")
        if emb.sdxl is not None:
            got = {k: emb.sdxl[k].shape[-1] for k in self.width}
            if got != self.width:
                return f"has {got} vectors; this model's text encoders take {self.width} (it was made for another model)"
        return None

    def names(self) -> list[str]:
        """Names usable in a prompt."""
        return sorted(self._loaded)

    def all_names(self) -> list[str]:
        """Every name a file gives, usable or not (a prompt naming an unusable one is refused)."""
        return sorted({*self._loaded, *self._skipped, *self._damaged})

    def get(self, name: str) -> Embedding:
        if name in self._loaded:
            return self._loaded[name]
        if name in self._skipped:
            raise LdmkitError(self._skipped[name][1])
        if name in self._damaged:
            raise LdmkitError(self._damaged[name])
        raise LdmkitError(f"no embedding '{name}' in {self.folder} (there are: {', '.join(self.names()) or 'none'})")

    def vectors_for(self, name: str, width: int, part: str | None = None) -> torch.Tensor:
        """The (n, width) vectors of `name` for an encoder of that width (the text encoder calls this); `part`:
        which of an SDXL embedding's sets ("clip_l", "clip_g") that encoder reads."""
        emb = self.get(name)
        vectors = emb.sdxl.get(part) if emb.sdxl is not None and part is not None else emb.vectors
        if vectors is None or vectors.shape[-1] != width:
            raise LdmkitError(f"embedding '{name}' ({emb.path}) has {emb.shape}-wide vectors; this model's text "
                              f"encoder takes {width}")
        return vectors

    def a1111_listing(self) -> dict:
        """The body of A1111's `GET /sdapi/v1/embeddings`: {"loaded": {name: info}, "skipped": {name: info}}."""

        def info(e: Embedding) -> dict:
            return {"step": e.step, "sd_checkpoint": e.sd_checkpoint, "sd_checkpoint_name": e.sd_checkpoint_name,
                    "shape": e.shape, "vectors": e.count}

        return {"loaded": {n: info(e) for n, e in sorted(self._loaded.items())},
                "skipped": {n: info(e) for n, (e, _) in sorted(self._skipped.items())}}

    def problems(self) -> dict[str, str]:
        """Files that are not usable, name → why (damaged ones, which the A1111 listing cannot show, included)."""
        return {**{n: why for n, (_, why) in self._skipped.items()}, **self._damaged}


def attach_embeddings(conditioner, embeddings: str | Path | EmbeddingLibrary) -> EmbeddingLibrary:
    """Make the conditioner's text encoder expand embedding names in prompts read with A1111 syntax
    (generation's; training captions are never expanded). Returns the library (for listing, refresh)."""
    encoder = getattr(conditioner, "text_encoder", None)
    if encoder is None:
        raise LdmkitError("this model has no text encoder; textual-inversion embeddings need one")
    width = encoder.embedding_width  # an encoder without a token-embedding table refuses in one line
    library = embeddings if isinstance(embeddings, EmbeddingLibrary) else EmbeddingLibrary(embeddings)
    if library.width != width:
        library.width = width
        library.refresh()
    encoder.embeddings = library
    return library


__all__ = ["Embedding", "EmbeddingLibrary", "attach_embeddings", "load_embedding", "SUFFIXES"]
