"""Continuous batching: requests join and leave one batched forward pass between frames.

Every step computes one frame for every request in the batch: the rows already generating take one backbone
step together; rows that start a text chunk (a new request, or the next chunk of one already in the batch)
are prefilled on their own and join; then one depth-decoder pass samples all 32 codebooks for every row at
once, all of it one function (frame.py) the scheduler calls once per frame. While rows are generating, a
joining prompt is prefilled at most PREFILL_STEP_POSITIONS per step, so a long context joining never stalls
the streams already running for more than that. Each request keeps its own backbone cache row, PRNG key,
stop rule, frame cap, Mimi state and output (see session.py), so a request that ends, fails or is cancelled
leaves without disturbing the others. It all runs on the replica's one MLX thread (worker.py).

The loop is pipelined, as mlx-lm's generator is: a step first builds and launches the next frame
(`mx.async_eval`) on the codes of the frame still in flight, which stay on the device, and only then reads
that earlier frame on the host (the step's one synchronisation) and does its host work: end-of-speech and
frame-cap checks, bookkeeping, Mimi for a finished group. The device computes frame N+1 while Python
handles frame N. The frame launched for a row whose chunk then turns out to have ended at frame N is
speculative and discarded: its PRNG split is taken back and its cache row is handed over without the
position it wrote, so the output is byte-identical to the unpipelined loop (PIPELINE=false), which reads
every frame in the step that launched it. A row whose frame in flight is its last by the frame cap is
known in advance and gets no speculative frame. A frame that completes some request's first group is read
in a step of its own, before the next launch, so first audio never waits for one (on MLX's CPU backend a
launch is the work, and an in-process caller sees the audio only when the step returns).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol

import mlx.core as mx
import numpy as np

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.messages import END, SynthesisRequest
from serve_app.engine.batch import BatchKV, bucket_for, prefill
from serve_app.engine.codec import decode_states
from serve_app.engine.loop_stats import LoopStats
from serve_app.engine.mlx_memory import MemoryLimit
from serve_app.engine.session import SessionEngine, SpeechSession

if TYPE_CHECKING:
    from serve_app.engine.frame import FrameStep

logger = logging.getLogger(LOGGER_NAME)

BUCKET_LOOKAHEAD = 8  # frames before the cache's next bucket is needed that a compiled frame is traced for it


class SchedulerEngine(SessionEngine, Protocol):
    """What the scheduler reads of the engine (CSMEngine is one), beyond what its sessions do: the model (its
    layer count, and the prefill runs it), the one frame function, Mimi's stream and the memory limit. The
    tokenizer, the voice store and Mimi's encoder stay out of the loop."""

    model: Any
    frame_step: FrameStep
    memory: MemoryLimit

    @property
    def mimi_stream(self) -> mx.Stream: ...


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
class LaunchedFrame:
    """A frame launched on the device and not read on the host yet: its codes (rows, K) and the sessions of
    those rows, in order."""

    codes: mx.array
    sessions: list[SpeechSession]


@dataclass
class GenerationJob:
    """A request for the scheduler: `post` receives PCM bytes, a `Usage`, then `END` (or one exception)."""

    request: SynthesisRequest
    post: Callable[[Any], None]
    cancelled: Callable[[], bool] = lambda: False


class BatchScheduler:
    """Runs the batch one frame at a time; `add` jobs from the MLX thread, then `step` while `active`."""

    def __init__(self, engine: SchedulerEngine, max_batch: int, pipelined: Optional[bool] = None):
        self.engine = engine
        self.max_batch = max_batch
        self.pipelined = engine.options.pipeline if pipelined is None else pipelined
        self.waiting: deque[SpeechSession] = deque()
        self.rows: list[SpeechSession] = []  # in the order of the cache rows
        self.starting: list[SpeechSession] = []  # in the batch, between two text chunks
        self._joining: list[SpeechSession] = []  # prefilled during this step, joining the rows
        self._capped: list[SpeechSession] = []  # left the rows, their last frame still in flight
        self._kv = BatchKV(len(engine.model.backbone.layers))
        self._last = None  # the rows' newest frame (rows, K), on the device
        self._in_flight: Optional[LaunchedFrame] = None  # launched, not read yet (pipelined)
        # The rows' PRNG keys (rows, 2), inverse temperatures and top-k places (vocab - top_k) for the next
        # launch: kept on the device while the rows stay the same, made again from the sessions when they change.
        self._sampling: Optional[tuple[mx.array, mx.array, mx.array]] = None
        self.stats = LoopStats()
        self.trace: Optional[Callable[[list], None]] = None  # the benchmark's look at each launched graph

    @property
    def active(self) -> bool:
        return bool(self.rows or self.starting or self.waiting or self._in_flight)

    @property
    def generating(self) -> int:
        """Requests in the batch now."""
        return len(self.rows) + len(self.starting) + len(self._joining) + len(self._capped)

    def add(self, job: GenerationJob) -> None:
        if not self.active:
            self.engine.memory.begin_request()
        self.waiting.append(SpeechSession(self.engine, job.request, job.post, job.cancelled))

    def step(self) -> None:
        """One frame for every request in the batch; a failure ends only the requests it concerns."""
        self._drop_cancelled()
        try:
            with self.stats.step():
                self._step()
            self.engine.memory.check()
        except Exception as exc:
            self._fail(exc)
        if not self.active:
            mx.clear_cache()  # between bursts the replica gives MLX's cache back

    def _step(self) -> None:
        ahead, self._in_flight = self._in_flight, None
        if ahead is not None and any(s.first_audio_in_flight for s in ahead.sessions if not s.gone):
            self._read(ahead)  # a request's first audio goes out; the next step launches
            return
        if ahead is not None:
            self._release_capped(ahead)
        launched = self._launch()
        if ahead is not None:
            self._read(ahead, after_launch=True)
        if launched:
            frame = LaunchedFrame(self._last, list(self.rows))  # the rows still in it after that read
            if self.pipelined:
                self._in_flight = frame
            else:
                self._read(frame)

    def _launch(self) -> bool:
        """Build the next frame for every row (and for prompts that finish prefilling now) and start it on
        the device without waiting for it; False when there is no row to launch for."""
        engine = self.engine
        joined: list[mx.array] = []  # the last hidden state of each prompt that finishes now
        caches: list[list] = []  # and its backbone cache, added to the batch's after this frame's step
        # With rows generating, a joining prompt gets a bounded share of this step; with none, nobody waits.
        budget = engine.options.prefill_step_positions if self.rows else None
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
                last, part.cache = prefill(
                    engine.model,
                    part.tokens[:, part.done : part.done + take],
                    part.mask[:, part.done : part.done + take],
                    part.cache,
                )
                part.done += take
                budget = None if budget is None else budget - take
                with self.stats.sync():  # its own errors (memory) surface here, failing only this request
                    mx.eval(last, *[c.keys for c in part.cache], *[c.values for c in part.cache])
            except Exception as exc:  # its own text or context: only this request fails
                self.starting.pop(0)
                session.prefill = None
                self._post_failures([session], MemoryLimit.translate(exc))
                continue
            if part.remaining:
                continue  # more of it next step
            self.starting.pop(0)
            session.prefill = None
            self._joining.append(session)
            caches.append(part.cache)
            joined.append(last)
        with self.stats.build():
            outputs = self._build_frame(joined, caches)
        if outputs is None:
            return False
        if self.trace is not None:
            self.trace(outputs)
        mx.async_eval(*outputs)
        self.stats.launches += 1
        self._prepare_next_bucket()
        return True

    def _prepare_next_bucket(self) -> None:
        """A compiled frame meets a new shape when the rows outgrow the cache's bucket: trace it a few frames
        ahead, right after a launch, so the host does it while the device runs that frame."""
        step = self.engine.frame_step
        if self.rows and step.compiled:
            capacity = bucket_for(int(self._kv.lengths.max()) + 1 + BUCKET_LOOKAHEAD)
            if capacity > self._kv.capacity:
                step.prepare(len(self.rows), capacity)

    def _build_frame(self, joined: list[mx.array], caches: list[list]) -> Optional[list[mx.array]]:
        """The frame's graph (frame.py's one function) for the rows generating and those joining now, the
        batch's state moved on to it; the arrays to evaluate, or None without rows. Nothing is evaluated
        here: this is the host's whole share of a frame (the benchmark's graph_build_ms_per_frame)."""
        generating = bool(self.rows)
        if generating:
            self._kv.prepare_step()
        if self._joining:
            self._sampling = None
        self.rows.extend(self._joining)
        self._joining = []
        if not self.rows:
            return None
        if self._sampling is None:  # rebuilt only when the rows change (_keep, joins)
            self._sampling = (
                mx.stack([s.key for s in self.rows]),
                mx.array([[s.inv_temperature] for s in self.rows], dtype=mx.float32),
                mx.array([[self.engine.vocab_size - s.top_k] for s in self.rows], dtype=mx.int32),  # kth
            )
        rng, inv_temperature, kth = self._sampling
        kv = self._kv
        self._last, rng, keys, values = self.engine.frame_step(
            self._last if generating else None,
            mx.array(kv.lengths) if generating else None,
            kv.keys if generating else None,
            kv.values if generating else None,
            joined,
            rng,
            inv_temperature,
            kth,
        )
        if generating:
            kv.keys, kv.values, kv.lengths = keys, values, kv.lengths + 1
        for cache in caches:
            kv.add(cache)
        self._sampling = (rng, inv_temperature, kth)
        for i, session in enumerate(self.rows):
            session.advance(rng[i])
        return [self._last, rng, *kv.keys, *kv.values]

    def _release_capped(self, ahead: LaunchedFrame) -> None:
        """Rows whose frame in flight is their chunk's last by the frame cap leave before the next frame,
        handing over their cache row as it is (it has not seen that frame, as CSM's next chunk expects)."""
        capped = [i for i, s in enumerate(self.rows) if s.last_frame_in_flight]
        for i in capped:
            self.rows[i].keep_row(self._kv.row_state(i))
            self._capped.append(self.rows[i])
        if capped:
            self._keep([i for i in range(len(self.rows)) if i not in capped])

    def _read(self, frame: LaunchedFrame, after_launch: bool = False) -> None:
        """Frame N on the host: each session takes its codes; a row whose chunk ended leaves the batch. Read
        `after_launch`, every row still in the batch that ended at N has a speculative frame N+1 in flight
        (rows capped at N left before that launch): it is discarded."""
        with self.stats.sync(frame=True):
            codes = np.array(frame.codes)
        self.stats.frames += 1
        self._capped = []
        live = [(i, s) for i, s in enumerate(frame.sessions) if not s.gone]
        ended = [s for i, s in live if not s.accept(codes[i])]
        self._decode_groups([s for _, s in live])
        if not ended:
            return
        leaving = {id(s) for s in ended}
        for i, session in enumerate(self.rows):
            if id(session) in leaving:  # its next chunk may continue from its row
                if after_launch:
                    session.rewind()
                session.keep_row(self._kv.row_state(i, drop_last=after_launch))
        self.starting.extend(ended)
        self._keep([i for i, s in enumerate(self.rows) if id(s) not in leaving])

    def _decode_groups(self, sessions: list[SpeechSession]) -> None:
        """Mimi for every group finished in this frame, as few batched calls as the rows allow, on Mimi's own
        stream: reading its PCM waits for Mimi, not for the frame in flight behind it."""
        groups = [(s, codes) for s in sessions if (codes := s.take_group()) is not None]
        if not groups:
            return
        with self.stats.sync():
            pcm = decode_states([s.mimi for s, _ in groups], [c for _, c in groups], self.engine.mimi_stream)
        for (session, _), samples in zip(groups, pcm):
            session.post_pcm(samples)

    def _keep(self, keep: list[int]) -> None:
        if keep == list(range(len(self.rows))):
            return
        self._sampling = None  # a leaving row may have taken back its last draw (rewind)
        self._kv.keep(keep)
        self.rows = [self.rows[i] for i in keep]
        self._last = self._last[mx.array(keep)] if keep else None

    def _drop_cancelled(self) -> None:
        for group in (self.waiting, self.starting):
            for session in [s for s in group if s.cancelled()]:
                group.remove(session)
                session.close()
        gone = [i for i, s in enumerate(self.rows) if s.cancelled()]
        if gone:
            for i in gone:
                self.rows[i].close()
            self._keep([i for i in range(len(self.rows)) if i not in gone])

    def _fail(self, exc: Exception) -> None:
        """An out-of-memory check fails the request holding the most context; any other error fails
        every request in the batch (their shared step is lost). Waiting requests are untouched."""
        error = MemoryLimit.translate(exc)
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
        in_batch = self.rows + self.starting + self._joining + self._capped
        self.rows, self.starting, self._joining, self._capped = [], [], [], []
        self._last, self._in_flight, self._sampling = None, None, None
        self._kv = BatchKV(len(self.engine.model.backbone.layers))
        return in_batch

    def _post_failures(self, sessions: list[SpeechSession], error: BaseException) -> None:
        """MLX's cache goes back first, so a caller that sees the error sees the memory released too."""
        mx.clear_cache()
        mx.reset_peak_memory()
        for session in sessions:
            session.close(error)
