"""The package's layout map, generated from the tree: every package and module with the first line of its
docstring, then the campaign harnesses outside it (ops/bench/). `python -m serve_app.tools.layout` prints it;
`--write` puts it into docs/pages/development.md between its markers; tests/unit/test_layering.py fails when the
page's copy is not the tree's."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from serve_app.core.constants import PROJECT_ROOT

PAGE = PROJECT_ROOT / "docs" / "pages" / "development.md"
START, END = "<!-- layout:start (python -m serve_app.tools.layout --write) -->", "<!-- layout:end -->"
# The layers in the order they stack (core at the bottom); each one's role is its package docstring.
LAYERS = ("core", "voices", "text", "audio", "engine", "model", "api", "tools")


def summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    cut = first.find(". ")
    first = first[: cut + 1] if cut > 0 else first
    if len(first) <= 98:
        return first
    return first[:96].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if p.name != "__init__.py")


def _row(depth: int, name: str, text: str) -> str:
    """One line of the map: the summaries line up at column 24, at least two spaces after a long name."""
    indent = "  " * depth
    return f"{indent}{name.ljust(22 - len(indent))}  {text}"


def render(root: Path = PROJECT_ROOT) -> str:
    package = root / "serve_app"
    lines = ["serve_app/"]
    for path in modules(package):
        lines.append(_row(1, path.name, summary(path)))
    for layer in LAYERS:
        folder = package / layer
        lines.append(_row(1, layer + "/", summary(folder / "__init__.py")))
        for path in modules(folder):
            lines.append(_row(2, path.name, summary(path)))
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
            lines.append(_row(2, sub.name + "/", summary(sub / "__init__.py")))
            for path in modules(sub):
                lines.append(_row(3, path.name, summary(path)))
    harnesses = root / "ops" / "bench"
    lines += ["", "ops/bench/              " + summary(harnesses / "__init__.py")]
    lines += [_row(1, path.name, summary(path)) for path in modules(harnesses)]
    return "\n".join(line.rstrip() for line in lines)


def page_block(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip().removeprefix("```").removesuffix("```").strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/pages/development.md's layout map in place")
    args = parser.parse_args()
    tree = render()
    if not args.write:
        print(tree)
        return
    text = PAGE.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    PAGE.write_text(text[:start] + "\n```\n" + tree + "\n```\n" + text[end:])


if __name__ == "__main__":
    main()
