"""Continuous batching: requests join and leave one batched forward pass between frames.

Every step computes one frame for every request in the batch: the rows already generating take one
backbone step together; rows that start a text chunk (a new request, or the next chunk of one already in
the batch) are prefilled on their own and join; then one depth-decoder pass samples all 32 codebooks for
every row at once. While rows are generating, a joining prompt is prefilled at most PREFILL_STEP_POSITIONS
per step, so a long context joining never stalls the streams already running for more than that. Each
request keeps its own backbone cache row, PRNG key, stop rule, frame cap, Mimi state and output (see
session.py), so a request that ends, fails or is cancelled leaves without disturbing the others. It all runs
on the replica's one MLX thread (worker.py).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import mlx.core as mx
import numpy as np

from .batch import BatchKV, backbone_step, embed_frame, prefill
from .memory import MemoryGuard
from .request import SynthesisRequest
from .session import SpeechSession

if TYPE_CHECKING:
    from .generation import CSMEngine

logger = logging.getLogger("sesame_tts")

END = object()  # posted after a request's last item


@dataclass
class PendingPrefill:
    """A prompt being prefilled across steps: (1, n, K+1) tokens and mask, the cache so far, positions done."""

    tokens: mx.array
    mask: mx.array
    cache: Optional[list]
    done: int = 0

    @property
    def remaining(self) -> int:
        return self.tokens.shape[1] - self.done


@dataclass
class GenerationJob:
    """A request for the scheduler: `post` receives PCM bytes, a `Usage`, then `END` (or one exception)."""

    request: SynthesisRequest
    post: Callable[[Any], None]
    cancelled: Callable[[], bool] = lambda: False


class BatchScheduler:
    """Runs the batch one frame at a time; `add` jobs from the MLX thread, then `step` while `active`."""

    def __init__(self, engine: "CSMEngine", max_batch: int):
        self.engine = engine
        self.max_batch = max_batch
        self.waiting: deque[SpeechSession] = deque()
        self.rows: list[SpeechSession] = []  # in the order of the cache rows
        self.starting: list[SpeechSession] = []  # in the batch, between two text chunks
        self._joining: list[SpeechSession] = []  # prefilled during this step, joining the rows
        self._kv = BatchKV(len(engine.model.backbone.layers))
        self._last = None  # the rows' previous frame (rows, K)

    @property
    def active(self) -> bool:
        return bool(self.rows or self.starting or self.waiting)

    @property
    def generating(self) -> int:
        """Requests in the batch now."""
        return len(self.rows) + len(self.starting) + len(self._joining)

    def add(self, job: GenerationJob) -> None:
        if not self.active:
            self.engine.memory.begin_request()
        self.waiting.append(SpeechSession(self.engine, job.request, job.post, job.cancelled))

    def step(self) -> None:
        """One frame for every request in the batch; a failure ends only the requests it concerns."""
        self._drop_cancelled()
        try:
            self._step()
            self.engine.memory.check()
        except Exception as exc:
            self._fail(exc)
        if not self.active:
            mx.clear_cache()  # between bursts the replica gives MLX's cache back

    def _step(self) -> None:
        model = self.engine.model
        hidden = []
        if self.rows:
            hidden.append(backbone_step(model.backbone, embed_frame(model, self._last), self._kv))
        # With rows generating, a joining prompt gets a bounded share of this step; with none, nobody waits.
        budget = self.engine.settings.prefill_step_positions if self.rows else None
        while (self.starting or (self.waiting and self.generating < self.max_batch)) and (budget is None or budget > 0):
            if not self.starting:
                self.starting.append(self.waiting.popleft())
            session = self.starting[0]  # stays there (in the batch) until its prompt is prefilled
            try:
                if session.prefill is None:
                    prompt = session.next_prompt()
                    if prompt is None:
                        self.starting.pop(0)
                        session.finish()
                        session.post(END)
                        continue
                    session.prefill = PendingPrefill(*prompt)
                part = session.prefill
                take = part.remaining if budget is None else min(part.remaining, budget)
                last, part.cache = prefill(model, part.tokens[:, part.done:part.done + take],
                                           part.mask[:, part.done:part.done + take], part.cache)
                part.done += take
                budget = None if budget is None else budget - take
                mx.eval(last, *[c.keys for c in part.cache], *[c.values for c in part.cache])
            except Exception as exc:  # its own text or context: only this request fails
                self.starting.pop(0)
                session.prefill = None
                self._post_failures([session], MemoryGuard.translate(exc))
                continue
            if part.remaining:
                continue  # more of it next step
            self.starting.pop(0)
            session.prefill = None
            self._joining.append(session)
            self._kv.add(part.cache)
            hidden.append(last)
        self.rows.extend(self._joining)
        self._joining = []
        if not self.rows:
            return
        noise = mx.stack([s.noise() for s in self.rows])
        inv_temperature = mx.array([[s.inv_temperature] for s in self.rows], dtype=mx.float32)
        top_k = mx.array([[s.top_k] for s in self.rows], dtype=mx.int32)
        codes = self.engine.frame_decoder(mx.concatenate(hidden), noise, inv_temperature, top_k)
        frames = np.array(codes)
        keep = [i for i, session in enumerate(self.rows) if session.accept(frames[i])]
        for i, session in enumerate(self.rows):
            if i not in keep:  # its chunk ended: its next chunk may continue from its row
                session.keep_row(self._kv.row_state(i))
        self.starting.extend(s for i, s in enumerate(self.rows) if i not in keep)
        self._keep(keep, codes)

    def _keep(self, keep: list[int], codes=None) -> None:
        if keep == list(range(len(self.rows))):
            self._last = codes if codes is not None else self._last
            return
        self._kv.keep(keep)
        self.rows = [self.rows[i] for i in keep]
        source = codes if codes is not None else self._last
        self._last = source[mx.array(keep)] if keep else None

    def _drop_cancelled(self) -> None:
        for group in (self.waiting, self.starting):
            for session in [s for s in group if s.cancelled()]:
                group.remove(session)
                session.post(END)
        gone = [i for i, s in enumerate(self.rows) if s.cancelled()]
        if gone:
            for i in gone:
                self.rows[i].post(END)
            self._keep([i for i in range(len(self.rows)) if i not in gone])

    def _fail(self, exc: Exception) -> None:
        """An out-of-memory check fails the request holding the most context; any other error fails
        every request in the batch (their shared step is lost). Waiting requests are untouched."""
        error = MemoryGuard.translate(exc)
        if getattr(error, "code", None) == "out_of_memory" and error is exc and self.rows:
            victim = max(range(len(self.rows)), key=lambda i: self.rows[i].context_length)
            failed = [self.rows[victim]]
            self._keep([i for i in range(len(self.rows)) if i != victim])
        else:
            logger.debug("batch step failed", exc_info=exc)
            failed = self._clear_batch()
        self._post_failures(failed, error)

    def fail_all(self, exc: BaseException) -> None:
        """Fail every request the scheduler holds, waiting ones too (the worker's last resort when
        something escapes a step), and start again from an empty batch."""
        failed = self._clear_batch() + list(self.waiting)
        self.waiting.clear()
        self._post_failures(failed, exc)

    def _clear_batch(self) -> list[SpeechSession]:
        in_batch = self.rows + self.starting + self._joining
        self.rows, self.starting, self._joining, self._last = [], [], [], None
        self._kv = BatchKV(len(self.engine.model.backbone.layers))
        return in_batch

    def _post_failures(self, sessions: list[SpeechSession], error: BaseException) -> None:
        """MLX's cache goes back first, so a caller that sees the error sees the memory released too."""
        mx.clear_cache()
        mx.reset_peak_memory()
        for session in sessions:
            session.post(error)
