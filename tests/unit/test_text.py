"""Text normalisation and chunking."""

from __future__ import annotations

import pytest

from serve_app.text.chunking import chunk_text, normalize, split_sentences


def check(text: str, max_chars: int, first: int | None = None) -> list[str]:
    chunks = chunk_text(text, max_chars, first)
    normal = normalize(text)
    if max(len(w) for w in normal.split(" ")) <= min(max_chars, first or max_chars):
        assert " ".join(chunks) == normal, "text lost, duplicated or reordered"
    else:  # a word longer than the bound is the one thing cut, so only the spaces differ
        assert "".join(chunks).replace(" ", "") == normal.replace(" ", "")
    limits = [first or max_chars] + [max_chars] * len(chunks)
    for chunk, limit in zip(chunks, limits):
        assert 0 < len(chunk) <= limit, (chunk, limit)
        assert chunk == chunk.strip()
    return chunks


def test_normalize_collapses_space_and_controls():
    assert normalize("  Hello\t\tworld\r\n\x00again\x07 ") == "Hello world again"
    assert normalize("e\u0301") == "\u00e9"  # NFC


def test_sentences_split_at_terminal_punctuation_and_newlines():
    assert split_sentences("One. Two! Three? Four…\nFive") == ["One.", "Two!", "Three?", "Four…", "Five"]
    assert split_sentences('He said "hi." Then left.') == ['He said "hi."', "Then left."]
    assert split_sentences("Pi is 3.14 today.") == ["Pi is 3.14 today."]
    assert split_sentences("你好。再见！") == ["你好。", "再见！"]


def test_short_text_is_one_chunk():
    assert check("Hello Burke, this is Max.", 220, 100) == ["Hello Burke, this is Max."]


def test_sentences_are_packed_up_to_the_limit():
    text = "First one here. Second one here. Third one here. Fourth one here."
    assert check(text, 40) == ["First one here. Second one here.", "Third one here. Fourth one here."]


def test_first_chunk_is_short_then_larger():
    text = "Okay. " + "This is a longer sentence that goes on. " * 6
    chunks = check(text, 120, 30)
    assert chunks[0] == "Okay."
    assert len(chunks[1]) > 30


def test_long_sentence_splits_at_clauses_then_words():
    text = "When the sun rises over the hills, the birds begin to sing, and the village slowly wakes up"
    chunks = check(text, 40)
    assert chunks[0] == "When the sun rises over the hills,"
    no_punct = "word " * 60
    chunks = check(no_punct, 50)
    assert all(not c.startswith("ord") for c in chunks)  # never mid-word
    assert all(set(c.split()) == {"word"} for c in chunks)


def test_word_longer_than_limit_is_cut_without_splitting_combining_marks():
    chunks = check("x" * 95, 40)
    assert [len(c) for c in chunks] == [40, 40, 15]
    combining = "q\u0307" * 30  # q with dot above has no precomposed form: 60 code points
    chunks = check(combining, 25)
    assert all(c[0] == "q" for c in chunks)


@pytest.mark.parametrize(
    "text", ["😀 " * 100, "مرحبا بالعالم. " * 20, "**bold** and _italic_ https://example.com/a?b=c 42.", "x"]
)
def test_odd_inputs_keep_the_invariants(text):
    check(text, 60, 30)
