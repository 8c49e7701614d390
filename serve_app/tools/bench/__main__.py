"""`python -m serve_app.tools.bench`: the side-by-side speed and memory benchmark.

    python -m serve_app.tools.bench                      # tiny, then full-size random weights (generated if missing)
    python -m serve_app.tools.bench --checkpoint tiny    # the stack's own cost, in about a minute
    python -m serve_app.tools.bench --checkpoint full --frames 8 --repeats 1   # real compute and memory
    python -m serve_app.tools.bench --checkpoint /path/to/csm-1b               # a real checkpoint

For each checkpoint, one run measures side by side on this machine: the bare engine in-process, mlx-audio's
own `Model.generate` on the same weights (full-size Mimi only), the whole server over HTTP (streamed mp3,
opus and pcm), concurrency 1/2/4/8 through both, and memory. Every part runs in its own process. Results go
to results/bench/<machine>/<checkpoint>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
from pathlib import Path

from serve_app.core.constants import PROJECT_ROOT
from serve_app.core.settings import Settings
from serve_app.tools.bench import report
from serve_app.tools.bench.engine import NO_PROMPT_VOICE, TEXT, VOICE
from serve_app.tools.bench.server import server_part

DEFAULTS = {"tiny": {"frames": 50, "repeats": 5}, "full": {"frames": 8, "repeats": 1}}


def checkpoint_path(kind: str, cache: Path) -> tuple[str, Path]:
    """'tiny' / 'full' are generated once under the cache; anything else is a checkpoint folder."""
    from serve_app.tools.tiny_checkpoint import write_checkpoint

    if kind in ("tiny", "full"):
        folder = cache / f"bench-{kind}"
        if not (folder / "model.safetensors").exists():
            print(f"writing the {kind} random-weight checkpoint to {folder} ...", file=sys.stderr, flush=True)
            write_checkpoint(folder, full_size=kind == "full")
        return kind, folder
    return Path(kind).name, Path(kind)


def run_part(args: list[str]) -> dict:
    """Run one in-process part in a fresh interpreter; its last stdout line is its JSON."""
    cmd = [sys.executable, "-m", "serve_app.tools.bench.engine", *args]
    print(f"  $ {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {
            "part": args[0],
            "skipped": f"failed: `{shlex.join(cmd[1:])}` exited with {done.returncode} (see stderr)",
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_one(kind: str, folder: Path, args, command: str) -> dict:
    defaults = DEFAULTS.get(kind.split("-")[0], DEFAULTS["full"])
    frames, repeats = args.frames or defaults["frames"], args.repeats or defaults["repeats"]
    levels = args.concurrency
    common = ["--checkpoint", str(folder), "--frames", str(frames), "--repeats", str(repeats)]
    result = {
        "checkpoint_kind": kind,
        "checkpoint": str(folder),
        "frames": frames,
        "repeats": repeats,
        "text": TEXT,
        "voice": args.voice,
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": report.machine(),
    }
    env = {"MLX_COMPILE": args.compile}
    if args.quantize:
        env["QUANTIZE"] = str(args.quantize)
    print(f"[{kind}] bare engine", file=sys.stderr, flush=True)
    result["engine"] = run_part(
        [
            "engine",
            *common,
            "--levels",
            ",".join(levels),
            "--compile",
            args.compile,
            "--quantize",
            str(args.quantize),
            "--voice",
            args.voice,
        ]
    )
    if "skipped" in result["engine"]:
        raise RuntimeError(f"the bare engine part {result['engine']['skipped']}")
    if args.skip_reference:
        pass
    elif args.voice != NO_PROMPT_VOICE:
        result["reference"] = {
            "part": "reference",
            "skipped": f"mlx-audio's loop runs without a voice prompt: it compares with --voice {NO_PROMPT_VOICE} only",
        }
    else:
        print(f"[{kind}] mlx-audio Model.generate", file=sys.stderr, flush=True)
        result["reference"] = run_part(["reference", *common])
    if not args.skip_server:
        print(f"[{kind}] server over HTTP", file=sys.stderr, flush=True)
        result["server"] = server_part(
            str(folder), frames, repeats, [int(n) for n in levels], args.formats, env, voice=args.voice
        )
    result["comparison"] = report.compare(result)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve_app.tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", action="append", help="tiny, full or a checkpoint folder (repeatable; default: tiny and full)"
    )
    parser.add_argument("--frames", type=int, help="frames per request (default: tiny 50, full 8)")
    parser.add_argument("--repeats", type=int, help="requests per single-request measurement (default: tiny 5, full 1)")
    parser.add_argument("--concurrency", default="1,2,4,8", type=lambda s: s.split(","))
    parser.add_argument("--formats", default="mp3,opus,pcm", type=lambda s: s.split(","))
    parser.add_argument(
        "--compile", default="auto", choices=["auto", "on", "off"], help="MLX_COMPILE for engine and server"
    )
    parser.add_argument("--quantize", type=int, default=0, choices=[0, 4, 8])
    parser.add_argument(
        "--voice",
        default=VOICE,
        help=f"the voice measured (default: the server's default, {VOICE}; "
        f"mlx-audio's loop is compared with --voice {NO_PROMPT_VOICE} only)",
    )
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench")
    parser.add_argument("--label", default="", help="appended to the results' file names (e.g. 32f)")
    args = parser.parse_args(argv)
    command = "python -m serve_app.tools.bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    cache = Settings.load().cache_dir
    folder = args.out / report.machine()["name"]
    for kind in args.checkpoint or ["tiny", "full"]:
        name, path = checkpoint_path(kind, cache)
        if args.quantize:
            name = f"{name}-q{args.quantize}"
        if args.label:
            name = f"{name}-{args.label}"
        result = bench_one(name, path, args, command.strip())
        for written in report.write(result, folder):
            print(f"wrote {written}", file=sys.stderr)
        print(report.markdown(result))


if __name__ == "__main__":
    main()
