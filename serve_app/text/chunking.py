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
from typing import Optional

# A sentence ends at terminal punctuation (plus closing quotes/brackets) before a space or the end, or
# right after CJK terminal punctuation, which is written without a following space.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s|$)|[。！？]+[\"'”’」』)\]]*")
# A dot after one of these (or after a single capital letter, an initial) does not end a sentence.
_ABBREVIATIONS = frozenset(
    ("mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "vs", "e.g", "i.e", "cf", "approx")
    + ("fig", "gen", "gov", "sen", "rep", "capt", "lt", "col", "sgt")
)
_LONGEST_ABBREVIATION = 8  # characters looked at before a dot (quotes included): longer words are no abbreviation
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


def why_unspeakable(text: str) -> Optional[str]:
    """Why `text` cannot be given to the model, or None when it can.

    JSON lets a body carry lone surrogates ("\\ud800", or their bytes written with surrogatepass), which are
    not Unicode text at all: the tokenizer rejects them. And text made only of separators and invisible
    characters (controls, format characters such as zero-width spaces, private-use or unassigned code
    points) holds nothing to speak."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"Input is not valid Unicode text: it holds a lone surrogate (U+{ord(text[exc.start]):04X}) at "
            f"character {exc.start}."
        )
    if not any(unicodedata.category(ch)[0] in "LNPS" for ch in text):
        return "Input has nothing to speak: give some text (letters, digits or punctuation)."
    return None


Span = tuple[int, int]  # [start, end) in the normalised text


def _abbreviation_before(text: str, match: re.Match) -> bool:
    """Whether a sentence end's dot belongs to an abbreviation ("Dr.", "e.g.") or an initial ("J.")."""
    if text[match.start()] != "." or match.end() - match.start() != 1:
        return False
    # The word before the dot, looked at through a short window (an abbreviation is short): constant work per
    # dot, so text of nothing but dots costs linear time.
    head = text[max(0, match.start() - _LONGEST_ABBREVIATION) : match.start()].split()
    word = head[-1].lstrip("\"'“‘(«[") if head else ""
    return word.casefold() in _ABBREVIATIONS or (len(word) == 1 and word.isupper())


def _sentence_ends(text: str, start: int, end: int) -> list[int]:
    """Where sentences end in `text[start:end]` (after the punctuation and its closing quotes)."""
    return [m.end() for m in _SENTENCE_END.finditer(text, start, end) if not _abbreviation_before(text, m)]


def _split_after(pattern: re.Pattern, text: str, start: int, end: int) -> list[Span]:
    """`text[start:end]` cut after each match of `pattern`, as spans with the spaces at their ends left out;
    the sentence pattern's matches only where a sentence ends (not after an abbreviation)."""
    spans, begin = [], start
    if pattern is _SENTENCE_END:
        cuts = _sentence_ends(text, start, end)
    else:
        cuts = [m.end() for m in pattern.finditer(text, start, end)]
    for cut in cuts:
        spans.append((begin, cut))
        begin = cut
    spans.append((begin, end))
    stripped = []
    for a, b in spans:
        while a < b and text[a] == " ":
            a += 1
        while b > a and text[b - 1] == " ":
            b -= 1
        if a < b:
            stripped.append((a, b))
    return stripped


def _sentences(text: str) -> tuple[str, list[Span]]:
    """The normalised text and its sentences' spans; a newline always ends a sentence."""
    normal, spans = "", []
    for line in text.splitlines():
        line = normalize(line)
        if not line:
            continue
        offset = len(normal) + 1 if normal else 0
        normal = f"{normal} {line}" if normal else line
        spans += [(offset + a, offset + b) for a, b in _split_after(_SENTENCE_END, line, 0, len(line))]
    return normal, spans


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; a newline always ends one."""
    normal, spans = _sentences(text)
    return [normal[a:b] for a, b in spans]


class SentenceStream:
    """Sentences out of text that arrives in pieces (an LLM's reply, streamed), by the chunker's own rules.

    A sentence is complete once something follows its end in the text so far: a bare "3." may yet become
    "3.5", and a quote may yet close after the dot. A newline ends one at once, as in `split_sentences`. A
    run-on longer than `max_chars` without an end is let go at its last space, so a stream without
    punctuation still speaks. `finish` gives what is left."""

    def __init__(self, max_chars: int = 1000):
        self.max_chars = max_chars
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        buffer = self._buffer
        cut = buffer.rfind("\n") + 1
        ends = [end for end in _sentence_ends(buffer, 0, len(buffer)) if end < len(buffer)]
        cut = max([cut, *ends])
        if not cut and len(buffer) > self.max_chars:
            cut = buffer.rfind(" ", 0, self.max_chars) + 1 or self.max_chars
        self._buffer = buffer[cut:]
        return split_sentences(buffer[:cut])

    def release(self, min_chars: int) -> str:
        """What is buffered, up to its last space, once it holds `min_chars` or more (ElevenLabs'
        `chunk_length_schedule`: speech may start before a sentence ends); "" until then."""
        cut = self._buffer.rfind(" ") + 1
        if len(self._buffer) < min_chars or not normalize(self._buffer[:cut]):
            return ""
        piece, self._buffer = normalize(self._buffer[:cut]), self._buffer[cut:]
        return piece

    def finish(self) -> list[str]:
        rest, self._buffer = self._buffer, ""
        return split_sentences(rest)


def _cut(word: str, limit: int) -> int:
    """Where to cut a word longer than `limit`: at most `limit` characters, never separating a base
    character from its combining marks."""
    cut = limit
    while cut > 1 and unicodedata.combining(word[cut]):
        cut -= 1
    return cut


def _split_finer(text: str, start: int, end: int) -> list[Span] | None:
    """One level finer than the span: its clauses, else its words; None for a single word."""
    clauses = _split_after(_CLAUSE_END, text, start, end)
    if len(clauses) > 1:
        return clauses
    words = _split_after(_SPACES, text, start, end)
    return words if len(words) > 1 else None


def chunk_text(text: str, max_chars: int, first_max_chars: int | None = None) -> list[str]:
    """Split `text` into chunks of at most `max_chars` (the first at most `first_max_chars`).

    Whole sentences are packed greedily; a sentence that does not fit is broken at clause boundaries,
    then between words. Chunks are always exact stretches of the normalised text, so whatever separated
    two pieces there (a space, or nothing after CJK punctuation) separates them in a chunk too.
    """
    first_max_chars = first_max_chars or max_chars
    normal, spans = _sentences(text)
    chunks: list[str] = []
    current: Span | None = None
    pieces = deque(spans)
    while pieces:
        limit = first_max_chars if not chunks else max_chars
        a, b = pieces.popleft()
        begin = current[0] if current else a
        if b - begin <= limit:
            current = (begin, b)
        elif current:
            chunks.append(normal[current[0] : current[1]])
            current = None
            pieces.appendleft((a, b))
        else:
            finer = _split_finer(normal, a, b)
            if finer is None:
                # One word longer than the limit: its head becomes a chunk, its rest goes on as a piece (no
                # space between them is invented, and the rest may share a chunk with the next words).
                cut = a + _cut(normal[a:b], limit)
                chunks.append(normal[a:cut])
                pieces.appendleft((cut, b))
            else:
                pieces.extendleft(reversed(finer))
    if current:
        chunks.append(normal[current[0] : current[1]])
    return chunks


_CLOSERS = "\"'”’»」』)]"
_TERMINAL = ".!?…。！？"
_TRAILING_CLAUSE = ",;:—–-，、；："


def with_terminal_punctuation(chunk: str) -> str:
    """The chunk as CSM gets it: ending with terminal punctuation (before any closing quotes or brackets),
    a known mitigation for CSM clipping a chunk's last word. A trailing comma, colon, semicolon or dash
    becomes a full stop; CJK text gets "。". Chunks that already end a sentence are unchanged."""
    body = chunk.rstrip(_CLOSERS)
    closers = chunk[len(body) :]
    if not body or body[-1] in _TERMINAL:
        return chunk
    core = body.rstrip(_TRAILING_CLAUSE + " ")
    if not core or not any(ch.isalnum() for ch in core):
        return chunk  # nothing a full stop could end (a chunk of symbols)
    return core + ("。" if _is_cjk(core[-1]) else ".") + closers


def _is_cjk(ch: str) -> bool:
    return unicodedata.name(ch, "").startswith(("CJK", "HIRAGANA", "KATAKANA"))  # Korean writes "."
