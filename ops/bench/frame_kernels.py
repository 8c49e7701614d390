"""Kernels per CSM frame, by component, and the host's time to build a frame's graph (the loop benchmark's
`kernels_per_frame`, `kernels_by_component` and `graph_build_ms_per_frame`).

The frame counted is the one the scheduler launches in steady state (every row generated the frame before,
nobody joins): the engine's own `FrameStep` called on inputs of those shapes, traced with MLX's fast ops as
the GPU runs them (kernels.py), never evaluated, so a full-size frame is counted in seconds on any machine.
Components are each counted on their own (compiled on their own when the frame is): their sum equals the
frame's count uncompiled, and exceeds it compiled by what `mx.compile` fuses across their boundaries.
Mimi's share is one steady group's decode (GROUP_FRAMES frames, the rows together) over its frames.
"""

from __future__ import annotations

import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ops.bench import kernels
from serve_app.engine.batch import CAPACITY_STEP

# (engine.frame and codec.decode_graph are imported where used: `count_launched` also runs on a baseline tree
# from before them, `python -m ops.bench.loop --baseline`.)


def steady_inputs(engine, batch: int, capacity: int = CAPACITY_STEP) -> tuple:
    """FrameStep's arguments for `batch` rows in steady state, evaluated (they are the frame's inputs)."""
    args = engine.frame_step.steady_arguments(batch, capacity)
    mx.eval(args)
    return args


def _counted(fn, compiled: bool, *args) -> int:
    outputs = (mx.compile(fn) if compiled else fn)(*args)
    return kernels.count(_flat(outputs))


def _flat(tree) -> list[mx.array]:
    return [leaf for _, leaf in tree_flatten(tree) if isinstance(leaf, mx.array)]


def count_frame(engine, batch: int) -> dict:
    """The steady frame's kernels in all, by component, and by primitive (fused groups as `Compiled`), compiled
    as the engine's frame is."""
    from serve_app.engine.frame import (
        FrameStep,
        backbone_math,
        depth_frame,
        draw_noise,
        embed_code,
        embed_frame,
        sample,
    )

    model, args, compiled = engine.model, engine.model.args, engine.frame_step.compiled
    codebooks, vocab = args.audio_num_codebooks, args.audio_vocab_size
    prev, positions, keys, values, joined, rng, inv_temperature, kth = inputs = steady_inputs(engine, batch)
    with kernels.gpu_fast_ops():
        step = FrameStep(model, compiled)  # traced here, with the fast ops as a GPU runs them
        outputs = _flat(step(*inputs))
        names = kernels.primitives(outputs)
        total, primitives = kernels.kernels(names), kernels.by_primitive(outputs)
        # Each component alone, on evaluated inputs of its shapes.
        last = mx.zeros((batch, model.backbone.norm.weight.shape[0]), dtype=model.audio_head.dtype)
        weights = step.weights
        embedded = [embed_code(model, i, prev[:, i]) for i in range(codebooks - 1)]
        logits = [mx.zeros((batch, vocab), dtype=model.audio_head.dtype) for _ in range(codebooks)]
        noise, _ = draw_noise(rng, codebooks, vocab)
        h = embed_frame(model, prev, weights.offsets)
        mx.eval(last, embedded, logits, noise, h)

        def depth(last, embedded):
            seen = []

            def next_input(i, out):
                seen.append(out)
                return embedded[i] if i < len(embedded) else None

            depth_frame(model, weights, last, next_input)
            return seen

        components = {
            "embeddings": _counted(
                lambda prev: (
                    [embed_frame(model, prev, weights.offsets)]
                    + [embed_code(model, i, prev[:, i]) for i in range(codebooks - 1)]
                ),
                compiled,
                prev,
            ),
            "backbone": _counted(
                lambda h, p, k, v: backbone_math(model.backbone, weights, h, p, k, v),
                compiled,
                h,
                positions,
                keys,
                values,
            ),
            "depth_decoder": _counted(depth, compiled, last, embedded),
            "noise": _counted(lambda rng: draw_noise(rng, codebooks, vocab), compiled, rng),
            "sampling": _counted(
                lambda logits, noise, t, k: mx.stack(
                    [sample(x, noise[:, i], t, k) for i, x in enumerate(logits)], axis=1
                ).astype(mx.int32),
                compiled,
                logits,
                noise,
                inv_temperature,
                kth,
            ),
        }
        mimi = count_mimi_group(engine, batch)
    return {
        "kernels_per_frame": round(total + mimi["per_frame"]),
        "frame_kernels": total,
        "frame_graph_nodes": len(names),  # views included: what the host builds (or a compiled call replays)
        "kernels_by_component": {**components, "mimi_per_frame": mimi["per_frame"]},
        "components_sum_minus_frame": sum(components.values()) - total,
        "mimi_group": mimi,
        "by_primitive": primitives,
    }


def count_mimi_group(engine, batch: int) -> dict:
    """One steady group's Mimi decode for `batch` aligned streams (after a first group, as in a request)."""
    from serve_app.engine.codec import MimiDecodeState, decode_graph

    first, group = engine.options.first_group_frames, engine.options.group_frames
    streams = [MimiDecodeState(engine.mimi_decoder) for _ in range(batch)]
    codes = np.random.default_rng(0).integers(0, 2048, size=(batch, engine.num_codebooks, first + group))
    pcm, state = decode_graph(streams, codes[:, :, :first].astype(np.int32))
    mx.eval(pcm, state)
    pcm, state = decode_graph(streams, codes[:, :, first:].astype(np.int32))
    count = kernels.count([pcm, *state])
    return {"frames": group, "kernels": count, "per_frame": round(count / group, 1)}


def graph_build_ms(engine, batch: int, repeats: int = 20) -> float:
    """Median host time to build one steady frame's graph with the engine's own FrameStep (traced and, when
    compiled, compiled by a first call that is not timed), evaluating nothing."""
    inputs = steady_inputs(engine, batch)
    engine.frame_step(*inputs)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.frame_step(*inputs)
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3)


def count_launched(engine, batch: int) -> dict:
    """Kernels per steady frame as the loop launches them, counted on a short run's own graphs (the median
    launch after the first, every row generating) and Mimi's share from its steady group decode: the same counting
    as `count_frame`, for any tree whose scheduler has a `trace` hook, the loop before the one-function
    frame included (`--baseline`). The run evaluates stand-in graphs: its audio is not CSM's."""
    from serve_app.core.messages import SynthesisRequest, VoiceParams
    from serve_app.engine import codec
    from serve_app.engine.scheduler import BatchScheduler, GenerationJob

    launched, mimi = [], []
    decode, launch = codec._decode_batch, mx.async_eval

    def counted_decode(streams, codes):
        steady = streams[0].frames > 0  # a first group restarts the streams' state: not the steady cost
        if steady:
            mx.async_eval = lambda *outputs: mimi.append((kernels.count(list(outputs)), codes.shape[-1]))
        try:
            return decode(streams, codes)
        finally:
            mx.async_eval = launch

    with kernels.gpu_fast_ops():
        for name, cls_args in _step_objects(engine).items():  # compiled functions traced inside the block
            setattr(engine, name, cls_args[0](*cls_args[1:]))
        codec._decode_batch = counted_decode
        try:
            scheduler = BatchScheduler(engine, batch)
            scheduler.trace = lambda outputs: launched.append(kernels.count(outputs))
            frames = engine.options.first_group_frames + engine.options.group_frames + 1
            for seed in range(batch):
                preset = VoiceParams(name="count")
                request = SynthesisRequest(["Hello there."], preset, seed=seed, max_frames_per_chunk=frames)
                scheduler.add(GenerationJob(request, lambda item: None))
            while scheduler.active:
                scheduler.step()
        finally:
            codec._decode_batch = decode
            for name, cls_args in _step_objects(engine).items():  # back to compiled functions traced outside
                setattr(engine, name, cls_args[0](*cls_args[1:]))
    count, group = max(mimi, key=lambda m: m[1])
    frame = int(statistics.median(launched[1:]))  # the first launch starts the batch (no backbone step)
    return {
        "kernels_per_frame": round(frame + count / group),
        "frame_kernels": frame,
        "mimi_group": {"frames": group, "kernels": count, "per_frame": round(count / group, 1)},
    }


def _step_objects(engine) -> dict:
    """The engine's compiled-or-not frame objects, as (class, its arguments) to build anew: this tree's one
    FrameStep, or the two calls of the loop before it."""
    if hasattr(engine, "frame_step"):
        return {"frame_step": (type(engine.frame_step), engine.model, engine.frame_step.compiled)}
    compiled = engine.frame_decoder.compiled
    return {
        "frame_decoder": (type(engine.frame_decoder), engine.model, compiled),
        "backbone_step": (type(engine.backbone_step), engine.model.backbone, compiled),
    }
