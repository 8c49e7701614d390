"""Nothing in the project relies on what a Mac lacks, checked here on Linux: a static scan of every tracked
script and module for `/proc`, `setsid(1)`, `ps`, GNU-only `sed`/`readlink`/`stat`/`date`/`grep`/`xargs`
flags, commands macOS does not ship, and bash-4 syntax (macOS's /bin/bash is 3.2). The scan's own patterns
are checked on known-bad lines first, so it cannot pass by matching nothing. Running the control script
under a macOS-like userland is in tests/e2e/test_service.py (tests/support/macos_userland.py builds that PATH).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.servers import ROOT

# (what, pattern): for every tracked text file.
ANYWHERE = [
    ("/proc (macOS has none; use psutil)", re.compile(r"/proc/")),
    (
        "setsid(1) (macOS has none; start_new_session / os.setsid)",
        re.compile(r"""(?<![\w.])setsid\s+["'$\w-]|["']setsid["']"""),
    ),
    (
        "ps (BSD ps differs: no sid keyword, other flags; use psutil)",
        re.compile(r"""["']ps["']\s*[,\]]|(^|[|;&(`]|\$\(|\bnohup\s|\bexec\s)\s*ps\s+-"""),
    ),
]
# For shell scripts only (in Python these words are ordinary names).
SHELL = [
    ("GNU sed flags (BSD sed: no bare -i, -r, --long)", re.compile(r"\bsed\s+(-i(\s|$)|-[a-zA-Z]*[rzu]\b|--[a-z])")),
    ("GNU readlink flags (-f, -e, -m)", re.compile(r"\breadlink\s+(-[a-zA-Z]*[fem]\b|--[a-z])")),
    (
        "GNU stat/date/grep/xargs flags",
        re.compile(r"\bstat\s+-c\b|\bdate\s+(-d|--date)\b|\bgrep\s+-[a-zA-Z]*P|\bxargs\s+-r\b"),
    ),
    (
        "a command macOS does not ship",
        re.compile(
            r"(^|[|;&(`]|\$\(|\bthen\s|\bdo\s|\bnohup\s|\bexec\s)\s*(timeout|nproc|flock|sha256sum|setsid|tac)(\s|\)|;|$)"
        ),
    ),
    (
        "bash 4 syntax (macOS /bin/bash is 3.2)",
        re.compile(r"\b(mapfile|readarray)\b|\bdeclare\s+-A|\$\{\w+(,,|\^\^)|&>>|\|&"),
    ),
]
# The two files that name the banned things on purpose.
EXEMPT = {"tests/unit/test_portability.py", "tests/support/macos_userland.py"}


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "serve_app", "ops", "tests", ".ci"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "serve_app", "ops", "tests", ".ci"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / name for name in sorted(set(out + untracked)) if name not in EXEMPT and (ROOT / name).is_file()]


def _is_shell(path: Path, text: str) -> bool:
    return (
        path.suffix == ".sh"
        or text.startswith("#!")
        and ("bash" in text.split("\n", 1)[0] or text.split("\n", 1)[0].endswith("/sh"))
    )


def _findings(path: Path, text: str) -> list[str]:
    rules = ANYWHERE + (SHELL if _is_shell(path, text) else [])
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in rules:
            if pattern.search(line):
                name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{name}:{number}: {what}: {line.strip()}")
    return found


@pytest.mark.parametrize(
    "line,shell",
    [
        ('Path(f"/proc/{pid}/stat").read_text()', False),
        ('nohup setsid "$PY" -m serve_app.launch &', True),
        ('subprocess.run(["setsid", "python"])', False),
        ('subprocess.run(["ps", "-eo", "pid=,sid="])', False),
        ("out=$(ps -eo pid=,sid=)", True),
        ("sed -i 's/a/b/' file", True),
        ("sed -r 's/(a)+/b/' file", True),
        ('ROOT="$(readlink -f "$0")"', True),
        ("stat -c %s file", True),
        ("when=$(date -d yesterday +%s)", True),
        ("grep -oP '\\d+' file", True),
        ("timeout 10 ./ops/serve.sh", True),
        ("n=$(nproc)", True),
        ("mapfile -t lines < file", True),
        ('echo "${name,,}"', True),
    ],
)
def test_the_scan_catches_each_kind(tmp_path, line, shell):
    path = tmp_path / ("script.sh" if shell else "module.py")
    text = ("#!/usr/bin/env bash\n" if shell else "") + line + "\n"
    assert _findings(path, text), line


@pytest.mark.parametrize(
    "line",
    [
        "os.setsid()",
        "subprocess.Popen(cmd, start_new_session=True)",
        "sed -n '2,9p' \"$0\"",
        "sed -i.bak 's/a/b/' f",
        'tail -n 100 -F "$LOG_FILE"',
        '"""no `setsid(1)`, no `ps` parsing, no /proc"""',
        "psutil.Process(pid).children()",
    ],
)
def test_the_scan_lets_portable_lines_through(tmp_path, line):
    assert not _findings(tmp_path / "script.sh", "#!/usr/bin/env bash\n" + line + "\n")


def test_no_tracked_file_relies_on_what_macos_lacks():
    files = _tracked()
    assert any(p.name == "sesame-tts" for p in files) and any(p.suffix == ".py" for p in files)
    found = [hit for path in files for hit in _findings(path, path.read_text(errors="replace"))]
    assert not found, "\n".join(found)
