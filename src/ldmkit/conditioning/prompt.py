"""Prompts as the AUTOMATIC1111 web UI reads them: emphasis, BREAK, and 75-token chunks.

Two pure steps, no model inside (the text encoders in `text.py` run them):

1. `parse_prompt(text)` → sections of (text, weight) pieces, one section per BREAK-separated part.
   The semantics are A1111's `modules/prompt_parser.py::parse_prompt_attention`:

   | written        | weight            |
   | -------------- | ----------------- |
   | `(word)`       | × 1.1             |
   | `((word))`     | × 1.1² = 1.21     |
   | `[word]`       | ÷ 1.1             |
   | `(word:1.3)`   | × 1.3 (any number `[+-]?[.0-9]+`, no spaces, as A1111) |
   | `\\(` `\\)` `\\[` `\\]` `\\\\` | the literal character; a lone `\\` is dropped (as A1111) |
   | `BREAK`        | (uppercase, a word of its own) the next text starts a new chunk |

   Nested brackets multiply; a `)` or `]` with nothing open is text (`smile :)` stays as written); a
   `:1.3)` with no `(` open is text. Pieces of equal weight that touch are merged into one, so their
   text is tokenized together (A1111 tokenizes each piece on its own).

   Differences from A1111, on purpose: an unclosed `(` or `[` is refused (`LdmkitError` naming the
   bracket and where it is) where A1111 silently closes it at the end of the prompt — a forgotten
   bracket otherwise up-weights everything after it without a word; `strict=False` gives A1111's
   behaviour. `BREAK` inside brackets still breaks (A1111 gives it the bracket's weight and then encodes
   the word "BREAK" as text with a negative weight). Prompt editing (`[a:b:0.5]`), alternation
   (`[a|b]`) and `AND` are not read: their characters stay text inside the brackets around them.

2. `chunk_prompt(sections, …)` → token chunks of `chunk_length` (75 for CLIP: its window of 77 less the
   start and end tokens), each with a weight per token and the positions where textual-inversion
   embeddings go; A1111's `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`. A chunk that fills up
   with a comma among its last `backtrack` tokens (A1111's "comma padding backtrack", default 20) moves
   the text after that comma to the next chunk, so a phrase is not cut in two; an embedding's vectors
   never straddle two chunks.

Library check (issue 28 asks for a maintained one where it exists): `compel` (and its fork `compel5`)
is the maintained prompt-weighting library on PyPI, but it implements InvokeAI's syntax, not A1111's:
weights are written `(words)1.3`, `word++`, `.blend()`/`.and()`; a bare `(word)` is a group, not × 1.1;
there is no `BREAK`; and a down-weighted piece is blended toward a masked prompt instead of A1111's
scale-then-restore-the-mean. Reading an A1111 prompt through it gives other weights, so it is not used.
No other PyPI package implements `parse_prompt_attention` (diffusers' "lpw_stable_diffusion" copies it,
but as a community pipeline file loaded from the hub, not a library). The parser is therefore written
here and checked by property tests and A1111's own documented examples (tests/test_prompt_syntax.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ldmkit.errors import LdmkitError

ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for ( ) and [ ]

# One lexical token of the syntax per match, tried in this order (the grammar of A1111's `re_attention`):
# an escape (a lone backslash included), an opening bracket, an explicit weight closing a round bracket,
# a closing bracket, a run of plain text, a lone colon.
_LEX = re.compile(
    r"""
      (?P<escape>\\[\\()\[\]]?)
    | (?P<open>[(\[])
    | :(?P<weight>[+-]?[.\d]+)\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Piece = tuple[str, float]  # (text, weight)


def parse_prompt(text: str, strict: bool = True) -> list[list[Piece]]:
    """A prompt → its BREAK-separated sections, each a list of (text, weight) pieces in order.

    `strict`: refuse an unclosed `(` or `[` (generation's rule); False closes it at the end (A1111)."""
    pieces: list[list] = []  # [text, weight] or None for a BREAK, in prompt order
    opened: list[tuple[str, int, int]] = []  # (bracket, index into pieces where it opened, character position)

    def scale(start: int, factor: float) -> None:
        # Every piece since the bracket opened takes the factor (nesting multiplies).
        for p in pieces[start:]:
            if p is not None:
                p[1] *= factor

    def close(kind: str) -> int | None:
        # The innermost open bracket of this kind (brackets of the other kind may cross it, as in A1111).
        for i in range(len(opened) - 1, -1, -1):
            if opened[i][0] == kind:
                return opened.pop(i)[1]
        return None

    for m in _LEX.finditer(text):
        tok = m.group(0)
        if m.group("escape") is not None:
            pieces.append([tok[1:], 1.0])
        elif m.group("open") is not None:
            opened.append((tok, len(pieces), m.start()))
        elif m.group("weight") is not None and any(o[0] == "(" for o in opened):
            try:
                w = float(m.group("weight"))
            except ValueError:
                raise LdmkitError(f'prompt weight "{tok[:-1]}" at character {m.start() + 1} is not a number; '
                                  'write it as (text:1.2)') from None
            scale(close("("), w)
        elif tok == ")" and any(o[0] == "(" for o in opened):
            scale(close("("), ROUND)
        elif tok == "]" and any(o[0] == "[" for o in opened):
            scale(close("["), SQUARE)
        else:  # plain text, or a closing bracket / weight with nothing open: text, split at each BREAK
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    pieces.append(None)
                pieces.append([part, 1.0])
    if opened and strict:
        kind, _, pos = opened[0]
        shut = ")" if kind == "(" else "]"
        snippet = text[max(0, pos - 20) : pos + 20].replace("\n", " ")
        raise LdmkitError(f'unbalanced "{kind}" at character {pos + 1} of the prompt ("…{snippet}…"): close it '
                          f'with "{shut}", or write "\\{kind}" for a literal bracket')
    # A1111: an unclosed bracket counts as closed at the end (round ones first, in A1111's order, so the
    # products of floats, and hence which pieces merge, are the same).
    for kind, factor in (("(", ROUND), ("[", SQUARE)):
        for k, start, _ in opened:
            if k == kind:
                scale(start, factor)
    sections: list[list[Piece]] = [[]]
    for p in pieces:
        if p is None:
            sections.append([])
        elif sections[-1] and sections[-1][-1][1] == p[1]:
            sections[-1][-1] = (sections[-1][-1][0] + p[0], p[1])  # merge runs of one weight
        else:
            sections[-1].append((p[0], p[1]))
    return [[p for p in s if p[0]] for s in sections]


@dataclass
class Chunk:
    """One window of the text encoder: `tokens` without the start/end tokens, a weight per token, and
    `fixes`: (offset into `tokens`, embedding name, vector count) where an embedding's vectors go."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, str, int]] = field(default_factory=list)


# (token ids of the prompt piece, position) → (embedding name, its vector count, tokens its name spans) or None
FindEmbedding = Callable[[Sequence[int], int], "tuple[str, int, int] | None"]


def chunk_prompt(
    sections: list[list[Piece]],
    tokenize: Callable[[list[str]], list[list[int]]],
    chunk_length: int,
    comma_id: int | None = None,
    find_embedding: FindEmbedding | None = None,
    placeholder: int = 0,
    backtrack: int = 20,
) -> list[Chunk]:
    """Parsed sections → chunks of at most `chunk_length` tokens (a new chunk at every BREAK).

    `tokenize(texts)` gives each piece's token ids without start/end tokens; `comma_id` enables the comma
    backtrack (`backtrack` tokens, 0: off); an embedding found by `find_embedding` takes `placeholder`
    ids in `tokens`, replaced by its vectors at the encoder's input."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def flush() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for s, section in enumerate(sections):
        if s:
            flush()  # BREAK
        for ids, (_, weight) in zip(tokenize([t for t, _ in section]), section):
            pos = 0
            while pos < len(ids):
                if comma_id is not None and ids[pos] == comma_id:
                    last_comma = len(chunk.tokens)
                elif (backtrack and len(chunk.tokens) == chunk_length and last_comma != -1
                      and len(chunk.tokens) - last_comma <= backtrack):
                    # The chunk is full and a comma is near its end: the words after it move on.
                    cut = last_comma + 1
                    moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:],
                                  [(o - cut, n, k) for o, n, k in chunk.fixes if o >= cut])
                    chunk.tokens, chunk.weights = chunk.tokens[:cut], chunk.weights[:cut]
                    chunk.fixes = [f for f in chunk.fixes if f[0] < cut]
                    flush()
                    chunk = moved
                if len(chunk.tokens) == chunk_length:
                    flush()
                found = find_embedding(ids, pos) if find_embedding is not None else None
                if found is None:
                    chunk.tokens.append(ids[pos])
                    chunk.weights.append(weight)
                    pos += 1
                    continue
                name, n_vectors, n_tokens = found
                if n_vectors > chunk_length:
                    raise LdmkitError(f"embedding '{name}' has {n_vectors} vectors, more than the text encoder's "
                                      f"window of {chunk_length} tokens")
                if len(chunk.tokens) + n_vectors > chunk_length:
                    flush()
                chunk.fixes.append((len(chunk.tokens), name, n_vectors))
                chunk.tokens += [placeholder] * n_vectors
                chunk.weights += [weight] * n_vectors
                pos += n_tokens
    if chunk.tokens or not chunks:
        flush()
    return chunks
