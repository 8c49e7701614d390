"""The session and the scheduler get the narrow parts of the engine they use (session.SessionEngine,
scheduler.SchedulerEngine): every `engine.X` / `self.engine.X` the module reads is in its view, and the real
CSMEngine provides every name of both views. Read from the source, so a new reach into the engine fails here
until the view (and its docstring's reason) says so."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from serve_app.engine import csm, scheduler, session

ENGINE = Path(csm.__file__).parent


def engine_reads(module_file: Path) -> set[str]:
    """Attribute names read off `engine` or `self.engine` in a module."""
    names = set()
    for node in ast.walk(ast.parse(module_file.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id == "engine":
            names.add(node.attr)
        elif isinstance(owner, ast.Attribute) and owner.attr == "engine" and isinstance(owner.value, ast.Name):
            names.add(node.attr) if owner.value.id == "self" else None
    return names


def view_names(view: type) -> set[str]:
    """The names a Protocol declares (its annotations and its methods and properties, its bases' included)."""
    names = set()
    for klass in view.__mro__:
        if klass is object or klass.__name__ in ("Protocol", "Generic"):
            continue
        names |= set(getattr(klass, "__annotations__", {}))
        names |= {name for name in vars(klass) if not name.startswith("_")}
    return names


@pytest.mark.parametrize(
    ("module", "view"),
    [(session, session.SessionEngine), (scheduler, scheduler.SchedulerEngine)],
    ids=["session", "scheduler"],
)
def test_a_module_reads_only_its_view_of_the_engine(module, view):
    reads = engine_reads(Path(module.__file__))
    assert reads, "the scan found no engine reads: it would pass anything"
    assert reads <= view_names(view), f"{module.__name__} reads {sorted(reads - view_names(view))} outside its view"


def test_the_views_are_narrower_than_the_engine_and_the_engine_has_them():
    engine_names = {name for name in vars(csm.CSMEngine) if not name.startswith("_")}
    engine_names |= {  # what __init__ assigns
        node.attr
        for node in ast.walk(ast.parse(inspect.getsource(csm.CSMEngine.__init__).strip()))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
    }
    for view in (session.SessionEngine, scheduler.SchedulerEngine):
        assert view_names(view) <= engine_names, sorted(view_names(view) - engine_names)
    session_view = view_names(session.SessionEngine)
    assert {"model", "tokenizer", "mimi", "voices", "files"}.isdisjoint(session_view)
    assert {"tokenizer", "voices", "files", "encode_audio"}.isdisjoint(view_names(scheduler.SchedulerEngine))
    assert len(view_names(scheduler.SchedulerEngine)) < len(engine_names) / 2
