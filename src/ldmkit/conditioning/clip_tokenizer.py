"""CLIP's tokenizer read with the `tokenizers` library alone, for a text encoder whose transformer is replaced.

`transformers.CLIPTokenizer` is itself a `tokenizers` pipeline, but importing transformers builds its lazy
import table of every model (about a second on this project's 2-core CPU, measured with `python -X importtime`),
which a warm `ldmkit sample --backend openvino` paid only to split the prompt into ids: its CLIP transformer
runs in OpenVINO. `FastCLIPTokenizer` builds the same pipeline from the same folder (tokenizer.json, else
vocab.json + merges.txt, with tokenizer_config.json / special_tokens_map.json for the special tokens and the
window) and answers the two calls `CLIPTextEncoder` makes: the prompt's pieces without special tokens, and
the 77-token window (start token, up to 75 pieces, end token, padding). Tests hold it to transformers' ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldmkit.errors import LdmkitError

# CLIP's pre-tokenisation (Radford et al. 2021, the released `simple_tokenizer`): the special tokens whole, English
# contractions, runs of letters, single digits, runs of other non-space characters; then GPT-2's byte-level map
_SPLIT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
    return value.get("content") if isinstance(value, dict) else value


class FastCLIPTokenizer:
    """The subset of `transformers.CLIPTokenizer` a `CLIPTextEncoder` uses, from a tokenizer folder."""

    def __init__(self, folder: str | Path):
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

        folder = Path(folder)
        conf: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
            if (folder / name).is_file():
                conf |= json.loads((folder / name).read_text(encoding="utf-8"))
        bos = _token(conf.get("bos_token")) or "<|startoftext|>"
        eos = _token(conf.get("eos_token")) or "<|endoftext|>"
        unk = _token(conf.get("unk_token")) or eos
        pad = _token(conf.get("pad_token"))
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=unk,
                                                 continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False))
            tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                   normalizers.Lowercase()])
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False)])
            tok.add_special_tokens([t for t in dict.fromkeys((bos, eos, unk, pad)) if t and tok.token_to_id(t) is not None])
        else:
            raise LdmkitError(f"{folder} has neither tokenizer.json nor vocab.json + merges.txt; copy the model's "
                              "tokenizer folder there")
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.model_max_length = int(conf.get("model_max_length", 77))
        if self.model_max_length > 10_000:  # transformers' "no limit" sentinel: CLIP's window is 77
            self.model_max_length = 77
        ids = {name: tok.token_to_id(t) if t else None for name, t in (("bos", bos), ("eos", eos), ("unk", unk), ("pad", pad))}
        self.bos_token_id, self.eos_token_id = ids["bos"], ids["eos"]
        self.unk_token_id, self.pad_token_id = ids["unk"], ids["pad"]
        if self.bos_token_id is None or self.eos_token_id is None:
            raise LdmkitError(f"the tokenizer in {folder} has no {bos} / {eos} token; is it a CLIP tokenizer?")

    def convert_tokens_to_ids(self, token: str) -> int:
        found = self._tok.token_to_id(token)
        return self.unk_token_id if found is None else found

    def pieces(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, no special tokens, no truncation."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def window(self, texts: list[str]) -> torch.Tensor:
        """(B, model_max_length) ids: the start token, the first model_max_length - 2 pieces, the end token,
        then the pad token (the end token where the folder names none), as CLIP was trained on."""
        n = self.model_max_length
        pad = self.pad_token_id if self.pad_token_id is not None else self.eos_token_id
        rows = [[self.bos_token_id, *p[: n - 2], self.eos_token_id] for p in self.pieces(texts)]
        return torch.tensor([r + [pad] * (n - len(r)) for r in rows], dtype=torch.long)

    def __call__(self, texts: list[str], add_special_tokens: bool = True, padding: bool | str = False,
                 max_length: int | None = None, truncation: bool = False, return_tensors: str | None = None,
                 verbose: bool = True) -> _Encoding:
        """transformers' call for the two forms `CLIPTextEncoder` makes; any other is refused."""
        if not add_special_tokens and not padding and not truncation and return_tensors is None:
            ids = self.pieces(texts)
        elif (padding == "max_length" and truncation and return_tensors == "pt"
              and max_length in (None, self.model_max_length)):
            ids = self.window(texts)
        else:
            raise LdmkitError("FastCLIPTokenizer answers the pieces and the padded window only")
        return _Encoding(input_ids=ids)

    def save_pretrained(self, *_args, **_kwargs):
        raise LdmkitError("this text encoder was loaded without its weights, for a converted model to replace it; "
                          "load the model again without skip= to save it")


class _Encoding(dict):
    """`tokenizer(...)["input_ids"]` and `tokenizer(...).input_ids`, as transformers' BatchEncoding allows."""

    @property
    def input_ids(self):
        return self["input_ids"]
