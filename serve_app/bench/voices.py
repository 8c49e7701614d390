"""`python -m serve_app.bench.voices`: what a voice's reference clip costs, with and without KV reuse.

    python -m serve_app.bench.voices --checkpoint tiny                 # seconds
    python -m serve_app.bench.voices --checkpoint full --chunks 0 --repeats 1   # first PCM only (minutes here)

One process loads the engine twice on the same weights, with KV reuse (PREFIX_CACHE on: voice prefixes
prefilled once, later chunks continue their row) and without (every chunk re-prefills its whole context,
the behaviour before KV reuse), and measures side by side, interleaved: first PCM of a one-chunk request,
and the total time and the longest gap between two PCM pieces of a multi-chunk request, for the default
voice (a reference clip) and `fast` (none). Results: results/bench/<machine>/voices-<checkpoint>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from ..settings import PROJECT_ROOT, Settings
from . import report

TEXT = "Hello, this is the first sentence of the answer."
CHUNK = "And here the answer goes on with another part."
VOICES = ("conversational", "fast")


def timed(engine, request) -> tuple[float, float, float]:
    """(first PCM s, total s, longest gap between two PCM pieces s) of one in-process request."""
    from ..engine.runners import synthesize

    started = last = time.perf_counter()
    first, gap = None, 0.0
    for item in synthesize(engine, request):
        if isinstance(item, bytes):
            now = time.perf_counter()
            first = first if first is not None else now - started
            gap, last = max(gap, now - last), now
    return first or 0.0, time.perf_counter() - started, gap


def run(checkpoint: Path, frames: int, chunks: int, repeats: int) -> dict:
    import mlx.core as mx

    from ..engine.generation import CSMEngine, select_device
    from ..engine.request import SynthesisRequest
    from ..engine.runners import warm_up
    from ..voices import VoiceLibrary

    mx.set_default_device(select_device("auto"))
    voices = VoiceLibrary.load(Settings().voices_dir)
    engines = {}
    for reuse in (True, False):
        started = time.perf_counter()
        engine = CSMEngine.load(Settings(model_id=str(checkpoint), prefix_cache=reuse), voices)
        warm_up(engine)
        engines[reuse] = (engine, time.perf_counter() - started)
    rows = {}
    for voice in VOICES:
        preset = voices.resolve(voice)
        for reuse, (engine, _) in engines.items():
            rows[(voice, reuse)] = {"first": [], "total": [], "gap": []}
        for r in range(repeats):  # interleaved: the machine's drift hits every configuration alike
            for reuse, (engine, _) in engines.items():
                one = SynthesisRequest([TEXT], preset, seed=r, max_frames_per_chunk=frames)
                rows[(voice, reuse)]["first"].append(timed(engine, one)[0])
                if chunks:
                    many = SynthesisRequest([TEXT] + [CHUNK] * (chunks - 1), preset, seed=r, max_frames_per_chunk=frames)
                    _, total, gap = timed(engine, many)
                    rows[(voice, reuse)]["total"].append(total)
                    rows[(voice, reuse)]["gap"].append(gap)
    med = {k: {m: round(statistics.median(v), 4) if v else None for m, v in row.items()} for k, row in rows.items()}
    result = {"checkpoint": str(checkpoint), "frames_per_chunk": frames, "chunks": chunks, "repeats": repeats,
              "load_s": {("on" if k else "off"): round(v[1], 2) for k, v in engines.items()},
              "prefix_cache": engines[True][0].prefixes.report(),
              "voice_prompt_positions": {name: len(t) for name, t in engines[True][0]._prompts.items()},
              "median_s": {f"{voice}/{'reuse' if reuse else 'reprefill'}": m for (voice, reuse), m in med.items()}}
    on, off = med[("conversational", True)], med[("conversational", False)]
    fast = med[("fast", True)]
    result["targets"] = {
        "first_pcm_default_over_fast (<= 1.15)": round(on["first"] / fast["first"], 3),
        "first_pcm_before_over_after": round(off["first"] / on["first"], 3),
    }
    if chunks:
        result["targets"].update({
            f"{chunks}_chunks_default_over_fast (<= 1.10)": round(on["total"] / fast["total"], 3),
            f"{chunks}_chunks_before_over_after (>= 1.3)": round(off["total"] / on["total"], 3),
        })
    return result


def markdown(result: dict, machine: dict) -> str:
    lines = [f"# Voice prompt cost with and without KV reuse ({machine['name']})", "",
             f"Checkpoint `{result['checkpoint']}`, {result['frames_per_chunk']} frames per chunk, "
             f"{result['chunks']}-chunk requests, median of {result['repeats']}. Voice prompts: "
             f"{result['voice_prompt_positions']} positions; prefix cache {result['prefix_cache']}.", "",
             "| voice / path | first PCM (s) | multi-chunk total (s) | longest gap (s) |", "|---|---|---|---|"]
    for name, m in result["median_s"].items():
        lines.append(f"| {name} | {m['first']} | {m['total'] if m['total'] is not None else '-'} | "
                     f"{m['gap'] if m['gap'] is not None else '-'} |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve_app.bench.voices")
    parser.add_argument("--checkpoint", default="tiny", help="tiny, full, or a checkpoint folder")
    parser.add_argument("--frames", type=int, default=10, help="frames per chunk (each chunk is capped there)")
    parser.add_argument("--chunks", type=int, default=9, help="chunks of the long request (0: first PCM only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Settings().cache_dir)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench", help="results folder")
    args = parser.parse_args(argv)
    from .__main__ import checkpoint_path

    kind, folder = checkpoint_path(args.checkpoint, args.cache)
    result = run(folder, args.frames, args.chunks, args.repeats)
    machine = report.machine()
    result.update(machine=machine, date=datetime.datetime.now().isoformat(timespec="seconds"),
                  command="python -m serve_app.bench.voices " + " ".join(argv if argv is not None else sys.argv[1:]))
    out = args.out / machine["name"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"voices-{kind}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"voices-{kind}.md").write_text(markdown(result, machine))
    print(markdown(result, machine))


if __name__ == "__main__":
    main()
