"""`FastCLIPTokenizer` (the `tokenizers`-only CLIP tokenizer of a weightless text encoder) against
transformers' `CLIPTokenizer` on the same folders: the same ids for every prompt, both folder layouts."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from ldmkit.conditioning.clip_tokenizer import FastCLIPTokenizer  # noqa: E402
from ldmkit.errors import LdmkitError  # noqa: E402

PROMPTS = [
    "a cat", "A  CAT\tsat on\nthe mat", "the cat's hat, (masterpiece:1.2) [cat|hat] <lora:foo:0.5>",
    "café naïve ☃ 日本 émoji 🐈", "", "<|endoftext|> in the middle <|startoftext|>", "don't you'll 123 4.5 they've",
    "   leading and trailing   ", " ".join(["the cat sat"] * 12),  # longer than the 16-token window
]


def _vocab_folder(path, pad: str | None):
    """vocab.json + merges.txt (with its #version line) over the 256 byte-level characters, a few merges, CLIP's
    special tokens, and a window of 16; `pad`: the pad token (SD 1 pads with the end token, SD 2 with "!")."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    merges = [("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"), ("h", "a"), ("ha", "t</w>"), ("s", "a"),
              ("sa", "t</w>"), ("a", "t</w>")]
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    conf = {"model_max_length": 16, "bos_token": "<|startoftext|>", "unk_token": "<|endoftext|>",
            "eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}, "tokenizer_class": "CLIPTokenizer"}
    if pad is not None:
        conf["pad_token"] = pad
    (path / "tokenizer_config.json").write_text(json.dumps(conf), encoding="utf-8")
    return path


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
@pytest.mark.parametrize("layout", ["vocab+merges", "tokenizer.json"])
def test_the_ids_are_transformers_ids(tmp_path, pad, layout):
    folder = _vocab_folder(tmp_path / "tok", pad)
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    if layout == "tokenizer.json":
        ref.save_pretrained(str(tmp_path / "saved"))
        folder = tmp_path / "saved"
        assert (folder / "tokenizer.json").is_file()
    fast = FastCLIPTokenizer(folder)
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id, fast.unk_token_id, fast.model_max_length) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.unk_token_id, ref.model_max_length)
    assert fast.convert_tokens_to_ids("cat</w>") == ref.convert_tokens_to_ids("cat</w>") != ref.unk_token_id
    assert fast.convert_tokens_to_ids(",</w>") == ref.convert_tokens_to_ids(",</w>")
    pieces = ref(PROMPTS, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    assert fast(PROMPTS, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] == pieces
    assert any(len(p) > 16 for p in pieces) and [fast.convert_tokens_to_ids("cat</w>")] == pieces[0][1:]
    window = ref(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(fast(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids,
                       window)


def test_a_folder_without_tokenizer_files_or_another_call_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LdmkitError, match="neither tokenizer.json nor vocab.json"):
        FastCLIPTokenizer(tmp_path / "empty")
    fast = FastCLIPTokenizer(_vocab_folder(tmp_path / "tok", None))
    assert fast.pad_token_id is None and fast.window(["a"])[0, 3:].eq(fast.eos_token_id).all()
    with pytest.raises(LdmkitError, match="pieces and the padded window only"):
        fast(["a"], padding="longest")
