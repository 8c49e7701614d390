"""`python -m ops.bench.context`: what conversation context costs the first audio.

    python -m ops.bench.context --checkpoint tiny             # seconds
    python -m ops.bench.context --checkpoint full --repeats 1  # CSM-1B's size (minutes on a CPU)

One engine (KV reuse on, as it runs), the default voice (a reference clip, prefilled once), and the same
reply with 0, 1 and 3 earlier turns of context, each turn TURN_S of speech (its text and random Mimi
codes: only their number of positions matters to the cost). Measured side by side, interleaved: time to
the first PCM and the positions prefilled. Results: results/bench/<machine>/context-<checkpoint>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from ops.bench import save_side_bench
from serve_app.core.constants import FRAME_RATE, PROJECT_ROOT
from serve_app.core.settings import Settings
from serve_app.model.loading import load_engine
from serve_app.tools.bench.engine import time_request

REPLY = "Sure, I can do that for you this afternoon."
TURN = "Could you move my dentist appointment to Thursday, please?"
TURN_S = 4.0  # seconds of speech per earlier turn
TURNS = (0, 1, 3)


def run(checkpoint: Path, frames: int, repeats: int) -> dict:
    import mlx.core as mx
    import numpy as np

    from serve_app.core.messages import ContextSegment, SynthesisRequest
    from serve_app.engine.csm import select_device
    from serve_app.engine.runners import warm_up
    from serve_app.voices.presets import VoiceLibrary

    mx.set_default_device(select_device("auto"))
    voices = VoiceLibrary.load(Settings().voices_dir)
    started = time.perf_counter()
    engine = load_engine(Settings(model_id=str(checkpoint)), voices)
    warm_up(engine)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    codes = rng.integers(1, 2048, size=(engine.num_codebooks, int(TURN_S * FRAME_RATE)), dtype=np.int32)
    turn = ContextSegment(speaker=1, text=TURN, codes=codes)
    preset = voices.resolve("conversational")
    first: dict[int, list[float]] = {n: [] for n in TURNS}
    for r in range(repeats):  # interleaved, so drift hits every count of turns alike
        for n in TURNS:
            request = SynthesisRequest([REPLY], preset, seed=r, context=[turn] * n, max_frames_per_chunk=frames)
            first[n].append(time_request(engine, request)[0])
    median = {n: round(statistics.median(v), 4) for n, v in first.items()}
    return {
        "checkpoint": str(checkpoint),
        "load_s": round(load_s, 2),
        "frames_per_request": frames,
        "repeats": repeats,
        "turn_positions": len(engine.segment_tokens(turn)),
        "first_pcm_s": {f"{n} turns": median[n] for n in TURNS},
        "ratios": {f"{n} turns / 0 turns": round(median[n] / median[0], 3) for n in TURNS if n},
    }


def markdown(result: dict, machine: dict) -> str:
    lines = [
        f"# First audio with conversation context ({machine['name']})",
        "",
        f"Checkpoint `{result['checkpoint']}`, default voice (its clip prefilled once), each earlier turn "
        f"{TURN_S:g} s of speech = {result['turn_positions']} positions; median of {result['repeats']}.",
        "",
        "| context | first PCM (s) |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in result["first_pcm_s"].items()]
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.context")
    parser.add_argument("--checkpoint", default="tiny", help="tiny, full, or a checkpoint folder")
    parser.add_argument("--frames", type=int, default=3, help="frames per request (first PCM needs the first group)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Settings().cache_dir)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench", help="results folder")
    args = parser.parse_args(argv)
    from serve_app.tools.bench.__main__ import checkpoint_path

    kind, folder = checkpoint_path(args.checkpoint, args.cache)
    result = run(folder, args.frames, args.repeats)
    save_side_bench(result, "ops.bench.context", f"context-{kind}", args.out, markdown, argv)


if __name__ == "__main__":
    main()
