"""The campaign harnesses: one experiment each, outside the shipped package (the users' benchmark is
`python -m serve_app.tools.bench`). Run from the checkout's root, e.g. `python -m ops.bench.loop --checkpoint tiny`;
`ops/gpu-bench.sh` runs the frame loop on a lent GPU. Each writes `results/bench/<machine>/<name>.{json,md}`.

    loop, loop_report     the frame loop side by side (kernels, graph build, frames/s), for ops/gpu-bench.sh
    kernels, frame_kernels  what a GPU launches per frame (the kernel counter)
    voices, context       what a voice's reference clip and a conversation's context cost the first audio
    stalled_readers       what clients that stop reading cost the server
    cluster               one replica against two, through the load test
    wyoming               Home Assistant's Wyoming against HTTP, first audio side by side
    parts                 Mimi's dtypes, the idle unload's reload
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

from serve_app.tools.bench import report


def save_side_bench(result: dict, module: str, name: str, out: Path, render, argv) -> None:
    """A side benchmark's result (ops.bench.voices, .context, ...): the machine, date and command added, written
    as `<out>/<machine>/<name>.json` and `.md` (rendered by `render(result, machine)`), the table printed."""
    machine_info = report.machine()
    result.update(
        machine=machine_info,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    folder = out / machine_info["name"]
    folder.mkdir(parents=True, exist_ok=True)
    table = render(result, machine_info)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{name}.md").write_text(table)
    print(table)
