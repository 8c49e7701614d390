"""Text normalisation and chunking.

CSM is generated one text chunk at a time (each later chunk conditioned on the earlier ones), so the
chunker decides both how soon speech starts (a short first chunk) and where prosody may reset (only at
sentence, then clause boundaries). The invariant the tests hold it to: joining the chunks with single
spaces gives back the normalised text exactly, every chunk fits its bound, and no word is split unless the
word alone is longer than the bound.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque

# A sentence ends at terminal punctuation (plus closing quotes/brackets) before a space or the end, or
# right after CJK terminal punctuation, which is written without a following space.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s|$)|[。！？]+[\"'”’」』)\]]*")
# A clause ends at a comma, semicolon or colon before a space, at a spaced dash, or after CJK commas.
_CLAUSE_END = re.compile(r"[,;:][\"'”’)\]]*(?=\s)|\s[—–-]{1,2}(?=\s)|[，、；：]")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFC, control characters to spaces, every run of white space to one space, trimmed.

    Paragraph breaks become plain spaces here; they still end chunks because `split_sentences` runs on
    the raw lines first (see `chunk_text`).
    """
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch) == "Cc" and ch not in "\n" else ch for ch in text)
    return _SPACES.sub(" ", text).strip()


def _split_after(pattern: re.Pattern, text: str) -> list[str]:
    parts, start = [], 0
    for match in pattern.finditer(text):
        parts.append(text[start : match.end()])
        start = match.end()
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; a newline always ends one."""
    sentences: list[str] = []
    for line in text.splitlines():
        sentences.extend(_split_after(_SENTENCE_END, normalize(line)))
    return sentences


def _hard_split(word: str, limit: int) -> list[str]:
    """Split a word longer than `limit`, never separating a base character from its combining marks."""
    parts = []
    while len(word) > limit:
        cut = limit
        while cut > 1 and unicodedata.combining(word[cut]):
            cut -= 1
        parts.append(word[:cut])
        word = word[cut:]
    parts.append(word)
    return parts


def _split_finer(piece: str, limit: int) -> list[str]:
    """One level finer than `piece`: its clauses, else its words, else the word cut to `limit`."""
    clauses = _split_after(_CLAUSE_END, piece)
    if len(clauses) > 1:
        return clauses
    words = piece.split(" ")
    if len(words) > 1:
        return words
    return _hard_split(piece, limit)


def chunk_text(text: str, max_chars: int, first_max_chars: int | None = None) -> list[str]:
    """Split `text` into chunks of at most `max_chars` (the first at most `first_max_chars`).

    Whole sentences are packed greedily; a sentence that does not fit is broken at clause boundaries,
    then between words.
    """
    first_max_chars = first_max_chars or max_chars
    chunks: list[str] = []
    current = ""
    pieces = deque(split_sentences(text))
    while pieces:
        limit = first_max_chars if not chunks else max_chars
        piece = pieces.popleft()
        candidate = f"{current} {piece}" if current else piece
        if len(candidate) <= limit:
            current = candidate
        elif current:
            chunks.append(current)
            current = ""
            pieces.appendleft(piece)
        else:
            pieces.extendleft(reversed(_split_finer(piece, limit)))
    if current:
        chunks.append(current)
    return chunks
