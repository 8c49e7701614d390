"""Text ready to speak: markdown and emoji out, every word of the prose kept, in order.

Clients send what chat models write (Open WebUI, OpenClaw replies): markdown with emphasis, headings,
lists, links, code and tables, and emoji. CSM reads every character it is given, so "**Note**" comes out
with the asterisks spoken or as odd noises. This runs before chunking (STRIP_MARKDOWN, on by default); the
input-length limit applies to the text as sent.

What it does, line by line: fenced code blocks are dropped (code is not speech; inline code keeps its text),
headings, block quotes, bullet markers, task boxes, rules and table borders lose their markup (table cells
are read with commas between them), links and images keep their text, reference definitions and HTML tags
go, emphasis and strike-through keep their words. Then emoji and other pictographic symbols (with their
joiners, variation selectors and skin tones) are dropped. Ordered-list numbers stay: "1. Buy milk" reads well
aloud. Prose without markup comes out with the same words in the same order (tests/unit/test_markdown.py).

Linear time in the input's length, whatever it holds: the text is hostile until checked, and MAX_INPUT_LENGTH
may be 100,000. Python's regular expressions backtrack, so every pattern here either cannot backtrack far
(each try stops at the next character that would start another try) or is a scanner: delimited spans
(emphasis, strike-through, inline code) find their closer in precomputed next-closer tables instead of by
searching, and headings and table borders are parsed by hand. tests/unit/test_markdown.py times adversarial
inputs of 100,000 characters against a linear bound.
"""

from __future__ import annotations

import re
import unicodedata

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING_START = re.compile(r"^\s{0,3}#{1,6}(?:\s+|$)")
_SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_QUOTE = re.compile(r"^\s{0,3}(?:>\s?)+")
_BULLET = re.compile(r"^(\s*)[-*+•‣◦▪]\s+(?:\[[ xX]\]\s+)?")
_TASK_AFTER_NUMBER = re.compile(r"^(\s*\d{1,9}[.)]\s+)\[[ xX]\]\s+")
_RULE = re.compile(r"^\s{0,3}([-*_])(?:\s*\1){2,}\s*$")
_BORDER_CELL = re.compile(r"\s*:?-{3,}:?\s*")
_REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+.*$")
# Links and images: no "[" inside their text or address, so a try that fails stops at the next "[".
_IMAGE = re.compile(r"!\[([^\[\]]*)\]\([^)\[]*\)")
_LINK = re.compile(r"\[([^\[\]]+)\]\((?:[^()\[]|\([^)\[]*\))*\)")
_REFERENCE_LINK = re.compile(r"\[([^\[\]]+)\]\[[^\[\]]*\]")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^<>\s]+)>")
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_WORD = re.compile(r"\w")

# Characters that are emoji machinery rather than text: zero-width joiner, variation selectors, the keycap
# mark, skin-tone modifiers and tag characters (flag sequences).
_EMOJI_PARTS = {0x200D, 0xFE0E, 0xFE0F, 0x20E3}
_EMOJI_RANGES = ((0x1F3FB, 0x1F3FF), (0xE0020, 0xE007F), (0x2190, 0x21FF), (0x2B00, 0x2BFF))


def strip_markdown(text: str) -> str:
    """`text` without markdown, emoji and pictographic symbols; lines are kept (they end sentences)."""
    lines, fence = [], None
    for line in text.splitlines():
        opened = _FENCE.match(line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        lines.append(_line(line))
    return _symbols_out("\n".join(lines))


def _line(line: str) -> str:
    if _RULE.match(line) or _is_table_border(line) or _REFERENCE_DEFINITION.match(line):
        return ""
    if _SETEXT_UNDERLINE.match(line) and line.strip().startswith("="):
        return ""
    line = _QUOTE.sub("", line)
    line = _heading_text(line)
    line = _BULLET.sub(r"\1", line)
    line = _TASK_AFTER_NUMBER.sub(r"\1", line)
    if line.count("|") >= 2 and line.strip().startswith("|"):  # a table row: its cells, read as a list
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        line = ", ".join(c for c in cells if c)
    line = _code_spans(line)
    line = _IMAGE.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _REFERENCE_LINK.sub(r"\1", line)
    line = _AUTOLINK.sub(r"\1", line)
    line = _HTML_TAG.sub(" ", line)
    # Emphasis needs a non-space just inside each delimiter (as in CommonMark), so "5 * 3 * 2" stays; "_" only
    # at word boundaries, so snake_case_names stay. Strong twice: "**__both__**".
    for delimiters, at_word_edge in (
        (("**", "__"), False),
        (("**", "__"), False),
        (("*",), False),
        (("_",), True),
        (("~~",), False),
    ):
        line = _unwrap(line, delimiters, at_word_edge)
    return line


def _heading_text(line: str) -> str:
    """An ATX heading's text without its markers ("## Title ##" -> "Title"); other lines unchanged."""
    start = _HEADING_START.match(line)
    if start is None:
        return line
    text = line[start.end() :]
    stripped = text.rstrip()
    end = len(stripped)
    while end and stripped[end - 1] == "#":
        end -= 1
    if end < len(stripped) and end and stripped[end - 1].isspace():  # a closing run of #s after a space
        return stripped[:end].rstrip()
    return text


def _is_table_border(line: str) -> bool:
    """`|---|:---:|`, with or without the outer pipes."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") else body
    return all(_BORDER_CELL.fullmatch(cell) for cell in body.split("|"))


def _code_spans(line: str) -> str:
    """Inline code keeps its text: a run of n backticks opens, the next run of exactly n closes (CommonMark);
    a run with no closer is text. Linear: each run length's next run is found by walking forward once."""
    runs = [(m.start(), m.end() - m.start()) for m in re.finditer(r"`+", line)]
    later: dict[int, list[int]] = {}  # run length -> indices into `runs`, in order
    for index, (_, length) in enumerate(runs):
        later.setdefault(length, []).append(index)
    cursor = dict.fromkeys(later, 0)
    out, pos, index = [], 0, 0
    while index < len(runs):
        start, length = runs[index]
        same = later[length]
        while cursor[length] < len(same) and same[cursor[length]] <= index:
            cursor[length] += 1
        if cursor[length] == len(same):  # no closer of this length: the run is text
            index += 1
            continue
        closer = same[cursor[length]]
        out += [line[pos:start], line[start + length : runs[closer][0]].strip()]
        pos = runs[closer][0] + length
        index = closer + 1
    return "".join(out) + line[pos:]


def _unwrap(line: str, delimiters: tuple[str, ...], at_word_edge: bool) -> str:
    r"""Emphasis-like spans keep their text: what re.sub(r"D(?=\S)(.+?)(?<=\S)D") would give for each
    delimiter D (with `at_word_edge`, also (?<![\w_]) before the opener and (?![\w_]) after the closer),
    in linear time: the nearest valid closer after every position is tabulated right to left first."""
    n = len(line)
    if not any(d in line for d in delimiters):
        return line
    word = [bool(_WORD.match(ch)) for ch in line]  # \w includes "_"
    nearest: dict[str, list[int]] = {}
    for d in delimiters:
        table, following = [n] * (n + 1), n
        for j in range(n - 1, 0, -1):
            if (
                line.startswith(d, j)
                and not line[j - 1].isspace()
                and not (at_word_edge and j + len(d) < n and word[j + len(d)])
            ):
                following = j
            table[j] = following
        nearest[d] = table
    out, pos, i = [], 0, 0
    while i < n:
        for d in delimiters:
            inner = i + len(d)
            if (
                line.startswith(d, i)
                and inner < n
                and not line[inner].isspace()
                and not (at_word_edge and i and word[i - 1])
            ):
                closer = nearest[d][inner + 1] if inner + 1 <= n else n
                if closer < n:
                    out += [line[pos:i], line[inner:closer]]
                    pos = i = closer + len(d)
                    break
        else:
            i += 1
    return "".join(out) + line[pos:]


def _symbols_out(text: str) -> str:
    kept = []
    for ch in text:
        code = ord(ch)
        if code in _EMOJI_PARTS or any(a <= code <= b for a, b in _EMOJI_RANGES):
            continue
        category = unicodedata.category(ch)
        if category in ("So", "Co") or (category == "Sk" and code > 0x7F):
            # Pictographs, dingbats, private-use glyphs; modifier symbols beyond ASCII's ^ and `.
            kept.append(" ")
            continue
        kept.append(ch)
    return re.sub(r"[ \t]{2,}", " ", "".join(kept))
