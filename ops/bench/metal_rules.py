"""The rules of what Metal launches for one primitive, from MLX 0.32's Metal backend (dispatch.py applies them
to a graph; ../shared/notes/metal-dispatch.md has the sources): the chips that change them, array layouts as
MLX tracks them (strides, in elements), and each rule's own count."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class Chip:
    """What of the dispatch rules depends on the GPU: its generation (M3 is 15) and whether it is a Max or an
    Ultra (architecture suffix 's' or 'd'), and whether it has the neural accelerators' GEMM (M5)."""

    name: str
    generation: int
    max_ultra: bool = False
    nax: bool = False


CHIPS = {
    "M1/M2": Chip("M1/M2", 14),
    "M1/M2 Max/Ultra": Chip("M1/M2 Max/Ultra", 14, max_ultra=True),
    "M3/M4": Chip("M3/M4", 16),
    "M3/M4 Max/Ultra": Chip("M3/M4 Max/Ultra", 16, max_ultra=True),
    "M5": Chip("M5", 17, nax=True),
}
DEFAULT_CHIP = "M3/M4"


@dataclass
class Array:
    shape: tuple
    strides: tuple
    dtype: object
    buffer: str  # the name of the array whose memory this one reads (itself unless a view)


# --- layouts ----------------------------------------------------------------------------------------------


def row_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def row_contiguous(shape, strides) -> bool:
    step = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size == 1:
            continue
        if stride != step:
            return False
        step *= size
    return True


def dense(shape, strides) -> bool:
    """Every element once, in some order of the axes (MLX's `contiguous` flag)."""
    dims = sorted((s, n) for n, s in zip(shape, strides) if n > 1)
    step = 1
    for stride, size in dims:
        if stride != step:
            return False
        step *= size
    return True


def reshape_copies(shape, strides, out_shape) -> bool:
    """MLX's `prepare_reshape` (common.cpp ~109): whether reshaping this layout needs a copy."""
    if row_contiguous(shape, strides) or math.prod(shape) == 0:
        return False
    dims = [[shape[0], strides[0]]] if shape else []
    for size, stride in zip(shape[1:], strides[1:]):  # collapse axes contiguous with the one before
        if size == 1:
            continue
        if dims[-1][0] == 1:
            dims[-1] = [size, stride]
        elif dims[-1][1] == size * stride:
            dims[-1] = [dims[-1][0] * size, stride]
        else:
            dims.append([size, stride])
    j = 0
    for n in out_shape:
        if j < len(dims) and dims[j][0] % n == 0:
            dims[j][0] //= n
            j += dims[j][0] == 1
        elif n != 1:
            return True
    return False


def reshaped_strides(shape, strides, out_shape) -> tuple:
    """Strides of a reshape that needs no copy: each output axis steps like the input's element it starts at."""
    if row_contiguous(shape, strides):
        return row_strides(out_shape)
    out = []
    for axis in range(len(out_shape)):
        step = math.prod(out_shape[axis + 1 :])
        out.append(_element_offset(shape, strides, step))
    return tuple(out)


def _element_offset(shape, strides, flat: int) -> int:
    offset = 0
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size:
            flat, index = divmod(flat, size)
            offset += index * stride
    return offset


def operand_copies(a: Array, vector: bool) -> bool:
    """matmul.cpp `check_transpose`: an operand is read in place if its last two axes are row- or column-major."""
    rows, cols = a.strides[-2], a.strides[-1]
    if cols == 1 and (not vector or rows == a.shape[-1]):
        return False
    if rows == 1 and (not vector or cols == a.shape[-2]):
        return False
    return not (a.shape[-1] == 1 and a.shape[-2] == 1)


def sort_dispatches(a: Array, axis: int) -> int:
    """sort.cpp `gpu_merge_sort`: 1 for one block, else block sort + (partition, merge) per doubling + copy out."""
    n = a.shape[axis]
    threads = (n + 3) // 4
    bn = 512 if threads > 256 else 256 if threads > 128 else 128 if threads > 64 else 64 if threads > 32 else 32
    if bn == 512 and a.dtype.size > 4:
        bn = 256
    blocks = -(-n // (bn * 4))
    return 1 if blocks <= 1 else 2 + 2 * math.ceil(math.log2(blocks))


def matmul_dispatches(a: Array, b: Array, chip: Chip) -> int:
    """matmul.cpp `Matmul::eval_gpu`: a GEMV or the wide GEMV is one kernel; a GEMM of few rows against a long
    K splits K (a partial and an accumulate kernel)."""
    m, n, k = a.shape[-2], b.shape[-1], a.shape[-1]
    batch = math.prod(a.shape[:-2]) if len(a.shape) > 2 else 1
    if min(m, n) == 1:
        return 1
    b_transposed = b.strides[-2] == 1 and b.shape[-2] > 1
    wide = (
        chip.generation >= 15 and 1 < m <= 15 and k % 4 == 0 and b_transposed and a.dtype in (mx.float16, mx.bfloat16)
    )
    if wide:
        return 1
    tiles = -(-m // 16) * -(-n // 16)
    nax = chip.nax and a.dtype != mx.float32
    split = not nax and batch == 1 and tiles <= (2048 if chip.max_ultra else 1024) and k // 16 >= 8 and k >= max(m, n)
    return 2 if split else 1


def attention_dispatches(q: Array, k: Array, chip: Chip) -> int:
    """scaled_dot_product_attention.cpp ~860-875: the vector kernel (queries <= 8) takes two passes on a Max or
    Ultra from 1,024 keys, and on any chip from 4,096 keys with grouped heads; else one kernel."""
    if q.shape[2] > 8:
        return 1
    keys = k.shape[2]
    return 2 if (chip.max_ultra and keys >= 1024) or (k.shape[1] < q.shape[1] and keys >= 4096) else 1


def conv_dispatches(x: Array, w: Array, arguments: list, chip: Chip) -> int:
    """conv.cpp `conv_1D_gpu` (Mimi's convolutions are 1-D): depthwise or implicit GEMM, one kernel; else the
    explicit GEMM: unfold, GEMM (which may split K), and a weight transpose first when grouped."""
    strides, _, _, kdil, idil, groups, flip = arguments[:7]
    channels, outs = x.shape[-1], w.shape[0]
    idil_one = all(d == 1 for d in idil)
    if idil_one and groups == channels == outs and all(s == 1 for s in strides) and all(d == 1 for d in kdil):
        return 1
    per_in, per_out = channels // groups, outs // groups
    if idil_one and (per_in <= 4 or per_in % 16 == 0) and (per_out <= 16 or per_out % 16 == 0):
        return 1
    rows = math.prod(x.shape[:-1])  # the unfolded input's rows (output positions, roughly)
    k = math.prod(w.shape[1:])
    gemm = matmul_dispatches(Array((rows, k), (k, 1), x.dtype, ""), Array((k, per_out), (1, k), w.dtype, ""), chip)
    return 1 + gemm + (1 if groups > 1 else 0)
