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
import time
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


def side_bench_options(doc: str, argv, frames: int) -> tuple:
    """The options every side-by-side harness takes, parsed: (args, checkpoint name, checkpoint folder)."""
    import argparse

    from serve_app.core.constants import PROJECT_ROOT
    from serve_app.core.settings import Settings
    from serve_app.tools.bench.__main__ import checkpoint_path

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="tiny", help="tiny (written once), full, or a folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=frames, help="frames every request generates (the cap)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench")
    parser.add_argument("--cache", type=Path, default=Settings().cache_dir)
    args = parser.parse_args(argv)
    return (args, *checkpoint_path(args.checkpoint, args.cache))


def measure_on_server(checkpoint: Path, frames: int, measure, env=None):
    """`measure(server)` on one real server (the launcher, this frame cap, a batch of 2), stopped after."""
    from serve_app.tools.bench.server import start_server

    server = start_server(str(checkpoint), frames, max_batch=2, env=env or {})
    try:
        server.wait_until(lambda r: r.status_code == 200)
        return measure(server)
    finally:
        server.stop()


def http_first_byte(client, route: str, body: dict) -> float:
    """Seconds from a streamed POST to its first body bytes, on a kept-alive `client` (httpx); the rest is
    read to the end, so the next round starts on an idle server."""
    started = time.perf_counter()
    with client.stream("POST", route, json=body) as response:
        response.raise_for_status()
        chunks = response.iter_raw()
        next(chunks)
        first = time.perf_counter() - started
        for _ in chunks:
            pass
    return first
