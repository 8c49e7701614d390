"""Top-k sampling of one codebook for every row of the batch, as the frame runs it (engine/frame.py): with
each row's Gumbel noise, argmax(top-k(logits) / T + g) samples the top-k softmax exactly, as Sesame's
`sample_topk` does. The top-k threshold is found without Metal's four-kernel sort (`TopK`): the same value,
fewer kernels (ops/bench/dispatch.py counts them)."""

from __future__ import annotations

import mlx.core as mx

# Elements Metal sorts in one block (512 threads x 4: sort.cpp `gpu_merge_sort`); more take a multi-block sort,
# four kernels instead of one. CSM's audio vocabulary is 2,051.
SORT_BLOCK = 2048
SORT_TAIL = 3  # at most this many logits past the block are merged by hand (`TopK`)


class TopK:
    """Where each row's k-th largest logit sits: `kth` (B, 1) is vocab - top_k, its place in the ascending
    sort. Made once per frame (the 32 codebooks share it).

    Above SORT_BLOCK, sorting the whole vocabulary is Metal's four-kernel sort. Instead the first SORT_BLOCK
    logits (A, sorted: A_1 <= ... <= A_n) are sorted in one block and the few past them (T, in order T_1 <=
    ... <= T_m) merged by hand, with the same result: the k-th smallest of both is the least, over j = 0..m,
    of max(A_(k-j), T_j) (T_0 = -inf). Each such pair bounds k of the values, so it is at least the k-th
    smallest; the k smallest values are a prefix of A and a prefix of T, and their pair reaches it. A pair
    whose A_(k-j) does not exist (k - j > n) counts as +inf; k - j >= 1 always, as top_k <= SORT_BLOCK (the
    API's limit). Only selections, no arithmetic: ties and all, the sort's own value."""

    def __init__(self, kth: mx.array, vocab: int, dtype: mx.Dtype, fused: bool = True):
        """`dtype`: the logits' (the threshold is found in it). `fused`: the frame runs under `mx.compile`, which
        fuses the merge into the sampling's kernel; run as it is built, the merge is ~20 kernels per codebook
        where the whole sort is one (on a GPU, four), so an uncompiled frame sorts the whole vocabulary."""
        self.kth = kth
        self.tail = vocab - SORT_BLOCK if fused else 0
        if self.merged:
            place = kth + 1 - mx.arange(self.tail + 1)  # k - j, A's part of each pair (1-indexed)
            self.index = mx.minimum(place, SORT_BLOCK) - 1
            # Per pair j, a (B, 1) column: +inf where A has no such element, else -inf (made once, not per codebook).
            absent = mx.where(place > SORT_BLOCK, mx.inf, -mx.inf).astype(dtype)
            self.absent = [absent[:, j : j + 1] for j in range(self.tail + 1)]

    @property
    def merged(self) -> bool:
        return 0 < self.tail <= SORT_TAIL

    def threshold(self, logits: mx.array) -> mx.array:
        """The k-th largest logit of each row (B, 1), in the logits' dtype: the head's sort and one gather, then
        elementwise work on (B, 1) columns in which no intermediate is used twice (`mx.compile` fuses such a
        tree into the sampling's own kernel; a shared one would end the fused group)."""
        if not self.merged:
            return mx.take_along_axis(mx.sort(logits, axis=-1), self.kth, axis=-1)
        head = mx.take_along_axis(mx.sort(logits[:, :SORT_BLOCK], axis=-1), self.index, axis=-1)
        tail = _in_order([logits[:, c : c + 1] for c in range(SORT_BLOCK, SORT_BLOCK + self.tail)])
        candidates = []
        for j, t in enumerate([None, *tail]):
            a = mx.maximum(head[:, j : j + 1], self.absent[j])
            candidates.append(a if t is None else mx.maximum(a, t))
        while len(candidates) > 1:  # their minimum as a balanced tree: shallow, for compile's fusion depth
            pairs = zip(candidates[::2], candidates[1::2])
            candidates = [mx.minimum(x, y) for x, y in pairs] + candidates[len(candidates) // 2 * 2 :]
        return candidates[0]


def _in_order(t: list) -> list:
    """Up to three columns in ascending order, each order statistic its own tree (no node shared, so none
    ends a fused group; mx.compile merges identical nodes, so the trees avoid each other's pairs)."""
    if len(t) == 1:
        return t
    if len(t) == 2:
        return [mx.minimum(t[0], t[1]), mx.maximum(t[0], t[1])]
    low = mx.minimum(t[0], mx.minimum(t[1], t[2]))
    middle = mx.maximum(mx.minimum(t[0], t[1]), mx.minimum(mx.maximum(t[0], t[1]), t[2]))
    return [low, middle, mx.maximum(t[0], mx.maximum(t[1], t[2]))]


def sample(logits: mx.array, noise: mx.array, inv_temperature: mx.array, top_k: TopK) -> mx.array:
    """Top-k sampling per row with that row's Gumbel noise: argmax(top-k(logits) / T + g), as uint32 (the
    caller casts the frame's codes once). The k-th largest logit is found and compared in the logits' own
    dtype (an exact cast to float32 keeps every value and their order, so the same logits are kept), which
    keeps the fused group shallow enough to take the threshold's own work (`TopK.threshold`)."""
    kept = logits >= top_k.threshold(logits)
    logits = mx.where(kept, logits.astype(mx.float32), -mx.inf)
    return mx.argmax(logits * inv_temperature + noise, axis=-1)
