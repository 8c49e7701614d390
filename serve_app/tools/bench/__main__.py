"""`python -m serve_app.tools.bench`: this machine's speed and memory, side by side, in one command.

    python -m serve_app.tools.bench [speed]              # tiny, then full-size random weights (generated if missing)
    python -m serve_app.tools.bench --checkpoint tiny    # the stack's own cost, in about a minute
    python -m serve_app.tools.bench --checkpoint full --frames 8 --repeats 1   # real compute and memory
    python -m serve_app.tools.bench --checkpoint /path/to/csm-1b               # a real checkpoint
    python -m serve_app.tools.bench memory --checkpoint full --quantize 0,8,4  # what QUANTIZE saves

`speed` (the default): for each checkpoint, one run measures side by side on this machine: the bare engine
in-process, mlx-audio's own `Model.generate` on the same weights (full-size Mimi only), the whole server over
HTTP (streamed mp3, opus and pcm), concurrency 1/2/4/8 through both, and memory. `memory`: load and one short
request per QUANTIZE level. Every part runs in its own process; report.py writes
results/bench/<machine>/<checkpoint>.{json,md,png} (memory: memory-<checkpoint>.{json,md}). The campaign
harnesses (the frame loop, the kernel counter, ...) live outside the package, in ops/bench/.
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


def memory_one(kind: str, folder: Path, args, command: str) -> dict:
    """Load, then one short request, per QUANTIZE level, each in a fresh process (its memory its own)."""
    parts = []
    for level in args.quantize:
        print(f"[{kind}] QUANTIZE={level}", file=sys.stderr, flush=True)
        parts.append(run_part(["memory", "--checkpoint", str(folder), "--quantize", str(level), "--voice", args.voice]))
    return {
        "kind": "memory",
        "checkpoint_kind": kind,
        "checkpoint": str(folder),
        "voice": args.voice,
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": report.machine(),
        "levels": parts,
    }


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", action="append", help="tiny, full or a checkpoint folder (repeatable; default: tiny and full)"
    )
    parser.add_argument(
        "--voice",
        default=VOICE,
        help=f"the voice measured (default: the server's default, {VOICE}; "
        f"mlx-audio's loop is compared with --voice {NO_PROMPT_VOICE} only)",
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench")
    parser.add_argument("--label", default="", help="appended to the results' file names (e.g. 32f)")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve_app.tools.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    speed = commands.add_parser("speed", help="engine, mlx-audio and the server over HTTP, side by side (default)")
    _common(speed)
    speed.add_argument("--frames", type=int, help="frames per request (default: tiny 50, full 8)")
    speed.add_argument("--repeats", type=int, help="requests per single-request measurement (default: tiny 5, full 1)")
    speed.add_argument("--concurrency", default="1,2,4,8", type=lambda s: s.split(","))
    speed.add_argument("--formats", default="mp3,opus,pcm", type=lambda s: s.split(","))
    speed.add_argument(
        "--compile", default="auto", choices=["auto", "on", "off"], help="MLX_COMPILE for engine and server"
    )
    speed.add_argument("--quantize", type=int, default=0, choices=[0, 4, 8])
    speed.add_argument("--skip-reference", action="store_true")
    speed.add_argument("--skip-server", action="store_true")
    memory = commands.add_parser("memory", help="memory after load and after one request, per QUANTIZE level")
    _common(memory)
    memory.add_argument("--quantize", default=[0, 8, 4], type=lambda s: [int(n) for n in s.split(",")])
    if not argv or argv[0] not in ("speed", "memory", "-h", "--help"):
        argv = ["speed", *argv]  # `speed` is the default command
    return parser.parse_args(argv)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    command = "python -m serve_app.tools.bench " + shlex.join(argv)
    cache = Settings.load().cache_dir
    folder = args.out / report.machine()["name"]
    for kind in args.checkpoint or ["tiny", "full"]:
        name, path = checkpoint_path(kind, cache)
        if args.command == "speed" and args.quantize:
            name = f"{name}-q{args.quantize}"
        if args.label:
            name = f"{name}-{args.label}"
        if args.command == "memory":
            result = memory_one(name, path, args, command.strip())
        else:
            result = bench_one(name, path, args, command.strip())
        for written in report.write(result, folder):
            print(f"wrote {written}", file=sys.stderr)
        print(report.markdown(result))


if __name__ == "__main__":
    main()
