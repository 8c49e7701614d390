"""./ops/test.sh runs the suite on two workers, and each group (a module, or the modules that share one server:
tests/conftest.py) must run whole in one of them, or its server starts twice and its order breaks. pytest-xdist
groups tests by rewriting their node ids, which pytest 9.2 ignores (pytest-dev/pytest-xdist#1386): the groups
then fall apart without an error. This runs two grouped modules on two workers and checks where they ran."""

from __future__ import annotations

import subprocess
import sys

from serve_app.core.constants import PROJECT_ROOT

GROUPED = """
import os
import pytest

pytestmark = pytest.mark.xdist_group("together")

@pytest.mark.parametrize("i", range(4))
def test_where(i):
    print("ran-on", os.environ["PYTEST_XDIST_WORKER"])
"""


def test_a_group_runs_whole_in_one_worker(tmp_path):
    for name in ("test_a.py", "test_b.py"):
        (tmp_path / name).write_text(GROUPED)
    (tmp_path / "test_other.py").write_text("def test_alone():\n    pass\n")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup", "-v"]
    done = subprocess.run(
        [*command, "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout[-2000:]
    workers = {line.split()[0] for line in done.stdout.splitlines() if "PASSED" in line and "test_where" in line}
    assert len(workers) == 1, done.stdout[-2000:]
    assert done.stdout.count("PASSED") == 9
