"""Counting the kernels a graph launches on a GPU, from a graph MLX builds on any backend.

On a GPU, CSM at batch 1 is bound by launches (README, Performance), so what a frame costs a Mac is mostly
how many kernels it launches. MLX's graph says that exactly, read with `mx.export_to_dot`, once two things
the CPU backend does differently are taken out:

- MLX's fast ops (`mx.fast.rms_norm`, `layer_norm`, `rope`, `scaled_dot_product_attention`) are one kernel
  each on Metal and CUDA, but on the CPU backend they build their reference graph instead (rms_norm alone
  is eight primitives there). While counting (`gpu_fast_ops`) each is traced as one opaque node, a
  primitive that `mx.compile` cannot fuse, of the same shape and dtype, that depends on every input of the
  op, as the GPU's kernel is. Such a graph is for counting only: its values are not the op's.
- Views launch nothing: broadcasts, transposes, slices, reshapes, expand/squeeze, (un)flatten, as_strided,
  split, stop_gradient and depends change how an array is read, not its memory.

Everything else counts once: a matmul, a gather, a scatter, a sort, an attention, a reduction, a copy, a
random draw, and a group of elementwise operations that `mx.compile` fused (one `Compiled…` node). That is
a count of graph primitives; what Metal launches for them (a sort past 2,048 elements is four kernels, a
concatenate one copy per input, an input an op cannot read in place is copied first, an update in place
copies its buffer while another kernel reads it, ...) is dispatch.py's, which adds those to this count.
Not counted anywhere: the command-buffer boundaries Metal adds every few dozen kernels.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

# Primitives that only change how memory is read (MLX evaluates them without a kernel).
VIEWS = frozenset(
    {
        "AsStrided",
        "Broadcast",
        "BroadcastAxes",
        "Depends",
        "ExpandDims",
        "Flatten",
        "Reshape",
        "Slice",
        "Split",
        "Squeeze",
        "StopGradient",
        "Transpose",
        "Unflatten",
    }
)

_NODE = re.compile(r'label ="([^"]+)", shape=rectangle')


def primitives(outputs: list) -> list[str]:
    """The primitive of every node that evaluating `outputs` would run (evaluated arrays are inputs)."""
    with tempfile.NamedTemporaryFile(suffix=".dot") as dot:
        mx.export_to_dot(dot.name, *outputs)
        return _NODE.findall(Path(dot.name).read_text())


def kernels(names: list[str]) -> int:
    """How many of these primitives launch a kernel."""
    return sum(1 for name in names if name not in VIEWS)


def count(outputs: list) -> int:
    """Kernels launched by evaluating `outputs`."""
    return kernels(primitives(outputs))


def by_primitive(outputs: list) -> dict[str, int]:
    """Kernels by primitive name (fused groups as `Compiled`), most first: where a graph's kernels go."""
    names = ["Compiled" if n.startswith("Compiled") else n for n in primitives(outputs) if n not in VIEWS]
    return dict(Counter(names).most_common())


def _opaque(out_like: mx.array, *inputs, attention: bool = False) -> mx.array:
    """One kernel of `out_like`'s shape and dtype that reads every input, and that compile does not fuse: a
    softmax, or for an attention a running max (`CumMax`), so that a dispatch count can tell the attentions
    apart (dispatch.py: Metal's two-pass attention) by their inputs, (out_like, q, k, v, mask)."""
    deps = [a for a in inputs if isinstance(a, mx.array)]
    held = mx.depends([out_like], deps)[0]
    return mx.cummax(held, axis=-1) if attention else mx.softmax(held, axis=-1)


@contextmanager
def gpu_fast_ops() -> Iterator[None]:
    """Within this block MLX's fast ops trace as one opaque kernel each, as on Metal and CUDA (see above).
    Graphs built here are for counting only; a compiled function traced here keeps the stand-ins, so count
    with functions compiled inside the block."""
    fast = mx.fast
    real = {name: getattr(fast, name) for name in ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")}

    def rms_norm(x, weight, eps, **_):
        return _opaque(x, weight)

    def layer_norm(x, weight, bias, eps, **_):
        return _opaque(x, weight, bias)

    def rope(x, dims, *, traditional, base, scale, offset, freqs=None, **_):
        return _opaque(x, offset, freqs)

    def scaled_dot_product_attention(q, k, v, *, scale, mask=None, sinks=None, **_):
        out = q if q.shape[-1] == v.shape[-1] else mx.zeros((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)
        return _opaque(out, q, k, v, mask if isinstance(mask, mx.array) else None, sinks, attention=True)

    stand_ins = {
        "rms_norm": rms_norm,
        "layer_norm": layer_norm,
        "rope": rope,
        "scaled_dot_product_attention": scaled_dot_product_attention,
    }
    for name, fn in stand_ins.items():
        setattr(fast, name, fn)
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(fast, name, fn)
