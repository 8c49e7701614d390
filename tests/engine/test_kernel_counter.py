"""The kernel counter (ops/bench/kernels.py, frame_kernels.py) on graphs whose count is known by hand, and on
the frame: what it counts for a frame is what the loop launches, its components add up, and a compiled frame
launches the same kernels whatever the batch size."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from ops.bench import kernels
from ops.bench.frame_kernels import count_frame
from serve_app.core.messages import SynthesisRequest
from serve_app.core.settings import Settings
from serve_app.engine.frame import FrameStep
from serve_app.engine.scheduler import BatchScheduler, GenerationJob
from serve_app.model.loading import load_engine

KEY = mx.random.key(0)


def evaluated(*shapes):
    arrays = [mx.random.normal(shape, key=k) for shape, k in zip(shapes, mx.random.split(KEY, len(shapes)))]
    mx.eval(arrays)
    return arrays


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
def test_a_two_matmul_mlp_is_three_kernels(compiled):
    x, w1, w2 = evaluated((2, 8), (8, 16), (16, 8))

    def mlp(x):
        return nn.relu(x @ w1) @ w2  # matmul, relu (MLX compiles it: one fused group), matmul

    assert kernels.count([(mx.compile(mlp) if compiled else mlp)(x)]) == 3


def test_views_are_free_and_a_fused_group_counts_once():
    (x,) = evaluated((4, 8))

    def chain(x):
        return mx.exp(x * 2 + 1).T.reshape(-1)[::2][None]  # three elementwise ops, four views

    assert kernels.count([chain(x)]) == 3
    assert kernels.count([mx.compile(chain)(x)]) == 1
    assert kernels.by_primitive([mx.compile(chain)(x)]) == {"Compiled": 1}


def test_sort_gather_and_argmax_count_once_each():
    (x,) = evaluated((3, 50))
    threshold = mx.take_along_axis(mx.sort(x, axis=-1), mx.array([[45]] * 3), axis=-1)
    assert kernels.count([mx.argmax(x - threshold, axis=-1)]) == 4  # sort, gather, subtract, argmax


def test_fast_ops_count_as_one_kernel_each_as_on_a_gpu():
    x, q, k = evaluated((2, 1, 64), (1, 4, 1, 16), (1, 4, 8, 16))
    norm = nn.RMSNorm(64)
    mx.eval(norm.parameters())
    assert kernels.count([norm(x)]) > 1  # the CPU backend builds rms_norm's reference graph
    with kernels.gpu_fast_ops():
        assert kernels.count([norm(x)]) == 1
        assert kernels.count([mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25, mask="causal")]) == 1
        rotated = mx.fast.rope(q, 16, traditional=True, base=1e4, scale=1.0, offset=mx.array(3))
        assert kernels.count([rotated]) == 1
        assert rotated.shape == q.shape and rotated.dtype == q.dtype

        def around(x):
            return norm(x * 2) + 1

        # Compile cannot fuse across the opaque op: multiply, rms_norm, add.
        assert kernels.count([mx.compile(around)(x)]) == 3
    assert kernels.count([norm(x)]) > 1  # the real ops are back


def test_the_frame_counted_is_the_frame_the_loop_launches(engine, voices):
    counted = count_frame(engine, 2)
    launched = []
    with kernels.gpu_fast_ops():  # the loop's own launches, traced as a GPU runs them
        scheduler = BatchScheduler(engine, 2)
        scheduler.trace = lambda outputs: launched.append(kernels.count(outputs))
        frame_step = engine.frame_step
        engine.frame_step = FrameStep(engine.model, compiled=False)
        try:
            for seed in (1, 2):
                request = SynthesisRequest(["Hello."], voices.resolve("fast"), seed=seed, max_frames_per_chunk=4)
                scheduler.add(GenerationJob(request, lambda item: None))
            while scheduler.active:
                scheduler.step()
        finally:
            engine.frame_step = frame_step
    # The first launch starts the batch (no backbone step); then every launch is a steady frame (its outputs
    # are the frame's, plus the rows' cache: nothing else is launched with it).
    assert launched[1:] == [counted["frame_kernels"]] * (len(launched) - 1)
    components = counted["kernels_by_component"]
    assert sum(v for k, v in components.items() if k != "mimi_per_frame") == counted["frame_kernels"]
    assert counted["components_sum_minus_frame"] == 0  # nothing fuses uncompiled
    assert counted["kernels_per_frame"] == round(counted["frame_kernels"] + components["mimi_per_frame"])


@pytest.mark.slow  # a compiled engine's Mimi compiles its codebook decode with a C++ compiler on the CPU backend
def test_a_compiled_frame_launches_fewer_kernels_and_the_same_at_any_batch(tiny_checkpoint, engine):
    compiled = load_engine(Settings(model_id=str(tiny_checkpoint), mlx_compile="on"))
    one, four = count_frame(compiled, 1), count_frame(compiled, 4)
    assert one["frame_kernels"] == four["frame_kernels"] < count_frame(engine, 1)["frame_kernels"]
    assert four["kernels_per_frame"] <= 1.1 * one["kernels_per_frame"]
    assert one["components_sum_minus_frame"] >= 0  # compile may fuse across components, never add kernels
