"""ops/setup.sh's decisions, in a copy of the scripts with a stand-in Python that records what it is asked to
do (a real install downloads ~1 GB: CI's own `./ops/test.sh` run is that test). Serving installs the package
alone; `--test` adds the test tools; every step says what it does; the interpreter is found by itself, or
the message says how to get one."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from serve_app.core.constants import PROJECT_ROOT

# A stand-in for python3.X: answers the version check, makes a venv of itself, and logs every pip call.
FAKE_PYTHON = """#!/bin/sh
case "$1" in
  -c) exit $FAKE_VERSION_OK ;;
  -V) echo "Python 3.12.9"; exit 0 ;;
  -m)
    if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0; fi
    echo "MODEL_ID=${MODEL_ID:-} $*" >> "$FAKE_LOG"; exit 0 ;;
esac
exit 1
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    root = tmp_path / "checkout"
    (root / "ops").mkdir(parents=True)
    for script in ("setup.sh", "serve.sh"):
        shutil.copy(PROJECT_ROOT / "ops" / script, root / "ops" / script)
    shutil.copy(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def fake_bin(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name in names:
        path = folder / name
        path.write_text(FAKE_PYTHON)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    for tool in ("ffmpeg",):  # present, as on a set-up Mac
        (folder / tool).write_text("#!/bin/sh\nexit 0\n")
        (folder / tool).chmod(0o755)
    return folder


def userland(tmp_path: Path) -> Path:
    """The few commands the script needs besides Python and ffmpeg, and nothing else (no real Python)."""
    folder = tmp_path / "userland"
    folder.mkdir(exist_ok=True)
    for tool in ("bash", "cat", "cksum", "cut", "rm", "touch", "mkdir", "cp", "uname", "id", "dirname", "printf"):
        if (found := shutil.which(tool)) and not (folder / tool).exists():
            (folder / tool).symlink_to(found)
    return folder


def run_setup(
    checkout: Path, bin_folder: Path, *args: str, version_ok: bool = True, script: str = "setup.sh"
) -> subprocess.CompletedProcess:
    env = {
        "PATH": f"{bin_folder}:{userland(bin_folder.parent)}",
        "PYTHON_DIRS": "",  # not this machine's Homebrew or /usr/local
        "FAKE_LOG": str(checkout / "pip.log"),
        "FAKE_VERSION_OK": "0" if version_ok else "1",
        "HOME": str(checkout),
    }
    return subprocess.run(
        ["bash", f"ops/{script}", *args], cwd=checkout, env=env, capture_output=True, text=True, timeout=60
    )


def pip_calls(checkout: Path) -> list[str]:
    log = checkout / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def test_serving_installs_the_package_without_the_test_tools(checkout, tmp_path):
    done = run_setup(checkout, fake_bin(tmp_path, "python3.12"))
    assert done.returncode == 0, done.stderr
    installs = [c for c in pip_calls(checkout) if "install" in c]
    assert any(c.endswith("-m pip install --quiet -e .") for c in installs), installs
    assert not [c for c in installs if "[test]" in c or "pytest" in c or "llama3.2" in c], installs
    assert not [c for c in pip_calls(checkout) if "openclaw" in c]
    steps = [line for line in done.stderr.splitlines() if line.startswith("setup: ")]
    assert len(steps) >= 5 and "ffmpeg" in steps[0] and "Python" in steps[1] and steps[-1] == "setup: done (serve)"

    again = run_setup(checkout, fake_bin(tmp_path, "python3.12"))  # nothing changed: nothing installed
    assert "packages: up to date (serve)" in again.stderr and pip_calls(checkout) == installs

    tested = run_setup(checkout, fake_bin(tmp_path, "python3.12"), "--test")
    assert tested.returncode == 0, tested.stderr
    assert any(c.endswith("-m pip install --quiet -e .[test]") for c in pip_calls(checkout))
    # the test clients are test tools too: OpenClaw's CLI is installed by setup, not inside a test's setup
    assert [c for c in pip_calls(checkout) if "tests.support.openclaw" in c] == ["MODEL_ID= -m tests.support.openclaw"]
    assert "test clients: OpenClaw" in tested.stderr
    assert "packages: up to date (serve)" in run_setup(checkout, fake_bin(tmp_path, "python3.12")).stderr


def test_the_newest_supported_python_is_found_by_itself(checkout, tmp_path):
    done = run_setup(checkout, fake_bin(tmp_path, "python3.11", "python3.13", "python3"))
    assert done.returncode == 0, done.stderr
    assert f"Python: {tmp_path / 'bin' / 'python3.13'}" in done.stderr


def test_without_a_supported_python_it_says_how_to_get_one(checkout, tmp_path):
    done = run_setup(checkout, fake_bin(tmp_path, "python3"), version_ok=False)  # a python3 that is too old
    assert done.returncode != 0 and not (checkout / ".venv").exists()
    assert "no Python 3.10-3.13 found" in done.stderr
    hint = "brew install python@3.12" if os.uname().sysname == "Darwin" else "apt-get install python3"
    assert hint in done.stderr


def test_serve_tiny_writes_the_checkpoint_once_then_serves_it(checkout, tmp_path):
    """`./ops/serve.sh --tiny DIR` (what the server's offline hint prints): set up, write the tiny checkpoint
    unless DIR has one, then start the launcher with MODEL_ID=DIR and the remaining arguments."""
    folder = fake_bin(tmp_path, "python3.12")
    done = run_setup(checkout, folder, "--tiny", "/tmp/csm-tiny-x", script="serve.sh")
    assert done.returncode == 0, done.stderr
    calls = [c for c in pip_calls(checkout) if "pip" not in c]
    assert calls == [
        "MODEL_ID= -m serve_app.tools.tiny_checkpoint /tmp/csm-tiny-x",
        "MODEL_ID=/tmp/csm-tiny-x -m serve_app.launch",
    ]
    usage = run_setup(checkout, folder, "--tiny", script="serve.sh")
    assert usage.returncode == 2 and "usage: ./ops/serve.sh --tiny DIR" in usage.stderr
