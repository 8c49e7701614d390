"""Text ready to speak: markdown and emoji out, every word of the prose kept, in order.

Clients send what chat models write (Open WebUI, OpenClaw replies): markdown with emphasis, headings,
lists, links, code and tables, and emoji. CSM reads every character it is given, so "**Note**" comes out
with the asterisks spoken or as odd noises. This runs before chunking (NORMALIZE_TEXT, on by default); the
input-length limit applies to the text as sent.

What it does, line by line: fenced code blocks are dropped (code is not speech; inline code keeps its text),
headings, block quotes, bullet markers, task boxes, rules and table borders lose their markup (table cells
are read with commas between them), links and images keep their text, reference definitions and HTML tags
go, emphasis and strike-through keep their words. Then emoji and other pictographic symbols (with their
joiners, variation selectors and skin tones) are dropped. Ordered-list numbers stay: "1. Buy milk" reads well
aloud. Prose without markup comes out with the same words in the same order (tests/test_speakable.py).
"""

from __future__ import annotations

import re
import unicodedata

_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^\s{0,3}#{1,6}(?:\s+|$)(.*?)(?:\s+#+\s*)?$")
_SETEXT_UNDERLINE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_QUOTE = re.compile(r"^\s{0,3}(?:>\s?)+")
_BULLET = re.compile(r"^(\s*)[-*+•‣◦▪]\s+(?:\[[ xX]\]\s+)?")
_TASK_AFTER_NUMBER = re.compile(r"^(\s*\d{1,9}[.)]\s+)\[[ xX]\]\s+")
_RULE = re.compile(r"^\s{0,3}([-*_])(?:\s*\1){2,}\s*$")
_TABLE_BORDER = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$")
_REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+.*$")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\((?:[^()]|\([^)]*\))*\)")
_REFERENCE_LINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# Emphasis needs a non-space just inside each delimiter (as in CommonMark), so "5 * 3 * 2" stays; "_" only
# at word boundaries, so snake_case_names stay.
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_EMPHASIS_STAR = re.compile(r"\*(?=\S)(.+?)(?<=\S)\*")
_EMPHASIS_UNDERSCORE = re.compile(r"(?<![\w_])_(?=\S)(.+?)(?<=\S)_(?![\w_])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")

# Characters that are emoji machinery rather than text: zero-width joiner, variation selectors, the keycap
# mark, skin-tone modifiers and tag characters (flag sequences).
_EMOJI_PARTS = {0x200D, 0xFE0E, 0xFE0F, 0x20E3}
_EMOJI_RANGES = ((0x1F3FB, 0x1F3FF), (0xE0020, 0xE007F), (0x2190, 0x21FF), (0x2B00, 0x2BFF))


def speakable(text: str) -> str:
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
    if _RULE.match(line) or _TABLE_BORDER.match(line) or _REFERENCE_DEFINITION.match(line):
        return ""
    if _SETEXT_UNDERLINE.match(line) and line.strip().startswith("="):
        return ""
    line = _QUOTE.sub("", line)
    heading = _HEADING.match(line)
    if heading:
        line = heading.group(1)
    line = _BULLET.sub(r"\1", line)
    line = _TASK_AFTER_NUMBER.sub(r"\1", line)
    if line.count("|") >= 2 and line.strip().startswith("|"):  # a table row: its cells, read as a list
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        line = ", ".join(c for c in cells if c)
    line = _INLINE_CODE.sub(lambda m: m.group(2).strip(), line)
    line = _IMAGE.sub(r"\1", line)
    line = _LINK.sub(r"\1", line)
    line = _REFERENCE_LINK.sub(r"\1", line)
    line = _AUTOLINK.sub(r"\1", line)
    line = _HTML_TAG.sub(" ", line)
    for pattern in (_STRONG, _STRONG, _EMPHASIS_STAR, _EMPHASIS_UNDERSCORE, _STRIKE):
        line = pattern.sub(lambda m: m.group(m.lastindex), line)
    return line


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
