"""The in-process parts of the benchmark: our bare engine, and mlx-audio's own `Model.generate` loop.

Each part runs in a process of its own (`python -m serve_app.tools.bench.engine PART ...`) and prints one JSON
object, so its memory figures are its own and one part's MLX state cannot affect another's timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx

from serve_app.core.constants import FRAME_RATE
from serve_app.core.settings import Settings
from serve_app.engine.mlx_memory import memory_report
from serve_app.model.loading import load_engine

TEXT = "Hello, this is a quick benchmark of the speech server."  # one text chunk
VOICE = Settings().default_voice  # what users get (a reference clip as context): measured by default
NO_PROMPT_VOICE = "fast"  # the only voice mlx-audio's loop is compared on (it is run without a voice prompt)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def time_request(engine, request) -> tuple[Optional[float], float, float]:
    """(first PCM s, total s, longest gap between two PCM pieces s) of one request run in-process."""
    from serve_app.engine.runners import synthesize

    started = last = time.perf_counter()
    first, gap = None, 0.0
    for item in synthesize(engine, request):
        if isinstance(item, bytes):
            now = time.perf_counter()
            first = first if first is not None else now - started
            gap, last = max(gap, now - last), now
    return first, time.perf_counter() - started, gap


def engine_part(
    checkpoint: str, frames: int, repeats: int, levels: list[int], compile_mode: str, quantize: int, voice: str = VOICE
) -> dict:
    """Time to first PCM, frames/s and RTF for one request, then aggregate throughput with `levels`
    requests generated together (the same continuous batching the server uses)."""
    from serve_app.core.messages import SynthesisRequest
    from serve_app.engine.csm import select_device
    from serve_app.engine.runners import run_jobs, warm_up
    from serve_app.engine.scheduler import GenerationJob
    from serve_app.voices.presets import VoiceLibrary

    settings = Settings(model_id=checkpoint, mlx_compile=compile_mode, quantize=quantize, max_batch_size=max(levels))
    mx.set_default_device(select_device(settings.mlx_device))
    voices = VoiceLibrary.load(settings.voices_dir)
    started = time.perf_counter()
    engine = load_engine(settings, voices)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    warm_up(engine)
    warm_s = time.perf_counter() - started
    preset = voices.resolve(voice)
    audio_s = frames / FRAME_RATE

    def request(seed: int) -> SynthesisRequest:
        return SynthesisRequest([TEXT], preset, seed=seed, max_frames_per_chunk=frames)

    mx.reset_peak_memory()
    single = []
    for r in range(repeats):
        first, total, _ = time_request(engine, request(r))
        single.append({"first_pcm_s": first, "total_s": total})
    totals = [s["total_s"] for s in single]
    result = {
        "part": "engine",
        "compiled": engine.frame_step.compiled,
        "quantize": quantize,
        "load_s": round(load_s, 2),
        "warm_up_s": round(warm_s, 2),
        "frames": frames,
        "audio_s": audio_s,
        "runs": single,
        "first_pcm_ms": round(1000 * statistics.median(s["first_pcm_s"] for s in single), 1),
        "total_s": round(statistics.median(totals), 3),
        "frames_per_s": round(frames / statistics.median(totals), 3),
        "rtf": round(statistics.median(totals) / audio_s, 3),
        "concurrency": {},
    }
    for n in levels:
        firsts: dict[int, float] = {}
        t0 = time.perf_counter()

        def post(item, i):  # called within this iteration only
            if isinstance(item, bytes) and i not in firsts:  # noqa: B023
                firsts[i] = time.perf_counter() - t0  # noqa: B023

        jobs = [GenerationJob(request(100 + i), lambda item, i=i: post(item, i)) for i in range(n)]
        run_jobs(engine, jobs, max_batch=n)
        wall = time.perf_counter() - t0
        ttfb = list(firsts.values())
        result["concurrency"][str(n)] = {
            "wall_s": round(wall, 3),
            "audio_s_per_s": round(n * audio_s / wall, 3),
            "first_pcm_p50_ms": round(1000 * percentile(ttfb, 50), 1),
            "first_pcm_p95_ms": round(1000 * percentile(ttfb, 95), 1),
        }
    result["memory"] = memory_report()
    return result


def memory_part(checkpoint: str, quantize: int, voice: str = VOICE) -> dict:
    """Load (with QUANTIZE), generate one short request, and report memory: the QUANTIZE check at full size,
    where a full benchmark of quantized weights would take hours on a CPU (they are slower there)."""
    from serve_app.core.messages import SynthesisRequest
    from serve_app.engine.csm import select_device
    from serve_app.engine.runners import synthesize
    from serve_app.voices.presets import VoiceLibrary

    settings = Settings(model_id=checkpoint, quantize=quantize)
    mx.set_default_device(select_device(settings.mlx_device))
    voices = VoiceLibrary.load(settings.voices_dir)
    started = time.perf_counter()
    engine = load_engine(settings, voices)
    loaded = {"load_s": round(time.perf_counter() - started, 1), **memory_report()}
    started = time.perf_counter()
    items = list(synthesize(engine, SynthesisRequest([TEXT], voices.resolve(voice), seed=0, max_frames_per_chunk=2)))
    pcm = b"".join(i for i in items if isinstance(i, bytes))
    return {
        "part": "memory",
        "quantize": quantize,
        "after_load": loaded,
        "after_request": memory_report(),
        "request_s": round(time.perf_counter() - started, 1),
        "pcm_samples": len(pcm) // 2,
    }


def _hub_cache_with_mimi(checkpoint: Path, root: Path) -> Path:
    """A folder laid out like the Hugging Face hub cache, holding the checkpoint's Mimi weights under the
    repo mlx-audio hard-codes (kyutai/moshiko-pytorch-bf16), so its `Mimi.from_pretrained` finds them."""
    from serve_app.tools.tiny_checkpoint import MIMI_FILE

    snapshot = root / "models--kyutai--moshiko-pytorch-bf16" / "snapshots" / "bench"
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "models--kyutai--moshiko-pytorch-bf16" / "refs").mkdir(exist_ok=True)
    (root / "models--kyutai--moshiko-pytorch-bf16" / "refs" / "main").write_text("bench")
    link = snapshot / MIMI_FILE
    if not link.exists():
        link.symlink_to((checkpoint / "mimi" / MIMI_FILE).resolve())
    return root


def reference_part(checkpoint: str, frames: int, repeats: int) -> dict:
    """mlx-audio's `sesame.Model.generate` on the same weights, the same text and the same sampling."""
    folder = Path(checkpoint)
    config = json.loads((folder / "config.json").read_text())
    mimi_config = (
        json.loads((folder / "mimi" / "config.json").read_text()) if (folder / "mimi" / "config.json").exists() else {}
    )
    if mimi_config and mimi_config.get("seanet", {}).get("dimension") != 512:
        return {
            "part": "reference",
            "skipped": "mlx-audio always builds the full-size Mimi (mimi_202407); "
            "this checkpoint's Mimi is smaller, so only full-size checkpoints compare",
        }
    os.environ["HF_HUB_CACHE"] = str(_hub_cache_with_mimi(folder, Path(tempfile.mkdtemp(prefix="bench-hub-"))))
    os.environ["HF_HUB_OFFLINE"] = "1"
    from mlx_audio.lm.sample_utils import make_sampler
    from mlx_audio.tts.models.sesame.sesame import Model, load_llama3_tokenizer

    from serve_app.engine.csm import select_device
    from serve_app.voices.presets import VoiceLibrary

    mx.set_default_device(select_device("auto"))
    preset = VoiceLibrary.load(Settings().voices_dir).resolve(NO_PROMPT_VOICE)
    # Its AutoTokenizer would read the checkpoint's config.json (model_type "sesame") and fail: give it a
    # folder with the tokenizer files alone.
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer_dir / name).write_bytes((folder / name).read_bytes())
    config.update(text_tokenizer=str(tokenizer_dir), use_default_voice_prompt=False)
    started = time.perf_counter()
    model = Model(config)
    # Given a tokenizer folder, mlx-audio loads it without CSM's template (BOS text EOS): one token short of
    # what Sesame's generator (and our engine) feeds the model. Its own loader adds the template.
    model._text_tokenizer = load_llama3_tokenizer(str(tokenizer_dir))
    weights = model.sanitize(mx.load(str(folder / "model.safetensors")))
    weights = {k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - started
    sampler = make_sampler(temp=preset.temperature, top_k=preset.top_k)

    def generate(n: int) -> float:
        t0 = time.perf_counter()
        for _ in model.generate(TEXT, sampler=sampler, max_audio_length_ms=n * 80, voice_match=False, verbose=False):
            pass
        return time.perf_counter() - t0

    generate(3)  # warm-up, as our engine gets
    mx.reset_peak_memory()
    totals = [generate(frames) for _ in range(repeats)]
    audio_s = frames / FRAME_RATE
    return {
        "part": "reference",
        "load_s": round(load_s, 2),
        "frames": frames,
        "audio_s": audio_s,
        "runs": [{"total_s": t} for t in totals],
        "total_s": round(statistics.median(totals), 3),
        "frames_per_s": round(frames / statistics.median(totals), 3),
        "rtf": round(statistics.median(totals) / audio_s, 3),
        "memory": memory_report(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serve_app.tools.bench.engine")
    parser.add_argument("part", choices=["engine", "reference", "memory"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--quantize", type=int, default=0, choices=[0, 4, 8])
    parser.add_argument("--voice", default=VOICE)
    args = parser.parse_args(argv)
    if args.part == "engine":
        levels = [int(n) for n in args.levels.split(",")]
        out = engine_part(args.checkpoint, args.frames, args.repeats, levels, args.compile, args.quantize, args.voice)
    elif args.part == "memory":
        out = memory_part(args.checkpoint, args.quantize, args.voice)
    else:
        out = reference_part(args.checkpoint, args.frames, args.repeats)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
