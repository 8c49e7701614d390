"""CSM's token layout, as Sesame's reference builds it: one row per position, `K` audio codebook columns
and one text column, with a mask saying which columns a row uses.

A text segment is `[speaker]text` tokenized (BOS/EOS by the tokenizer) in the text column; an audio
segment is its Mimi codes, one frame a row, then CSM's all-zero end-of-speech frame. A context is
segments in order (the voice's clip, then the conversation's earlier turns, then this request's earlier
chunks), and everything must fit the backbone's `MAX_POSITIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_POSITIONS = 2048  # CSM's backbone context (and its RoPE table)


@dataclass
class Tokens:
    """A segment as CSM input rows: (n, K+1) token ids and the matching boolean mask."""

    ids: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def text_rows(ids: list[int], num_codebooks: int) -> Tokens:
    """Text token ids in the last column, the audio columns empty and masked out."""
    rows = np.zeros((len(ids), num_codebooks + 1), dtype=np.int32)
    mask = np.zeros_like(rows, dtype=bool)
    rows[:, -1] = ids
    mask[:, -1] = True
    return Tokens(rows, mask)


def audio_rows(codes: np.ndarray) -> Tokens:
    """Mimi codes (K x frames) one frame a row, then the all-zero end-of-speech frame; text column empty."""
    num_codebooks = codes.shape[0]
    rows = np.zeros((codes.shape[1] + 1, num_codebooks + 1), dtype=np.int32)
    rows[:-1, :-1] = codes.T
    mask = np.zeros_like(rows, dtype=bool)
    mask[:, :-1] = True
    return Tokens(rows, mask)


def concat(*parts: Tokens) -> Tokens:
    return Tokens(np.concatenate([p.ids for p in parts]), np.concatenate([p.mask for p in parts]))


def fit_context(fixed: list[Tokens], history: list[Tokens], budget: int) -> list[Tokens]:
    """The fixed segments (the voice's clip) if they fit, then the most recent of the history that fits, as
    a contiguous run up to now (the history: a conversation's earlier turns, then this request's earlier
    chunks, oldest first). The oldest turns give way first."""
    chosen: list[Tokens] = []
    used = 0
    for seg in fixed:
        if used + len(seg) <= budget:
            chosen.append(seg)
            used += len(seg)
    recent: list[Tokens] = []
    for seg in reversed(history):
        if used + len(seg) > budget:
            break
        recent.insert(0, seg)
        used += len(seg)
    return chosen + recent
