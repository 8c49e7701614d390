"""Two in-process campaign parts, each printing one JSON line: Mimi in float32 against bfloat16, and the
idle unload's reload on the model deployment class itself (no Ray).

    python -m ops.bench.parts mimi --checkpoint DIR --frames 8 --repeats 3
    python -m ops.bench.parts reload --checkpoint DIR --idle-s 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from serve_app.core.settings import Settings
from serve_app.tools.bench.engine import TEXT, VOICE


def mimi_part(checkpoint: str, frames: int, repeats: int) -> dict:
    """Mimi alone in float32 (Sesame's way, MIMI_DTYPE's default) and bfloat16, interleaved: streaming decode
    time per frame, the codec's memory, and how far apart the two decodes and prompt encodings are."""
    import numpy as np

    from serve_app.engine.checkpoint import _layout, load_mimi
    from serve_app.engine.codec import MimiDecoder, MimiDecodeState
    from serve_app.engine.csm import select_device

    mx.set_default_device(select_device("auto"))
    files = _layout(Path(checkpoint))
    codecs = {dtype: load_mimi(files, dtype) for dtype in ("float32", "bfloat16")}
    sizes = {
        dtype: sum(v.nbytes for _, m in mimi.named_modules() for v in m.values() if isinstance(v, mx.array))
        for dtype, mimi in codecs.items()
    }
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2048, size=(32, frames)).astype(np.int32)
    clip = (np.sin(np.arange(24000 * 2) / 7.0) * 0.3 + rng.standard_normal(48000) * 0.05).astype(np.float32)
    decoders = {dtype: MimiDecoder(mimi, compiled=False) for dtype, mimi in codecs.items()}
    times: dict[str, list[float]] = {dtype: [] for dtype in codecs}
    pcm: dict[str, np.ndarray] = {}
    for _ in range(repeats + 1):  # the first round warms up
        for dtype, decoder in decoders.items():
            stream = MimiDecodeState(decoder)
            started = time.perf_counter()
            pcm[dtype] = stream.decode(codes)
            times[dtype].append((time.perf_counter() - started) / frames)
    noise = pcm["float32"] - pcm["bfloat16"]
    snr = 10 * np.log10(np.sum(pcm["float32"] ** 2) / max(np.sum(noise**2), 1e-30))
    encoded = {dtype: np.array(mimi.encode(mx.array(clip)[None, None])[0]) for dtype, mimi in codecs.items()}
    return {
        "part": "mimi",
        "frames": frames,
        "repeats": repeats,
        "decode_ms_per_frame": {d: round(1000 * statistics.median(t[1:]), 2) for d, t in times.items()},
        "memory_mb": {d: round(b / 2**20, 1) for d, b in sizes.items()},
        "decode_snr_db_bf16_vs_f32": round(float(snr), 1),
        "prompt_codes_equal": f"{int((encoded['float32'] == encoded['bfloat16']).sum())}/{encoded['float32'].size}",
    }


def reload_part(checkpoint: str, idle_s: float) -> dict:
    """IDLE_UNLOAD_S on the model deployment class itself (no Ray): memory loaded and after the idle unload,
    and the first PCM of a request that finds the weights loaded vs released (the reload included)."""
    import asyncio

    from serve_app.core.messages import SynthesisRequest
    from serve_app.model.replica import CSMModel
    from serve_app.voices.presets import VoiceLibrary

    settings = Settings(model_id=checkpoint, idle_unload_s=idle_s)
    voices = VoiceLibrary.load(settings.voices_dir)
    model = CSMModel(settings, voices)

    def wait(state: str) -> dict:
        while (health := asyncio.run(model.health()).body())["status"] != state:
            if health["status"] in ("failed", "unhealthy"):
                raise RuntimeError(health.get("error"))
            time.sleep(0.05)
        return health

    async def first_pcm() -> float:
        started = time.perf_counter()
        request = SynthesisRequest([TEXT], voices.resolve(VOICE), seed=0, max_frames_per_chunk=2)
        first = None
        async for item in model.generate(request):
            if first is None and isinstance(item, bytes):
                first = time.perf_counter() - started
        return first

    loaded = wait("ready")
    warm = min(asyncio.run(first_pcm()) for _ in range(2))  # the first request after a load pays first calls
    unloaded = wait("unloaded")
    cold = asyncio.run(first_pcm())
    reloaded = wait("ready")
    model._worker.stop()
    return {
        "part": "reload",
        "voice": VOICE,
        "first_load_s": loaded["last_load_s"],
        "reload_s": reloaded["last_load_s"],
        "first_pcm_loaded_s": round(warm, 3),
        "first_pcm_after_unload_s": round(cold, 3),
        "memory_loaded": loaded["memory"],
        "memory_unloaded": unloaded["memory"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.parts")
    parser.add_argument("part", choices=["mimi", "reload"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=2.0, help="reload: IDLE_UNLOAD_S")
    args = parser.parse_args(argv)
    if args.part == "mimi":
        out = mimi_part(args.checkpoint, args.frames, args.repeats)
    else:
        out = reload_part(args.checkpoint, args.idle_s)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
