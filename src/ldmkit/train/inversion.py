"""Textual inversion (`finetune.train: embedding`; Gal et al. 2022, "An Image is Worth One Word", eq. 2):

    v* = argmin_v  E_{z0, caption ∋ WORD, ε, t} ‖ε − ε_θ(z_t, t, c_θ(caption with WORD ↦ v))‖²

only the N vectors v (N, D) of a new word are trained; the U-Net ε_θ, the first stage and the text encoder c_θ stay
frozen. The vectors enter the encoder exactly where a loaded embedding's do at generation
(`CachedTextEncoder._encode_chunks` puts an embedding's vectors in place of its name's tokens at the transformer's
input), through a one-name library whose vectors are the training tensor, so training and generation read a prompt
the same way. They start as the initialiser word's token embeddings, spread over the N vectors as A1111 does
(`create_embedding`: vector i = init token ⌊i·k/N⌋ of k).

Saved as A1111's `.safetensors` layout (`{"emb_params": (N, D)}`, named WORD) and diffusers' `learned_embeds.safetensors`
(`{WORD: (N, D)}`, what its `textual_inversion.py` writes and `load_textual_inversion` reads); both read back with
`conditioning.embeddings.load_embedding`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import LdmkitError

DIFFUSERS_FILE = "learned_embeds.safetensors"
EMBEDDINGS_DIR = "embeddings"  # OUT/embeddings/WORD.safetensors: a folder `--embeddings-dir` reads with nothing else in it


class WordVectors(nn.Module):
    """The trained module: a new word's N vectors (N, D). Called, it returns them (so a DDP wrapper sees a forward)."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(vectors.detach().clone().float())  # (N, D)

    def forward(self) -> torch.Tensor:
        return self.vectors


class TrainingLibrary:
    """A one-name embedding library for the text encoder (what `CachedTextEncoder` reads of an `EmbeddingLibrary`:
    `all_names`, `vectors_for`, `version`) whose vectors are set before each use; a new `version` each time, so no
    prompt encoded with earlier vectors is reused."""

    def __init__(self, name: str, vectors: torch.Tensor):
        self.name, self.vectors, self.version = name, vectors, 0

    def use(self, vectors: torch.Tensor) -> None:
        self.vectors = vectors
        self.version += 1

    def names(self) -> list[str]:
        return [self.name]

    def all_names(self) -> list[str]:
        return [self.name]

    def vectors_for(self, name: str, width: int, part: str | None = None) -> torch.Tensor:
        return self.vectors  # (N, width): made for this encoder


def initial_vectors(encoder, init: str, n: int) -> torch.Tensor:
    """(n, D) start vectors: the token embeddings of `init` spread over n (A1111's `create_embedding`); refused
    when `init` gives no token."""
    emb = encoder.token_vectors(init)  # (k, D)
    if emb.shape[0] == 0:
        raise LdmkitError(f"finetune.embedding.init={init!r} gives no token to start the vectors from; name a word")
    k = emb.shape[0]
    return torch.stack([emb[i * k // n] for i in range(n)])  # (n, D)


def check_word(encoder, word: str, captions: list[str]) -> None:
    """The placeholder must be a word of its own (no spaces: a prompt names it as one), tokenize to something, and
    appear in the training captions; else one line saying what to change."""
    if not word or any(c.isspace() for c in word):
        raise LdmkitError(f"finetune.embedding.token={word!r}: give the placeholder word the captions use, one word "
                          "without spaces (e.g. --set finetune.embedding.token=sks)")
    if not encoder._piece_ids([word])[0]:
        raise LdmkitError(f"finetune.embedding.token={word!r} gives no token in this text encoder; choose another word")
    if not any(word in c for c in captions):
        raise LdmkitError(f"no training caption contains the placeholder word {word!r} (finetune.embedding.token); "
                          f"caption the images with it, e.g. 'a photo of {word}'")


def save_embedding_files(vectors: torch.Tensor, word: str, out: Path, model_name: str | None = None) -> dict:
    """Write OUT/embeddings/WORD.safetensors (A1111) and OUT/learned_embeds.safetensors (diffusers), atomically;
    returns their paths for the run's meta."""
    from safetensors.torch import save

    from ldmkit.imageio import atomic_write

    v = vectors.detach().float().cpu().contiguous()  # (N, D)
    a1111 = out / EMBEDDINGS_DIR / f"{word}.safetensors"
    a1111.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "ldmkit_embedding": "1", **({"sd_checkpoint_name": model_name} if model_name else {})}
    atomic_write(a1111, save({"emb_params": v}, metadata=meta))
    atomic_write(out / DIFFUSERS_FILE, save({word: v.clone()}, metadata={"format": "pt"}))
    return {"a1111": str(a1111.relative_to(out)), "diffusers": DIFFUSERS_FILE, "vectors": v.shape[0], "width": v.shape[1]}
