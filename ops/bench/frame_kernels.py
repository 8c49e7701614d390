"""Kernels and Metal dispatches per CSM frame, by component, and the host's time to build a frame's graph (the
loop benchmark's `kernels_per_frame`, `dispatches_per_frame`, `kernels_by_component`,
`dispatches_by_component` and `graph_build_ms_per_frame`).

The frame counted is the one the scheduler launches in steady state (every row generated the frame before,
nobody joins): the engine's own `FrameStep` called on inputs of those shapes, traced with MLX's fast ops as
the GPU runs them (kernels.py), never evaluated, so a full-size frame is counted in seconds on any machine.
Components are each counted on their own (compiled on their own when the frame is): their sum equals the
frame's count uncompiled, and exceeds it compiled by what `mx.compile` fuses across their boundaries.
Mimi's share is one steady group's decode (GROUP_FRAMES frames, the rows together) over its frames.

Dispatches (dispatch.py) are the kernels plus what Metal launches beyond one per primitive, a range where an
update's copy depends on donation at run time, for the default chip and per chip (`dispatches_by_chip`). The
Metal-shaped graph (`metal_graph_nodes`) is the compiled frame's graph with each fast op one node, as a GPU
build has it (the counting stand-ins add a `Depends` node each, taken out).
"""

from __future__ import annotations

import inspect
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ops.bench import dispatch, kernels
from serve_app.engine.batch import CAPACITY_STEP

LONG_CAPACITY = 1024  # a backbone cache this long takes Max and Ultra chips' two-pass attention (dispatch.py)

# (engine.frame and codec.decode_graph are imported where used: `count_launched` also runs on a baseline tree
# from before them, `python -m ops.bench.loop --baseline`.)


def steady_inputs(engine, batch: int, capacity: int = CAPACITY_STEP) -> tuple:
    """FrameStep's arguments for `batch` rows in steady state, evaluated (they are the frame's inputs)."""
    args = engine.frame_step.steady_arguments(batch, capacity)
    mx.eval(args)
    return args


def _counted(fn, compiled: bool, *args) -> dict:
    """Kernels of `fn(*args)` as it runs (compiled: the fused groups), and its dispatches low and high."""
    outputs = (mx.compile(fn) if compiled else fn)(*args)
    base = kernels.count(_flat(outputs))
    extras = dispatch.Graph(fn, *args).extras(dispatch.CHIPS[dispatch.DEFAULT_CHIP])
    return {"kernels": base, "low": base + extras.certain, "high": base + extras.certain + extras.possible}


def _range(low: float, high: float) -> dict:
    return {"low": round(low, 1), "high": round(high, 1)}


def _flat(tree) -> list[mx.array]:
    return [leaf for _, leaf in tree_flatten(tree) if isinstance(leaf, mx.array)]


def count_frame(engine, batch: int) -> dict:
    """The steady frame's kernels and dispatches in all, by component, by chip and by primitive (fused groups
    as `Compiled`), compiled as the engine's frame is, and its graph's size."""
    from serve_app.engine.frame import FrameStep

    compiled = engine.frame_step.compiled
    inputs = steady_inputs(engine, batch)
    with kernels.gpu_fast_ops():
        step = FrameStep(engine.model, compiled)  # traced here, with the fast ops as a GPU runs them
        outputs = _flat(step(*inputs))
        names = kernels.primitives(outputs)
        total, primitives = kernels.kernels(names), kernels.by_primitive(outputs)
        traced = getattr(step, "traced", step._frame)  # a --baseline tree from before FrameStep.traced
        by_capacity = {
            capacity: _extras_by_chip(dispatch.Graph(traced, *steady_inputs(engine, batch, capacity)))
            for capacity in (CAPACITY_STEP, LONG_CAPACITY)
        }
        components = _components(engine, step, inputs, compiled)
        mimi = count_mimi_group(engine, batch)
    build = graph_build_ms(engine, batch)
    extras, per_frame = by_capacity[CAPACITY_STEP][dispatch.DEFAULT_CHIP], mimi["per_frame"]

    def with_mimi(e: dispatch.Dispatches, chip: str) -> dict:
        share = mimi["dispatches_by_chip"][chip]
        return _range(total + e.certain + share["low"], total + e.certain + e.possible + share["high"])

    return {
        "kernels_per_frame": round(total + per_frame),
        "dispatches_per_frame": with_mimi(extras, dispatch.DEFAULT_CHIP),
        "chip": dispatch.DEFAULT_CHIP,
        "frame_kernels": total,
        "frame_dispatches": _range(total + extras.certain, total + extras.certain + extras.possible),
        "frame_graph_nodes": len(names),  # views included: what the host builds (or a compiled call replays)
        "metal_graph_nodes": len(names) - names.count("Depends"),  # each fast op one node, as on a GPU
        "graph_build_ms": build,
        "kernels_by_component": {**{k: v["kernels"] for k, v in components.items()}, "mimi_per_frame": per_frame},
        "dispatches_by_component": {
            **{k: _range(v["low"], v["high"]) for k, v in components.items()},
            "mimi_per_frame": mimi["dispatches_by_chip"][dispatch.DEFAULT_CHIP],
        },
        "dispatch_extras": dict(extras.by_rule),
        "dispatches_by_chip": {
            chip: {f"capacity {c}": with_mimi(by_capacity[c][chip], chip) for c in by_capacity}
            for chip in dispatch.CHIPS
        },
        "components_sum_minus_frame": sum(v["kernels"] for v in components.values()) - total,
        "mimi_group": mimi,
        "by_primitive": primitives,
    }


def _extras_by_chip(graph: dispatch.Graph) -> dict:
    return {name: graph.extras(chip) for name, chip in dispatch.CHIPS.items()}


def _components(engine, step, inputs: tuple, compiled: bool) -> dict:
    """Each component of the frame alone, on evaluated inputs of its shapes: kernels and dispatches."""
    from serve_app.engine.frame import backbone_math, depth_frame, draw_noise, embed_frame

    model, args = engine.model, engine.model.args
    codebooks, vocab = args.audio_num_codebooks, args.audio_vocab_size
    prev, positions, keys, values, joined, rng, inv_temperature, kth = inputs
    batch, weights = prev.shape[0], step.weights
    last = mx.zeros((batch, model.backbone.norm.weight.shape[0]), dtype=model.audio_head.dtype)
    embed_code, sampling = _embed_and_sample(model, weights, compiled)
    embedded = [embed_code(i, prev[:, i]) for i in range(codebooks - 1)]
    logits = [mx.zeros((batch, vocab), dtype=model.audio_head.dtype) for _ in range(codebooks)]
    noise, _ = draw_noise(rng, codebooks, vocab)
    h = embed_frame(model, prev, weights.offsets)
    mx.eval(last, embedded, logits, noise, h)

    def embeddings(prev):
        return [embed_frame(model, prev, weights.offsets)] + [embed_code(i, prev[:, i]) for i in range(codebooks - 1)]

    def depth(last, embedded):
        seen = []

        def next_input(i, out):
            seen.append(out)
            return embedded[i] if i < len(embedded) else None

        depth_frame(model, weights, last, next_input)
        return seen

    return {
        "embeddings": _counted(embeddings, compiled, prev),
        "backbone": _counted(
            lambda h, p, k, v: backbone_math(model.backbone, weights, h, p, k, v), compiled, h, positions, keys, values
        ),
        "depth_decoder": _counted(depth, compiled, last, embedded),
        "noise": _counted(lambda rng: draw_noise(rng, codebooks, vocab), compiled, rng),
        "sampling": _counted(sampling, compiled, logits, noise, inv_temperature, kth),
    }


def _embed_and_sample(model, weights, compiled: bool):
    """The frame's code embedding and its sampling of the 32 codebooks (with the codes gathered), as this tree
    writes them (the top-k merge only where compiled), or as a baseline tree from before engine/sampling.py did
    (`python -m ops.bench.loop --baseline`: the sort-based threshold, the stack, the embedding table sliced each
    frame; or before `TopK` took `fused`: merged always)."""
    vocab = model.args.audio_vocab_size
    try:
        from serve_app.engine.frame import gather_codes
        from serve_app.engine.sampling import TopK, sample
    except ImportError:
        from serve_app.engine.frame import embed_code, sample

        def stacked(logits, noise, t, k):
            codes = [sample(x, noise[:, i], t, k) for i, x in enumerate(logits)]
            return mx.stack(codes, axis=1).astype(mx.int32)

        return (lambda i, tokens: embed_code(model, i, tokens)), stacked

    fused = [compiled] if "fused" in inspect.signature(TopK).parameters else []

    def sampling(logits, noise, t, k):
        top = TopK(k, vocab, weights.dtype, *fused)
        return gather_codes(weights, [sample(x, noise[:, i], t, top) for i, x in enumerate(logits)])

    return weights.embed_code, sampling


def count_mimi_group(engine, batch: int) -> dict:
    """One steady group's Mimi decode for `batch` aligned streams (after a first group, as in a request)."""
    from serve_app.engine.codec import MimiDecodeState, decode_graph

    first, group = engine.options.first_group_frames, engine.options.group_frames
    streams = [MimiDecodeState(engine.mimi_decoder) for _ in range(batch)]
    codes = np.random.default_rng(0).integers(0, 2048, size=(batch, engine.num_codebooks, first + group))
    traced = [MimiDecodeState(engine.mimi_decoder) for _ in range(batch)]  # the same state, for the export
    for states in (streams, traced):
        pcm, state = decode_graph(states, codes[:, :, :first].astype(np.int32))
        mx.eval(pcm, state)
    steady = codes[:, :, first:].astype(np.int32)
    pcm, state = decode_graph(streams, steady)
    count = kernels.count([pcm, *state])
    by_chip = _extras_by_chip(dispatch.Graph(lambda: (lambda pcm, state: [pcm, *state])(*decode_graph(traced, steady))))
    return {
        "frames": group,
        "kernels": count,
        "per_frame": round(count / group, 1),
        "dispatches_by_chip": {
            chip: _range((count + e.certain) / group, (count + e.certain + e.possible) / group)
            for chip, e in by_chip.items()
        },
        "dispatch_extras": dict(by_chip[dispatch.DEFAULT_CHIP].by_rule),
    }


def graph_build_ms(engine, batch: int, repeats: int = 20) -> dict:
    """Median host time to build one steady frame's graph, evaluating nothing (traced and, when compiled,
    compiled by a first call that is not timed): with the engine's own FrameStep (`cpu_graph`: MLX's fast ops
    expanded into their reference graphs, as this backend builds them) and with one traced under
    kernels.gpu_fast_ops (`metal_shaped`: each fast op one node, as a GPU's build has them; its stand-ins add
    a Depends node each, so it is a little over a GPU's)."""
    from serve_app.engine.frame import FrameStep

    inputs = steady_inputs(engine, batch)

    def median_ms(step) -> float:
        step(*inputs)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step(*inputs)
            times.append(time.perf_counter() - started)
        return round(1000 * statistics.median(times), 3)

    with kernels.gpu_fast_ops():
        metal = median_ms(FrameStep(engine.model, engine.frame_step.compiled))
    return {"cpu_graph": median_ms(engine.frame_step), "metal_shaped": metal}


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
