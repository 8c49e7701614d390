"""The docs as data for the tests: their pages, their code blocks and the commands in them."""

from __future__ import annotations

import re
from pathlib import Path

from serve_app.core.constants import PROJECT_ROOT

DOCS = PROJECT_ROOT / "docs" / "pages"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def pages() -> list[Path]:
    """The README and every page of the site."""
    return [PROJECT_ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def code_blocks(page: Path, language: str = "bash") -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def commands(block: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


def first_request() -> str:
    """The first curl of the getting-started page: what a newcomer runs against a fresh server."""
    for block in code_blocks(DOCS / "getting-started.md"):
        for command in commands(block):
            if command.startswith("curl") and "/v1/audio/speech" in command:
                return command
    raise AssertionError("docs/getting-started.md has no curl of /v1/audio/speech")
