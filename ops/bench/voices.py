"""`python -m ops.bench.voices`: what a voice's reference clip costs, with and without KV reuse.

    python -m ops.bench.voices --checkpoint tiny                 # seconds
    python -m ops.bench.voices --checkpoint full --chunks 0 --repeats 1   # first PCM only (minutes here)

One process loads the engine on the same weights as it runs now (KV reuse: voice prefixes prefilled once,
later chunks continue their row; chunked prefill) and as it ran before (every chunk re-prefills its whole
context in one go), and measures side by side, interleaved: first PCM of a one-chunk request, and the total
time and the longest gap between two PCM pieces of a multi-chunk request, for the default voice (a
reference clip) and `fast` (none); then the longest gap between two frames of a streaming request while a
default-voice request joins it, also with chunked prefill alone.
Results: results/bench/<machine>/voices-<checkpoint>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from ops.bench import save_side_bench
from serve_app.core.constants import PROJECT_ROOT
from serve_app.core.settings import Settings
from serve_app.model.loading import load_engine
from serve_app.tools.bench.engine import time_request

TEXT = "Hello, this is the first sentence of the answer."
CHUNK = "And here the answer goes on with another part."
VOICES = ("conversational", "fast")


def join_stall(engine, frames: int, voices) -> dict:
    """The gaps between frames of a streaming request (`fast`) while a default-voice request joins it."""
    from serve_app.core.messages import SynthesisRequest
    from serve_app.engine.scheduler import BatchScheduler, GenerationJob

    scheduler = BatchScheduler(engine, 4)
    scheduler.add(
        GenerationJob(
            SynthesisRequest([TEXT], voices.resolve("fast"), seed=0, max_frames_per_chunk=4 * frames), lambda item: None
        )
    )
    streaming, stamps = scheduler.waiting[-1], []
    accept = streaming.accept
    streaming.accept = lambda codes: stamps.append(time.perf_counter()) or accept(codes)
    for _ in range(3):
        scheduler.step()
    scheduler.add(
        GenerationJob(
            SynthesisRequest([TEXT], voices.resolve("conversational"), seed=1, max_frames_per_chunk=frames),
            lambda item: None,
        )
    )
    while scheduler.active:
        scheduler.step()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"max_gap_s": round(max(gaps), 4), "median_gap_s": round(statistics.median(gaps), 4)}


# The configurations compared: after (KV reuse, chunked prefill), and before (neither: every chunk
# re-prefills its whole context in one go); for the join stall also KV reuse off but chunked prefill on.
CONFIGS = {
    "reuse": dict(prefix_cache=True),
    "before": dict(prefix_cache=False, prefill_step_positions=2048),
    "chunked-only": dict(prefix_cache=False),
}


def run(checkpoint: Path, frames: int, chunks: int, repeats: int, configs: tuple[str, ...] = tuple(CONFIGS)) -> dict:
    import mlx.core as mx

    from serve_app.core.messages import SynthesisRequest
    from serve_app.engine.csm import select_device
    from serve_app.engine.runners import warm_up
    from serve_app.voices.presets import VoiceLibrary

    mx.set_default_device(select_device("auto"))
    voices = VoiceLibrary.load(Settings().voices_dir)
    engines, load_s = {}, {}
    for name, options in CONFIGS.items():
        if name not in configs or (name == "chunked-only" and not chunks):
            continue
        started = time.perf_counter()
        engines[name] = load_engine(Settings(model_id=str(checkpoint), **options), voices)
        warm_up(engines[name])
        load_s[name] = round(time.perf_counter() - started, 2)
    compared = tuple(name for name in ("reuse", "before") if name in engines)
    rows = {(voice, name): {"first": [], "total": [], "gap": []} for voice in VOICES for name in compared}
    for r in range(repeats):  # interleaved: the machine's drift hits every configuration alike
        for voice in VOICES:
            preset = voices.resolve(voice)
            for name in compared:
                one = SynthesisRequest([TEXT], preset, seed=r, max_frames_per_chunk=frames)
                rows[(voice, name)]["first"].append(time_request(engines[name], one)[0])
                if chunks:
                    many = SynthesisRequest(
                        [TEXT] + [CHUNK] * (chunks - 1), preset, seed=r, max_frames_per_chunk=frames
                    )
                    _, total, gap = time_request(engines[name], many)
                    rows[(voice, name)]["total"].append(total)
                    rows[(voice, name)]["gap"].append(gap)
    med = {k: {m: round(statistics.median(v), 4) if v else None for m, v in row.items()} for k, row in rows.items()}
    result = {
        "checkpoint": str(checkpoint),
        "frames_per_chunk": frames,
        "chunks": chunks,
        "repeats": repeats,
        "load_s": load_s,
        "prefix_cache": engines["reuse"].prefixes.report(),
        "voice_prompt_positions": {name: len(t) for name, t in engines["reuse"]._prompts.items()},
        "median_s": {f"{voice}/{name}": m for (voice, name), m in med.items()},
    }
    on, fast, off = med[("conversational", "reuse")], med[("fast", "reuse")], med.get(("conversational", "before"))
    result["targets"] = {"first_pcm_default_over_fast (<= 1.15)": round(on["first"] / fast["first"], 3)}
    if off:
        result["targets"]["first_pcm_before_over_after"] = round(off["first"] / on["first"], 3)
    if chunks:
        result["targets"][f"{chunks}_chunks_default_over_fast (<= 1.10)"] = round(on["total"] / fast["total"], 3)
        if off:
            result["targets"][f"{chunks}_chunks_before_over_after (>= 1.3)"] = round(off["total"] / on["total"], 3)
        result["join_stall"] = {name: join_stall(engine, frames, voices) for name, engine in engines.items()}
    return result


def markdown(result: dict, machine: dict) -> str:
    lines = [
        f"# Voice prompt cost with and without KV reuse ({machine['name']})",
        "",
        f"Checkpoint `{result['checkpoint']}`, {result['frames_per_chunk']} frames per chunk, "
        f"{result['chunks']}-chunk requests, median of {result['repeats']}. Voice prompts: "
        f"{result['voice_prompt_positions']} positions; prefix cache {result['prefix_cache']}.",
        "",
        "| voice / path | first PCM (s) | multi-chunk total (s) | longest gap (s) |",
        "|---|---|---|---|",
    ]
    for name, m in result["median_s"].items():
        lines.append(
            f"| {name} | {m['first']} | {m['total'] if m['total'] is not None else '-'} | "
            f"{m['gap'] if m['gap'] is not None else '-'} |"
        )
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result["targets"].items()]
    if "join_stall" in result:
        lines += [
            "",
            "A `fast` request streaming while a `conversational` request joins (gaps between its frames):",
            "",
            "| configuration | longest gap (s) | median gap (s) |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {v['max_gap_s']} | {v['median_gap_s']} |" for name, v in result["join_stall"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.voices")
    parser.add_argument("--checkpoint", default="tiny", help="tiny, full, or a checkpoint folder")
    parser.add_argument("--frames", type=int, default=10, help="frames per chunk (each chunk is capped there)")
    parser.add_argument("--chunks", type=int, default=9, help="chunks of the long request (0: first PCM only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Settings().cache_dir)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench", help="results folder")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"which of {', '.join(CONFIGS)} to load "
        "(reuse is always measured; before takes very long at full size on a CPU)",
    )
    parser.add_argument("--label", default="", help="appended to the results' file names")
    args = parser.parse_args(argv)
    from serve_app.tools.bench.__main__ import checkpoint_path

    kind, folder = checkpoint_path(args.checkpoint, args.cache)
    configs = tuple({"reuse", *args.configs.split(",")})
    result = run(folder, args.frames, args.chunks, args.repeats, configs)
    name = f"voices-{kind}" + (f"-{args.label}" if args.label else "")
    save_side_bench(result, "ops.bench.voices", name, args.out, markdown, argv)


if __name__ == "__main__":
    main()
