"""`python -m ops.bench.loop`: the frame loop itself, side by side in one run.

    python -m ops.bench.loop --checkpoint tiny --baseline cbdf0f3
    python -m ops.bench.loop --checkpoint full --frames 4 --repeats 1 --batches 1,4 --skip-reference

What it compares, each part in a fresh process, the rounds interleaved so that load on the machine falls on
every configuration alike:
- `engine`: the bare-engine part of `python -m serve_app.tools.bench` (one request at a time, then 4 together),
  from this tree and from the `--baseline` commit (checked out in a git worktree): frames/s before and after,
  compiled and not.
- `loop`: our scheduler at batch 1 and 4, pipelined and not, compiled and not: frames/s, the kernels a GPU
  launches per frame in all and by component with Mimi's share (frame_kernels.py: what it counts exactly),
  the host's time to build a frame's graph (`graph_build_ms_per_frame`, the loop's own median), host
  synchronisations per frame, the MLX thread's own time per frame (Python and launching: step time minus
  time blocked on the device), and the device's time per frame (the frame read's wait in the unpipelined
  loop, where nothing else is queued). Device idle per frame is then the wall time per frame minus that.
- `reference`: mlx-audio's own frame loop (`SesameModel.generate_frame` driven as `Model.generate` drives it,
  with its sampler and its end-of-speech check each frame) on the same weights, codes only: mlx-audio always
  builds a full-size Mimi, so the tiny checkpoint can only be compared without it.
Results: results/bench/<machine>/loop-<checkpoint>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_app.core.constants import PROJECT_ROOT
from serve_app.core.settings import Settings
from serve_app.model.loading import load_engine
from serve_app.tools.bench import report
from serve_app.tools.bench.engine import NO_PROMPT_VOICE, TEXT


def _load(checkpoint: str, compile_mode: str, pipeline: bool, max_batch: int):
    """The engine, with the settings this tree knows (the part also runs on a baseline commit's tree)."""
    import mlx.core as mx

    from serve_app.engine.csm import select_device
    from serve_app.voices.presets import VoiceLibrary

    wanted = {"model_id": checkpoint, "mlx_compile": compile_mode, "pipeline": pipeline, "max_batch_size": max_batch}
    settings = Settings(**{k: v for k, v in wanted.items() if k in Settings.model_fields})
    mx.set_default_device(select_device(settings.mlx_device))
    voices = VoiceLibrary.load(settings.voices_dir)
    # The loop is measured with a voice without a reference clip: no prompt needs encoding at load.
    return load_engine(settings), voices


def _run(engine, preset, batch: int, frames: int, seed: int, trace=None):
    """`batch` requests of `frames` frames generating together; (wall s, the scheduler)."""
    from serve_app.core.messages import SynthesisRequest
    from serve_app.engine.scheduler import BatchScheduler, GenerationJob

    scheduler = BatchScheduler(engine, batch)
    if trace is not None:
        scheduler.trace = trace
    for i in range(batch):
        request = SynthesisRequest([TEXT], preset, seed=seed + i, max_frames_per_chunk=frames)
        scheduler.add(GenerationJob(request, lambda item: None))
    started = time.perf_counter()
    while scheduler.active:
        scheduler.step()
    return time.perf_counter() - started, scheduler


def loop_part(
    checkpoint: str, frames: int, repeats: int, batches: list[int], compile_mode: str, pipeline: bool
) -> dict:
    """Our scheduler, `batch` requests of `frames` frames generating together, `repeats` times per size."""
    from serve_app.engine.runners import warm_up

    engine, voices = _load(checkpoint, compile_mode, pipeline, max(batches))
    warm_up(engine)
    preset = voices.resolve(NO_PROMPT_VOICE)
    stats_kept = "pipeline" in Settings.model_fields  # the baseline commit's loop has no stats
    out = {
        "part": "loop",
        "compiled": (getattr(engine, "frame_step", None) or engine.frame_decoder).compiled,  # a baseline's too
        "pipelined": pipeline and stats_kept,
        "frames": frames,
        "batches": {},
    }
    for batch in batches:
        runs = []
        for r in range(repeats):
            wall, scheduler = _run(engine, preset, batch, frames, 1000 * r)
            runs.append({"wall_s": wall, **(scheduler.stats.per_frame() if stats_kept else {})})
        best = min(runs, key=lambda run: run["wall_s"])  # the least disturbed round
        counted = _count(engine, batch)
        out["batches"][str(batch)] = {
            "frames_per_s": round(frames / statistics.median(r["wall_s"] for r in runs), 2),
            "frames_per_s_best": round(frames / best["wall_s"], 2),
            "kernels_per_frame": counted.get("kernels_per_frame"),
            "kernels_by_component": counted.get("kernels_by_component"),
            "dispatches_per_frame": counted.get("dispatches_per_frame"),
            "metal_graph_nodes": counted.get("metal_graph_nodes"),
            "kernel_count": counted,
            **{
                k: statistics.median(r[k] for r in runs) if best.get(k) is not None else None
                for k in (
                    "syncs_per_frame",
                    "host_ms_per_frame",
                    "sync_wait_ms_per_frame",
                    "frame_wait_ms_per_frame",
                    "graph_build_ms_per_frame",
                )
            },
            "runs": runs,
        }
    return out


def _count(engine, batch: int) -> dict:
    """The steady frame's kernels (frame_kernels.py): by component on this tree, as launched on a baseline's."""
    from ops.bench.frame_kernels import count_frame, count_launched

    return count_frame(engine, batch) if hasattr(engine, "frame_step") else count_launched(engine, batch)


def reference_part(checkpoint: str, frames: int, repeats: int) -> dict:
    """mlx-audio's frame loop on our loaded weights (the same SesameModel class), codes only, batch 1."""
    import mlx.core as mx
    import numpy as np
    from mlx_audio.lm.sample_utils import make_sampler

    from ops.bench import kernels

    engine, voices = _load(checkpoint, "off", True, 1)
    model, preset = engine.model, voices.resolve(NO_PROMPT_VOICE)
    sampler = make_sampler(temp=preset.temperature, top_k=preset.top_k)
    text = engine.text_tokens(TEXT, preset.speaker)
    counts: list[int] = []

    def generate(n: int, count: bool = False) -> float:
        """`Model.generate`'s loop, less the Mimi decode of its results."""
        started = time.perf_counter()
        model.setup_caches(1)
        tokens, mask = mx.array(text.ids)[None], mx.array(text.mask)[None]
        pos = mx.arange(0, tokens.shape[1])[None].astype(mx.int32)
        samples = []
        for _ in range(n):
            if count:  # its graph traced with the fast ops as a GPU runs them (its values are not the model's)
                with kernels.gpu_fast_ops():
                    sample = model.generate_frame(tokens, mask, pos, sampler)
                counts.append(kernels.count([sample]))
            else:
                sample = model.generate_frame(tokens, mask, pos, sampler)
            if mx.all(sample == 0):
                break
            samples.append(sample)
            tokens = mx.expand_dims(mx.concat([sample, mx.zeros((1, 1)).astype(mx.int32)], axis=1), axis=1)
            mask = mx.expand_dims(
                mx.concat([mx.ones_like(sample).astype(mx.bool_), mx.zeros((1, 1)).astype(mx.bool_)], axis=1), axis=1
            )
            pos = pos[:, -1:] + 1
        codes = np.array(mx.stack(samples, axis=-1)) if samples else None
        model.reset_caches()
        assert codes is not None and codes.shape[-1] == n
        return time.perf_counter() - started

    generate(3)  # warm-up, as our engine gets
    totals = [generate(frames) for _ in range(repeats)]
    generate(6, count=True)
    return {
        "part": "reference",
        "frames": frames,
        "total_s": round(statistics.median(totals), 4),
        "frames_per_s": round(frames / statistics.median(totals), 2),
        "frames_per_s_best": round(frames / min(totals), 2),
        "syncs_per_frame": 1,
        "kernels_per_frame": int(statistics.median(counts[1:])),
        "runs": totals,
    }


def run(cmd: list[str], cwd: Path) -> dict:
    print(f"  $ {shlex.join(cmd[1:])}" + (f"   (in {cwd})" if cwd != PROJECT_ROOT else ""), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` exited with {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(rev: str) -> Path:
    """The baseline commit, checked out once in a worktree beside the repository's own, with this harness and
    its kernel counter written over its own (untracked) so the same loop harness runs on its engine."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = Path(tempfile.gettempdir()) / f"sesame-tts-baseline-{sha}"
    if not (tree / "serve_app").exists():
        subprocess.run(
            ["git", "worktree", "add", "--force", "--detach", str(tree), sha],
            cwd=PROJECT_ROOT,
            check=True,
            capture_output=True,
        )
    bench = tree / "ops" / "bench"  # a baseline from before the harnesses left the package has none
    bench.mkdir(parents=True, exist_ok=True)
    for name in (
        "__init__.py",
        "loop.py",
        "loop_report.py",
        "kernels.py",
        "frame_kernels.py",
        "dispatch.py",
        "metal_rules.py",
    ):
        (bench / name).write_text((Path(__file__).parent / name).read_text())
    return tree


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=["loop", "reference"], help="(internal) run one part here")
    parser.add_argument("--checkpoint", default="tiny", help="tiny, full or a checkpoint folder")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--compile", default="off,on", help="MLX_COMPILE values compared")
    parser.add_argument("--pipeline", default="on", choices=["on", "off"], help="(loop part)")
    parser.add_argument("--pipelines", default="on,off", help="the PIPELINE values compared on this tree")
    parser.add_argument("--baseline", help="a commit to compare the engine part with (e.g. the one before a change)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-engine-part", action="store_true", help="only the loop parts (full size: hours less)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "results" / "bench")
    parser.add_argument("--report", type=Path, help="only write the summary and Markdown of a results JSON again")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.report:
        from ops.bench.loop_report import summarize, to_markdown

        results = json.loads(args.report.read_text())
        batches = sorted({int(b) for parts in results["loop"].values() for p in parts for b in p["batches"]})
        results["summary"] = summarize(results, batches)
        args.report.write_text(json.dumps(results, indent=1) + "\n")
        args.report.with_suffix(".md").write_text(to_markdown(results, batches))
        print(to_markdown(results, batches))
        return
    if args.part == "loop":
        out = loop_part(args.checkpoint, args.frames, args.repeats, batches, args.compile, args.pipeline == "on")
        sys.stdout.write(json.dumps(out) + "\n")
        return
    if args.part == "reference":
        sys.stdout.write(json.dumps(reference_part(args.checkpoint, args.frames, args.repeats)) + "\n")
        return
    from serve_app.tools.bench.__main__ import checkpoint_path

    command = "python -m ops.bench.loop " + shlex.join(argv if argv is not None else sys.argv[1:])
    kind, folder = checkpoint_path(args.checkpoint, Settings.load().cache_dir)
    common = ["--checkpoint", str(folder), "--frames", str(args.frames), "--repeats", str(args.repeats)]
    trees = {"this": PROJECT_ROOT, **({"baseline": baseline_tree(args.baseline)} if args.baseline else {})}
    results: dict = {
        "checkpoint_kind": kind,
        "command": command,
        "frames": args.frames,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "machine": report.machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "engine": {},
        "loop": {},
        "reference": [],
    }
    py = sys.executable
    for r in range(args.rounds):
        print(f"[round {r + 1}/{args.rounds}]", file=sys.stderr, flush=True)
        for mode in args.compile.split(","):
            for name, tree in trees.items():
                if not args.skip_engine_part:
                    part = run(
                        [
                            py,
                            "-m",
                            "serve_app.tools.bench.engine",
                            "engine",
                            *common,
                            "--levels",
                            args.batches,
                            "--compile",
                            mode,
                            "--voice",
                            NO_PROMPT_VOICE,
                        ],
                        tree,
                    )
                    results["engine"].setdefault(f"{name} compile={mode}", []).append(part)
                for pipeline in args.pipelines.split(",") if name == "this" else ("on",):
                    part = run(
                        [
                            py,
                            "-m",
                            "ops.bench.loop",
                            "loop",
                            *common,
                            "--batches",
                            args.batches,
                            "--compile",
                            mode,
                            "--pipeline",
                            pipeline,
                        ],
                        tree,
                    )
                    label = f"this compile={mode} pipeline={pipeline}" if name == "this" else f"baseline compile={mode}"
                    results["loop"].setdefault(label, []).append(part)
        if not args.skip_reference:
            results["reference"].append(run([py, "-m", "ops.bench.loop", "reference", *common], PROJECT_ROOT))
    from ops.bench.loop_report import summarize, to_markdown

    results["summary"] = summarize(results, batches)
    folder_out = args.out / report.machine()["name"]
    folder_out.mkdir(parents=True, exist_ok=True)
    base = folder_out / f"loop-{kind}"
    base.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    md = to_markdown(results, batches)
    base.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {base}.json and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
