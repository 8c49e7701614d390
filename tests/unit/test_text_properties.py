"""Property tests for the chunker: whatever the text, nothing is lost, duplicated or reordered, every chunk
fits its bound, and a word is only cut when it alone is longer than the bound."""

from __future__ import annotations

import unicodedata

from hypothesis import example, given, settings
from hypothesis import strategies as st

from serve_app.text.chunking import chunk_text, normalize

FRAGMENTS = [
    "Hello",
    "world.",
    "Dr.",
    "3.14",
    "1,000,000",
    "e.g.",
    "—",
    "-",
    "...",
    "…",
    "?!",
    ";",
    ":",
    ",",
    "**bold**",
    "# Heading",
    "- item",
    "`code()`",
    "[link](https://example.com/a?b=c&d=e)",
    "https://x.io/path.",
    "😀",
    "👩‍👩‍👧",
    "🇯🇵",
    "你好。",
    "再见！",
    "東京、大阪",
    "مرحبا بالعالم.",
    "שלום",
    "e\u0301",
    "a\u0308\u0301",
    "\u200f",
    "\u200b",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "\x00",
    "\x07",
    "\x1b[31m",
    "\u2028",
    "\u00a0",
]

texts = st.one_of(
    st.text(max_size=600),  # anything unicode, controls and surrogate-free
    st.lists(st.sampled_from(FRAGMENTS), max_size=120).map(" ".join),
    st.lists(st.sampled_from(FRAGMENTS), max_size=120).map("".join),  # no spaces at all
    st.lists(st.text(alphabet=st.characters(categories=("L", "M", "N")), min_size=1, max_size=40), max_size=60).map(
        " ".join
    ),  # no punctuation at all
)
limits = st.integers(min_value=20, max_value=300)


# Where CJK text ends a sentence or clause without a space, the chunker may cut with no space to drop.
CJK_BREAKS = set("。！？，、；：」』)]\"'”’")


def check_chunks(text: str, max_chars: int, first_max: int) -> None:
    chunks = chunk_text(text, max_chars, first_max)
    normal = normalize(text)
    if not normal:
        assert chunks == []
        return
    bound = min(max_chars, first_max)
    position = 0
    for index, chunk in enumerate(chunks):
        # Bounds: nothing empty, nothing padded, nothing over its limit.
        limit = first_max if index == 0 else max_chars
        assert 0 < len(chunk) <= limit, (index, chunk, limit)
        assert chunk == chunk.strip()
        if position > 0 and normal[position - 1] != " ":  # a cut inside a word
            assert not unicodedata.combining(chunk[0]), "a combining mark was cut off its base character"
        # Coverage: each chunk is the next stretch of the text, so nothing is lost, duplicated or reordered.
        assert normal[position : position + len(chunk)] == chunk, (position, chunk)
        position += len(chunk)
        if position < len(normal):
            if normal[position] == " ":
                position += 1  # the cut fell on a space
            else:  # no space here: after CJK punctuation, or inside a word longer than the bound
                start = normal.rfind(" ", 0, position) + 1
                end = normal.find(" ", position)
                word = normal[start : end if end >= 0 else len(normal)]
                assert chunk[-1] in CJK_BREAKS or len(word) > bound, ("word cut", chunk, word)
    assert position == len(normal), "text left over"


@settings(max_examples=400, deadline=None)
@given(text=texts, max_chars=limits, first_max=limits)
@example(text="x" * 4000, max_chars=220, first_max=100)  # one 4,000-character word
@example(text="Hello world " * 500, max_chars=220, first_max=100)  # no sentence end in 6,000 characters
@example(text="\x00\x01\x02 \x7f", max_chars=20, first_max=20)  # only control characters
def test_chunks_cover_the_text_in_order_within_bounds(text, max_chars, first_max):
    check_chunks(text, max_chars, first_max)


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=80))
def test_chunks_end_at_sentence_ends_when_sentences_fit(words):
    """A chunk boundary never falls inside a short sentence: every chunk but the last ends where the
    sentence splitter would end a sentence, or holds one sentence too long to fit."""
    from serve_app.text.chunking import split_sentences

    text = " ".join(words)
    sentences = split_sentences(text)
    chunks = chunk_text(text, 220, 100)
    if all(len(s) <= 100 for s in sentences):
        boundaries, position = set(), 0
        for sentence in sentences:
            position += len(sentence) + (1 if position else 0)
            boundaries.add(position)
        position = 0
        for chunk in chunks:
            position += len(chunk) + (1 if position else 0)
            assert position in boundaries, (chunk, sentences)
