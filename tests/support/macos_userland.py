"""A PATH that behaves like macOS's userland, so Linux CI catches what a Mac would refuse.

`build(folder)` fills `folder` with a link to every command this machine's PATH offers, except the ones macOS
does not ship (`setsid`, `timeout`, `nproc`, `flock`, ...), and with strict stand-ins for the tools whose GNU
flags BSD lacks (`ps`, `sed`, `readlink`, `stat`, `date`, `grep`, `xargs`): each refuses what the BSD tool
would refuse and otherwise runs the real one. The folder must be the whole PATH, not its first entry: a
command it lacks would otherwise be found further down.

    PATH="$(.venv/bin/python -m tests.support.macos_userland /tmp/macos-bin)" ./ops/test.sh

runs the whole suite under it (what the closing note of the macOS issue did).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Commands a stock macOS 14 lacks (GNU coreutils and util-linux only; Homebrew's are g-prefixed).
MISSING = (
    "setsid",
    "timeout",
    "nproc",
    "flock",
    "sha256sum",
    "sha512sum",
    "md5sum",
    "tac",
    "getent",
    "ldd",
    "systemctl",
    "loginctl",
    "journalctl",
    "apt-get",
    "dpkg",
)

# tool -> (refused arguments, refused argument prefixes, refused `-o`/`-O` keywords): what BSD's tool lacks.
STRICT = {
    # BSD ps: no `sid` keyword (`sess` is a kernel pointer there), no long options, no `-C`, no `--sort`.
    "ps": ((), ("--", "-C"), ("sid", "cmd", "lwp", "nlwp", "psr", "etimes", "sgi_p", "cgroup")),
    # BSD sed: a bare `-i` takes the next argument as its suffix (`-i.bak` is portable), no `-r`, `-z`, `-s`,
    # `-u`, no long options.
    "sed": (("-i", "-r", "-z", "-s", "-u"), ("--",), ()),
    # macOS readlink before 12.3 has no -f; none has -e or -m.
    "readlink": (("-f", "-e", "-m"), ("--",), ()),
    "stat": (("-c",), ("--",), ()),  # BSD stat formats with -f
    "date": (("-d",), ("--",), ()),  # BSD date -d means something else
    "grep": (("-P",), ("--perl",), ()),
    "xargs": (("-r",), ("--",), ()),
}

WRAPPER = """#!/bin/sh
# macOS-like {tool}: refuse what BSD {tool} lacks, else run the real one.
want_keywords=0
for arg in "$@"; do
  if [ "$want_keywords" = 1 ]; then
    for kw in $(echo "$arg" | tr ',' ' '); do
      case "${{kw%%=*}}" in {keywords}) echo "{tool}: $kw: keyword not found (macOS-like userland)" >&2; exit 1 ;; esac
    done
  fi
  want_keywords=0
  case "$arg" in
    --*) ;;
    -*o|-*O) want_keywords={takes_keywords} ;;  # -o, -eo, -axo: the keywords follow
  esac
  case "$arg" in
    {refused}) echo "{tool}: illegal option -- ${{arg#-}} (macOS-like userland)" >&2; exit 1 ;;
  esac
done
exec {real} "$@"
"""


def _executables(skip: Path) -> dict[str, str]:
    """Every command name on this process's PATH (less `skip`) -> the path PATH lookup finds first."""
    found: dict[str, str] = {}
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if folder and Path(folder).resolve() == skip.resolve():
            continue
        try:
            entries = sorted(os.listdir(folder or "."))
        except OSError:
            continue
        for name in entries:
            path = os.path.join(folder, name)
            if name not in found and os.path.isfile(path) and os.access(path, os.X_OK):
                found[name] = path
    return found


def build(folder: Path) -> str:
    """Fill `folder` (created if needed) and return it as the PATH value to use."""
    folder.mkdir(parents=True, exist_ok=True)
    real = _executables(folder)
    for tool, path in real.items():
        target = folder / tool
        if tool in MISSING or tool in STRICT or target.exists() or target.is_symlink():
            continue
        target.symlink_to(path)
    for tool, (exact, prefixes, keywords) in STRICT.items():
        if tool not in real:
            continue
        patterns = [*exact, *(f"{p}*" for p in prefixes)]
        script = WRAPPER.format(
            tool=tool,
            real=real[tool],
            refused="|".join(patterns),
            keywords="|".join(keywords) or "__none__",
            takes_keywords=1 if keywords else 0,
        )
        wrapper = folder / tool
        wrapper.unlink(missing_ok=True)
        wrapper.write_text(script)
        wrapper.chmod(0o755)
    return str(folder)


if __name__ == "__main__":
    print(build(Path(sys.argv[1]).resolve()))
