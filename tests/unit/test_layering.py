"""The package's layers, read from the imports themselves (every `import`, module-level or inside a
function, TYPE_CHECKING included): which layer may import which, no import cycle between modules, FastAPI
in api/ only, MLX in engine/ and tools/ only, nothing importing tools/, the campaign harnesses outside the
package (ops/bench/, which the package never imports), and docs/pages/development.md's layout map equal to the
tree's. (What a process loads at run time is tests/unit/test_launch.py's check.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from serve_app.core.constants import PROJECT_ROOT
from serve_app.tools import layout

PACKAGE = PROJECT_ROOT / "serve_app"
TOP = "top"  # app.py, launch.py, service.py: the Serve graph and operations, above every layer

# What each layer may import besides itself (arrows point at what is imported):
#   core <- voices, audio, engine;  voices <- text;  voices, engine <- model;  everything but engine <- api
ALLOWED = {
    "core": set(),
    "voices": {"core"},
    "audio": {"core"},
    "engine": {"core"},
    "text": {"core", "voices"},
    "model": {"core", "voices", "engine"},
    "api": {"core", "voices", "text", "audio", "model"},
    TOP: {"core", "voices", "text", "audio", "model", "api"},
    "tools": {"core", "voices", "text", "audio", "engine", "model", "api", TOP},
}
THIRD_PARTY = {  # packages only some layers may import
    "fastapi": {"api"},
    "starlette": {"api"},
    "mlx": {"engine", "tools"},
    "mlx_audio": {"engine", "tools"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else TOP


def imports_of(path: Path) -> set[str]:
    return imports_of_source(path.read_text(), path)


def imports_of_source(source: str, path: Path) -> set[str]:
    """Every module `source` (at `path`) imports: absolute names, relative imports resolved."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    parts = package.split(".")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{name} ({layer_of(name)}) imports {dep} ({layer_of(dep)})"
        for name, deps in graph.items()
        for dep in deps
        if layer_of(dep) != layer_of(name) and layer_of(dep) not in ALLOWED[layer_of(name)]
    ]


def cycles(graph: dict[str, set[str]], packages: frozenset = frozenset()) -> list[list[str]]:
    """A cycle through each module that is on one (a package's own `__init__` re-exporting is not one)."""
    found = []
    for start in graph:
        if start in packages:
            continue
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            if start in graph.get(node, ()):
                found.append(path + [start])
                break
            for dep in graph.get(node, ()):
                if dep not in seen and dep not in packages:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
    return found


def test_every_layer_imports_only_the_layers_below_it():
    assert layer_violations(GRAPH) == []


def test_there_is_no_import_cycle():
    packages = frozenset(name for name, path in MODULES.items() if path.name == "__init__.py")
    assert cycles(GRAPH, packages) == []


def test_the_rules_can_fail():
    """The checks see a violation where there is one: an import upwards, one between peers, a cycle."""
    assert layer_violations({"serve_app.engine.csm": {"serve_app.api.errors"}})
    assert layer_violations({"serve_app.voices.store": {"serve_app.text.chunking"}})
    assert not layer_violations({"serve_app.text.frontend": {"serve_app.voices.store"}})
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) and not cycles({"a": {"b"}, "b": {"c"}, "c": set()})
    source = "from ..api.errors import x\nimport mlx.core as mx\n"
    probe = PACKAGE / "engine" / "_probe.py"
    assert {"serve_app.api.errors", "mlx.core"} <= imports_of_source(source, probe)


def test_fastapi_and_mlx_stay_in_their_layers():
    wrong = [
        f"{name} imports {dep}"
        for name, path in MODULES.items()
        for dep in imports_of(path)
        if dep.split(".")[0] in THIRD_PARTY and layer_of(name) not in THIRD_PARTY[dep.split(".")[0]]
    ]
    assert wrong == []


def test_nothing_imports_the_tools():
    assert [
        f"{n} imports {d}" for n, deps in GRAPH.items() for d in deps if layer_of(d) == "tools" != layer_of(n)
    ] == []


# The users' benchmark (python -m serve_app.tools.bench speed|memory) is all the package ships of benchmarks:
# its command, its in-process parts, its server part and its one report writer.
USERS_BENCH = {"__init__", "__main__", "engine", "server", "report"}
HARNESSES = PROJECT_ROOT / "ops" / "bench"


def test_the_campaign_harnesses_are_outside_the_package():
    shipped = {p.stem for p in (PACKAGE / "tools" / "bench").glob("*.py")}
    assert shipped == USERS_BENCH, f"only the users' benchmark ships; harnesses go to ops/bench/: {shipped}"
    harnesses = {p.stem for p in HARNESSES.glob("*.py")}
    assert {"loop", "kernels", "frame_kernels", "voices", "context", "stalled_readers", "cluster"} <= harnesses
    reaching_out = [f"{n} imports {d}" for n, p in MODULES.items() for d in imports_of(p) if d.split(".")[0] == "ops"]
    assert reaching_out == []


@pytest.mark.parametrize("name", sorted(MODULES) + [f"ops.bench.{p.stem}" for p in sorted(HARNESSES.glob("*.py"))])
def test_every_module_says_what_it_is_for(name):
    path = MODULES.get(name) or HARNESSES / f"{name.rsplit('.', 1)[1]}.py"
    assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring (the layout map shows it)"


def test_the_development_pages_layout_map_is_the_trees():
    page = layout.PAGE.read_text()
    assert layout.page_block(page) == layout.render(), (
        "docs/pages/development.md's layout map is stale: run `python -m serve_app.tools.layout --write`"
    )


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    """The code (and the docs' Python snippets) stay as the pinned ruff (pyproject.toml) wants them: the lint
    and format commands docs/pages/development.md gives, over the whole checkout."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."],  # exactly the documented lint commands
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
