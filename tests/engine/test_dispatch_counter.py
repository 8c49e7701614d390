"""The dispatch counter (ops/bench/dispatch.py, metal_rules.py) on graphs whose Metal dispatches are derived by
hand from MLX 0.32's Metal backend (file and function named at each test), on the frame's cuts it measured,
and the top-k threshold that avoids the multi-block sort, value for value against the sort."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ops.bench import dispatch, kernels
from ops.bench.metal_rules import CHIPS
from serve_app.engine.sampling import SORT_BLOCK, TopK

KEY = mx.random.key(0)


def evaluated(*shapes, dtype=mx.float32):
    arrays = [mx.random.normal(s, key=k).astype(dtype) for s, k in zip(shapes, mx.random.split(KEY, len(shapes)))]
    mx.eval(arrays)
    return arrays


@pytest.mark.parametrize(("vocab", "expected"), [(2048, 1), (2051, 4), (4097, 6)])
def test_a_sort_is_one_block_up_to_2048_and_four_kernels_past_it(vocab, expected):
    # sort.cpp `gpu_merge_sort`: tn = 4, bn = 512 once n > 1024, so one block holds 2,048 (4-byte or smaller
    # types). More blocks: `multi_block_sort` launches the block sort, then a partition and a merge for each
    # doubling of the merged tiles (`for merge_tiles = 2; merge_tiles / 2 < n_blocks`), then the copy out:
    # 2 blocks -> 1 + 2 + 1 = 4; 3 blocks -> 1 + 4 + 1 = 6.
    (x,) = evaluated((1, vocab), dtype=mx.bfloat16)
    counted = dispatch.count(lambda x: mx.sort(x, axis=-1), x)
    assert (counted["kernels"], counted["low"], counted["high"]) == (1, expected, expected)


def test_a_stack_of_32_is_32_copies():
    # slicing.cpp `concatenate_gpu`: one `copy_gpu_inplace` per input into its slice of the output; a stack is
    # a concatenate of expanded inputs (the expansions are views).
    codes = evaluated(*[(1,)] * 32)
    assert dispatch.count(lambda *c: mx.stack(c, axis=1), *codes)["low"] == 32


def test_a_transposed_view_into_matmul_is_read_in_place_and_a_strided_one_is_copied():
    # matmul.cpp `check_transpose`: an operand whose last two axes are row- or column-major is read in place
    # (a transposed weight view is column-major); anything else is `contiguous_copy_gpu`'d first.
    x, w, t, o = evaluated((4, 64), (32, 64), (4, 8, 2, 16), (128, 16))
    assert dispatch.count(lambda x, w: x @ w.T, x, w)["low"] == 1
    strided = dispatch.count(lambda x, w: x[:, ::2] @ w[:, ::2].T, x, w)
    assert strided["low"] == 3 and strided["by_rule"] == {"matmul operand copy": 2}
    # common.cpp `prepare_reshape`: moving 2 positions past 8 heads cannot be a view, so the reshape copies.
    moved = dispatch.count(lambda t, o: t.swapaxes(1, 2).reshape(8, 128) @ o, t, o)
    assert moved["by_rule"]["reshape copy"] == 1
    one = (t * 1)[:, :, :1] * 1  # one position: moving it past the heads is a view
    assert (
        "reshape copy" not in dispatch.count(lambda t, o: (t * 1).swapaxes(1, 2).reshape(4, 128) @ o, one, o)["by_rule"]
    )


def test_a_one_row_operand_must_have_its_width_as_row_stride():
    # `check_transpose(..., is_vector = M == 1)`: a one-row operand is read in place only if its row stride is
    # its width: the last row of a (1, 2, D) view (row stride 2D) is copied, the same row sliced whole is not.
    x, w = evaluated((2, 64), (64, 32))
    assert dispatch.count(lambda x: x.reshape(1, 2, 64)[:, -1, :] @ w, x)["by_rule"] == {"matmul operand copy": 1}
    assert dispatch.count(lambda x: x[-1:] @ w, x)["by_rule"] == {}


def test_a_slice_update_copies_unless_nothing_else_holds_its_buffer():
    # indexing / primitives.cpp `SliceUpdate::eval_gpu` -> copy.cpp `copy_gpu`: the input is donated when
    # `is_donatable()` (array.h: nothing else holds it), else copied whole first; then the update is copied in.
    cache, k = evaluated((1, 8, 33, 64), (1, 8, 1, 64))

    def owned(cache, k):
        c = cache * 1  # made here, read by nothing else: donated
        c[..., 0:1, :] = k
        return c

    def held(cache, k):
        c = cache * 1
        total = c.sum()  # a live reference still to run: copied for certain
        c[..., 0:1, :] = k
        return c, total

    def read_before(cache, k):
        c = cache * 1
        s = c[..., :1, :] * 2  # read by a kernel launched before the update: copied unless the GPU is done
        c[..., 1:2, :] = s
        return c

    def the_callers(cache, k):
        cache[..., 0:1, :] = k  # the caller's array: copied unless the caller let go of it
        return cache

    assert dispatch.count(owned, cache, k) | {"by_rule": {}} == {"kernels": 2, "low": 2, "high": 2, "by_rule": {}}
    assert dispatch.count(held, cache, k)["low"] == 3 + 1
    assert (dispatch.count(read_before, cache, k)["low"], dispatch.count(read_before, cache, k)["high"]) == (3, 4)
    assert (dispatch.count(the_callers, cache, k)["low"], dispatch.count(the_callers, cache, k)["high"]) == (1, 2)


def test_a_convolution_copies_a_weight_view_and_a_transposed_one_unfolds():
    # conv.cpp `conv_1D_gpu`: `ensure_row_contiguous` on input and weight; an implicit GEMM is one kernel; an
    # input-dilated (transposed) convolution takes `explicit_gemm_conv_ND_gpu`: the unfold, then a GEMM.
    x, w, stored = evaluated((1, 16, 32), (64, 3, 32), (64, 32, 3))
    assert dispatch.count(lambda x, w: mx.conv1d(x, w), x, w)["low"] == 1
    weight_view = stored.swapaxes(1, 2)  # (O, K, C) read from (O, C, K), as mlx-audio's loader leaves Mimi's
    mx.eval(weight_view)
    assert dispatch.count(lambda x, w: mx.conv1d(x, w), x, weight_view)["by_rule"] == {"conv input copy": 1}
    ncl = dispatch.count(lambda x, w: mx.conv1d(x.swapaxes(1, 2).swapaxes(1, 2) * 1, w), x, w)
    assert ncl["by_rule"] == {}
    assert dispatch.count(lambda x, w: mx.conv1d(x.swapaxes(1, 2).T.T.swapaxes(1, 2), w), x, w)["low"] == 1
    (wt,) = evaluated((64, 4, 32))
    transposed = dispatch.count(lambda x, w: mx.conv_transpose1d(x, w, stride=2), x, wt)
    assert transposed["by_rule"].get("conv unfold and GEMM", 0) >= 1


def test_the_chip_table_splits_two_row_gemms_and_long_attention():
    # matmul.cpp: the wide GEMV takes 2..15 rows of 16-bit types from generation 15 (M3) on; before it (and for
    # float32) a GEMM of few rows against a long K splits K: a partial and an accumulate kernel.
    # scaled_dot_product_attention.cpp ~875: Max/Ultra ('s'/'d') take two passes from 1,024 keys.
    x, w = evaluated((2, 1024), (1024, 1024), dtype=mx.bfloat16)
    graph = dispatch.Graph(lambda x, w: x @ w.T, x, w)
    assert graph.extras(CHIPS["M1/M2"]).by_rule == {"matmul split K": 1}
    assert graph.extras(CHIPS["M3/M4"]).by_rule == {}
    q, k = evaluated((1, 32, 1, 64), (1, 8, 1024, 64), dtype=mx.bfloat16)
    with kernels.gpu_fast_ops():
        attention = dispatch.Graph(lambda q, k: mx.fast.scaled_dot_product_attention(q, k, k, scale=0.1), q, k)
    assert attention.extras(CHIPS["M3/M4 Max/Ultra"]).by_rule == {"two-pass attention": 1}
    assert attention.extras(CHIPS["M3/M4"]).by_rule == {}


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_the_top_k_threshold_without_the_long_sort_is_the_sorts_value(dtype):
    vocab, rows = SORT_BLOCK + 3, 64
    rng = np.random.default_rng(7)
    # Coarse values (many ties), the tail often among the largest, and every top_k the API allows at the edges.
    logits = mx.array(rng.integers(-8, 9, size=(rows, vocab)).astype(np.float32) / 4).astype(dtype)
    logits[:8, SORT_BLOCK:] = 10
    top_k = np.concatenate([[1, 2, 3, 4, 5, 50, 2047, 2048], rng.integers(1, 2049, size=rows - 8)])
    kth = mx.array((vocab - top_k)[:, None].astype(np.int32))
    expected = mx.take_along_axis(mx.sort(logits, axis=-1), kth, axis=-1)
    got = TopK(kth, vocab, dtype).threshold(logits)
    assert got.dtype == expected.dtype and mx.array_equal(got, expected).item()
    assert mx.array_equal(mx.compile(lambda x, k: TopK(k, vocab, dtype).threshold(x))(logits, kth), expected).item()


def test_the_frames_cuts_show_in_its_count(engine):
    """The tiny checkpoint has CSM's vocabulary (2,051) and layout: its frame pays no stack, no cache copy,
    and launches as many dispatches at the top of the range as at the bottom; compiled (as a Mac runs it), no
    multi-block sort either. Uncompiled (this backend's default) it sorts the whole vocabulary: one kernel
    where the hand merge would be ~20 unfused ones, on a GPU four."""
    from ops.bench.frame_kernels import count_frame, steady_inputs
    from serve_app.engine.frame import FrameStep

    counted = count_frame(engine, 1)
    assert counted["frame_dispatches"]["low"] == counted["frame_dispatches"]["high"]
    assert not {"update copy", "update copy (unless donated)"} & set(counted["dispatch_extras"])
    codebooks = engine.model.args.audio_num_codebooks
    assert counted["dispatch_extras"].get("multi-block sort") == (0 if engine.frame_step.compiled else 3 * codebooks)
    traced = dispatch.Graph(FrameStep(engine.model, compiled=True).traced, *steady_inputs(engine, 1))
    assert "multi-block sort" not in traced.extras(CHIPS[dispatch.DEFAULT_CHIP]).by_rule
    assert counted["dispatch_extras"].get("concatenate copies", 0) <= 1
    assert counted["dispatches_per_frame"]["low"] >= counted["kernels_per_frame"]
    for chip, at in counted["dispatches_by_chip"].items():
        assert at["capacity 1024"]["high"] >= at["capacity 256"]["high"] >= counted["frame_dispatches"]["low"], chip
