"""What Metal launches for an MLX graph: dispatches, not graph nodes (issue 35; rules with their places in
MLX 0.32's source: ../shared/notes/metal-dispatch.md, restated per rule below).

kernels.py counts a graph's primitives, one kernel each. Metal launches more for some of them, and which
depends on shapes, memory layouts and the chip, none of which the graph's node names carry. This module
reads them from the graph MLX exports (`mx.export_function` with a callback: every primitive with its
arguments and the shapes and dtypes of its inputs and outputs, after the same simplification `mx.compile`
makes, before fusion), follows every array's strides through the views, and adds what each primitive
launches beyond its one kernel:

- **sort** (argsort, partition, argpartition: Metal partitions by sorting, sort.cpp ~340): one block sorts up
  to 512 threads x 4 = 2,048 elements (256 x 4 for 8-byte types); above that, a block sort, a partition and
  a merge per doubling of the blocks, and a copy out (sort.cpp ~283-312, ~114-260): 4 kernels at 2,051.
- **concatenate** (a stack is one): one copy kernel per non-empty input (slicing.cpp ~14-42).
- **copies of inputs an op cannot read in place**: a reshape of a view whose layout cannot be reshaped
  (`prepare_reshape`, common.cpp ~109); a matmul operand whose last two axes are neither row- nor
  column-major (matmul.cpp `check_transpose` ~27-43); a convolution's input or weight that is not
  row-contiguous (conv.cpp `ensure_row_contiguous`, ~1430).
- **updates in place** (slice update, scatter, put_along_axis, masked scatter): the update kernel, plus a
  copy of the whole buffer when it cannot be donated (`array::is_donatable`: nothing else holds it). A
  buffer another pending kernel still reads is copied for certain; one only read by kernels launched
  before it, or an input of the graph, is copied unless the GPU has finished with it (Metal's eval keeps
  every input's buffer until its command buffer completes, eval.cpp ~47-66): a range, low to high.
- **convolution's own kernels**: depthwise and implicit-GEMM convolutions are one kernel; an input-dilated
  (transposed) or oddly grouped one unfolds and then multiplies (conv.cpp ~114-320): a weight transpose
  for groups, the unfold, and the GEMM, which may split K.
- **matmul's split K** and the chip table (matmul.cpp ~895-945, ~1320-1360): a GEMM of a few rows against
  a long K splits into a partial and an accumulate kernel, except where the chip has the wide GEMV
  (M3 and later, 16-bit types, up to 15 rows) or the neural accelerators (M5); Max and Ultra split
  larger sizes, and take a two-pass attention from 1,024 keys (scaled_dot_product_attention.cpp ~875).

- **attention**: the vector kernel (up to 8 queries) takes two passes on a Max or Ultra once the keys reach
  1,024, and on every chip from 4,096 keys with grouped heads (scaled_dot_product_attention.cpp ~860-875).

Everything else is one kernel, views none: the base count stays kernels.py's, on the graph as it runs
(compiled: the fused groups), and this module's extras are added to it. The extras come from primitives
`mx.compile` never fuses (sort, concatenate, reshape, matmul, convolution, updates), so they are the same
compiled or not. Checked harmless and counted as one: gathers, casts, reductions at these sizes, random
bits, softmax, and the fast ops' stand-ins (kernels.gpu_fast_ops; q, k and v layouts checked, notes).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ops.bench.kernels import VIEWS
from ops.bench.metal_rules import (
    CHIPS,
    DEFAULT_CHIP,
    Array,
    Chip,
    attention_dispatches,
    conv_dispatches,
    dense,
    matmul_dispatches,
    operand_copies,
    reshape_copies,
    reshaped_strides,
    row_contiguous,
    row_strides,
    sort_dispatches,
)

SORTS = frozenset({"Sort", "ArgSort", "Partition", "ArgPartition"})
UPDATES = frozenset({"SliceUpdate", "DynamicSliceUpdate", "Scatter", "ScatterAxis", "MaskedScatter"})
RESHAPES = frozenset({"Reshape", "Flatten", "Unflatten"})
# Elementwise ops of one input: on Metal their output keeps a dense input's order (`set_unary_output_data`);
# every other op writes a row-contiguous output (the vector attention's too, unlike the stand-ins' softmax).
UNARY = frozenset(
    {
        "Abs", "AsType", "Ceil", "Cos", "Erf", "ErfInv", "Exp", "Expm1", "Floor", "Log", "Log1p", "LogicalNot",
        "Negative", "Round", "Rsqrt", "Sigmoid", "Sign", "Sin", "Sqrt", "Square", "Tanh",
    }
)  # fmt: skip


@dataclass
class Node:
    name: str
    arguments: list
    inputs: list  # array names
    outputs: list
    copies_reshape: bool = False  # a reshape whose input layout cannot be reshaped in place


@dataclass
class Dispatches:
    """A graph's dispatches beyond one per kernel-launching primitive: certain ones, and those that depend on
    donation at run time (`possible`), with where they come from."""

    certain: int = 0
    possible: int = 0
    by_rule: Counter = field(default_factory=Counter)

    def add(self, rule: str, count: int = 1, possible: bool = False) -> None:
        if count:
            if possible:
                self.possible += count
                self.by_rule[rule + " (unless donated)"] += count
            else:
                self.certain += count
                self.by_rule[rule] += count


# --- the graph --------------------------------------------------------------------------------------------


class Graph:
    """A function's graph as MLX exports it, with every array's layout."""

    def __init__(self, fn, *args):
        flat = [leaf for _, leaf in tree_flatten(list(args)) if isinstance(leaf, mx.array)]
        structure = tree_flatten(list(args))
        self.nodes: list[Node] = []
        self.arrays: dict[str, Array] = {}
        self.outputs: list[str] = []
        self.inputs: set[str] = set()
        events = []

        def flat_fn(*leaves):
            it = iter(leaves)
            rebuilt = tree_unflatten([(k, next(it) if isinstance(v, mx.array) else v) for k, v in structure])
            return [leaf for _, leaf in tree_flatten(fn(*rebuilt)) if isinstance(leaf, mx.array)]

        mx.disable_compile()  # compiled functions inside run as traced (the export cannot read a fused group)
        try:
            mx.export_function(events.append, flat_fn, *flat)
        finally:
            mx.enable_compile()
        for event in events:
            kind = event["type"]
            if kind == "inputs":
                for (name, shape, dtype), value in zip(event["inputs"], flat):
                    self._evaluated(name, shape, dtype, value)
                    self.inputs.add(name)
            elif kind == "constants":
                for name, value in event["constants"]:
                    self._evaluated(name, tuple(value.shape), value.dtype, value)
            elif kind == "outputs":
                self.outputs = [name for name, _, _ in event["outputs"]]
            elif kind == "primitive":
                self._primitive(event)
        self._producers = {name: node for node in self.nodes for name in node.outputs}

    def _evaluated(self, name, shape, dtype, value) -> None:
        try:
            view = memoryview(value)
            strides = tuple(s // value.itemsize for s in view.strides)
        except (TypeError, ValueError, BufferError):  # a type the buffer protocol lacks: as MLX stores most
            strides = row_strides(shape)
        self.arrays[name] = Array(tuple(shape), strides or row_strides(shape), dtype, name)

    def _primitive(self, event) -> None:
        node = Node(
            event["name"],
            event["arguments"],
            [name for name, _, _ in event["inputs"]],
            [(name, tuple(shape), dtype) for name, shape, dtype in event["outputs"]],
        )
        self.nodes.append(node)
        source = [self.arrays[n] for n in node.inputs]
        for index, (name, shape, dtype) in enumerate(node.outputs):
            self.arrays[name] = self._layout(node, source, index, shape, dtype, name)
        node.outputs = [name for name, _, _ in node.outputs]

    def _layout(self, node: Node, source: list, index: int, shape, dtype, name) -> Array:
        kind, args = node.name, node.arguments
        first = source[0] if source else None
        if kind in ("Depends", "StopGradient", "View"):
            base = source[index] if kind == "Depends" else first
            return Array(shape, base.strides, dtype, base.buffer)
        if kind == "Transpose":
            return Array(shape, tuple(first.strides[a] for a in args[0]), dtype, first.buffer)
        if kind in ("Slice", "Split"):
            steps = args[2] if kind == "Slice" else [1] * len(shape)
            return Array(shape, tuple(s * k for s, k in zip(first.strides, steps)), dtype, first.buffer)
        if kind == "Squeeze":
            kept = [s for a, s in enumerate(first.strides) if a not in {x % len(first.shape) for x in args[0]}]
            return Array(shape, tuple(kept), dtype, first.buffer)
        if kind == "ExpandDims":
            strides = list(first.strides)
            for axis in sorted(a % len(shape) for a in args[0]):
                strides.insert(axis, 0)
            return Array(shape, tuple(strides), dtype, first.buffer)
        if kind in ("Broadcast", "BroadcastAxes"):
            pad = len(shape) - len(first.shape)
            strides = [0] * pad + [
                0 if n == 1 and m != 1 else s for n, m, s in zip(first.shape, shape[pad:], first.strides)
            ]
            return Array(shape, tuple(strides), dtype, first.buffer)
        if kind == "AsStrided":
            return Array(shape, tuple(args[1]), dtype, first.buffer)
        if kind in RESHAPES:
            if reshape_copies(first.shape, first.strides, shape):
                node.copies_reshape = True
                return Array(shape, row_strides(shape), dtype, name)
            return Array(shape, reshaped_strides(first.shape, first.strides, shape), dtype, first.buffer)
        if kind in UNARY and dense(first.shape, first.strides):
            return Array(shape, first.strides, dtype, name)  # unary ops keep a dense input's order
        return Array(shape, row_strides(shape), dtype, name)

    # --- what it launches ---------------------------------------------------------------------------------

    def primitives(self) -> list[str]:
        return [n.name for n in self.nodes]

    def kernels(self) -> int:
        """One per primitive that is not a view (kernels.py's count, on this unfused graph)."""
        return sum(1 for n in self.nodes if n.name not in VIEWS)

    def extras(self, chip: Chip) -> Dispatches:
        """Dispatches beyond one per kernel-launching primitive."""
        found = Dispatches()
        readers = self._readers()
        ancestors = self._ancestors()
        for i, node in enumerate(self.nodes):
            ins = [self.arrays[n] for n in node.inputs]
            if node.name in RESHAPES and node.copies_reshape:
                found.add("reshape copy")
            elif node.name in SORTS:
                found.add("multi-block sort", sort_dispatches(ins[0], node.arguments[0]) - 1)
            elif node.name == "Concatenate":
                found.add("concatenate copies", sum(1 for a in ins if math.prod(a.shape)) - 1)
            elif node.name == "Matmul":
                for operand, vector in zip(ins, (ins[0].shape[-2] == 1, ins[1].shape[-1] == 1)):
                    found.add("matmul operand copy", operand_copies(operand, vector))
                found.add("matmul split K", matmul_dispatches(ins[0], ins[1], chip) - 1)
            elif node.name == "Convolution":
                for operand in ins[:2]:
                    found.add("conv input copy", not row_contiguous(operand.shape, operand.strides))
                found.add("conv unfold and GEMM", conv_dispatches(ins[0], ins[1], node.arguments, chip) - 1)
            elif node.name == "Scan" and self._attention_inputs(node):
                q, k = self._attention_inputs(node)
                found.add("two-pass attention", attention_dispatches(q, k, chip) - 1)
            if node.name in UPDATES:
                copy = self._update_copy(i, ins[0].buffer, readers, ancestors)
                if copy:
                    found.add("update copy", 1, possible=copy == "possible")
        return found

    def _attention_inputs(self, node: Node):
        """(q, k) of a stand-in attention (kernels.gpu_fast_ops: a running max, exported as `Scan`, of a
        Depends on q, k, v), else None."""
        source = self._producers.get(node.inputs[0])
        if source is None or source.name != "Depends" or len(source.inputs) < 4:
            return None
        return self.arrays[source.inputs[1]], self.arrays[source.inputs[2]]

    def _readers(self) -> dict[str, list[int]]:
        """For each buffer, the kernel-launching nodes that read it (through any view)."""
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            if node.name in VIEWS and node.name != "Depends" and not node.copies_reshape:
                continue  # (a Depends stands for a fast op, kernels.gpu_fast_ops: it reads what the op reads)
            for name in set(node.inputs):
                readers.setdefault(self.arrays[name].buffer, []).append(i)
        return readers

    def _ancestors(self) -> list[int]:
        """Per node, a bitset of the nodes it depends on."""
        producer = {out: i for i, node in enumerate(self.nodes) for out in node.outputs}
        bits: list[int] = []
        for node in self.nodes:
            mask = 0
            for name in node.inputs:
                j = producer.get(name)
                if j is not None:
                    mask |= bits[j] | (1 << j)
            bits.append(mask)
        return bits

    def _update_copy(self, i: int, buffer: str, readers, ancestors) -> str:
        """'certain', 'possible' or '' (donated): whether update node i copies the buffer it writes."""
        if buffer not in self._producers:
            return "possible"  # an evaluated array (an input, a state): donated only if nothing else holds it
        if any(self.arrays[name].buffer == buffer for name in self.outputs):
            return "certain"
        others = [j for j in readers.get(buffer, []) if j != i]
        if any(not (ancestors[i] >> j) & 1 for j in others):
            return "certain"  # another reader may still run after it: it holds the buffer
        return "possible" if others else ""


def count(fn, *args, chip: str = DEFAULT_CHIP) -> dict:
    """`fn(*args)`'s dispatches uncompiled: kernels, extras certain and possible, low and high."""
    graph = Graph(fn, *args)
    extras = graph.extras(CHIPS[chip])
    kernels = graph.kernels()
    return {
        "kernels": kernels,
        "low": kernels + extras.certain,
        "high": kernels + extras.certain + extras.possible,
        "by_rule": dict(extras.by_rule),
    }
