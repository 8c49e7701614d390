"""Running the batch scheduler on the calling thread, for in-process use: warm-up, benchmarks, tests.

The server's model replica drives the same scheduler from its worker thread instead (worker.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.messages import END, SynthesisRequest, VoiceParams, received
from serve_app.engine.batch import CAPACITY_STEP, bucket_for
from serve_app.engine.prompts import MAX_POSITIONS
from serve_app.engine.scheduler import BatchScheduler, GenerationJob

if TYPE_CHECKING:
    from serve_app.engine.csm import CSMEngine

logger = logging.getLogger(LOGGER_NAME)


def run_jobs(engine: CSMEngine, jobs: list[GenerationJob], max_batch: int) -> None:
    """Run these jobs to the end on the calling thread."""
    scheduler = BatchScheduler(engine, max_batch)
    for job in jobs:
        scheduler.add(job)
    while scheduler.active:
        scheduler.step()


def synthesize(
    engine: CSMEngine, request: SynthesisRequest, cancelled: Callable[[], bool] = lambda: False
) -> Iterator[Any]:
    """One request on the calling thread: PCM (s16le, 24 kHz, mono) as each group of frames is decoded,
    then a `Usage`; a failure is raised here."""
    items: deque = deque()
    scheduler = BatchScheduler(engine, 1)
    scheduler.add(GenerationJob(request, items.append, cancelled))
    while scheduler.active or items:
        while items:
            item = received(items.popleft())
            if item is END:
                return
            yield item
        if scheduler.active:
            scheduler.step()


def warm_up(engine: CSMEngine) -> int:
    """Short generations, so requests do not pay for first-call kernel setup; with a compiled frame, one per
    batch size up to MAX_BATCH_SIZE (it compiles once per shape), then the steady frame traced for the other
    shapes a first request meets (`compile_shapes`). Returns how many shapes that traced."""
    preset = VoiceParams(name="warm-up")
    frames = engine.options.first_group_frames + 1
    sizes = range(1, engine.options.max_batch_size + 1) if engine.frame_step.compiled else (1,)
    items: list = []
    for size in sizes:
        jobs = [
            GenerationJob(SynthesisRequest(["Hello."], preset, seed=i, max_frames_per_chunk=frames), items.append)
            for i in range(size)
        ]
        run_jobs(engine, jobs, max_batch=size)
    failures = [item for item in items if isinstance(item, BaseException)]
    if failures:
        raise failures[0]
    step = engine.frame_step
    if not step.compiled:
        return 0
    started = time.perf_counter()
    traced = sum(step.prepare(*shape) for shape in compile_shapes(engine))
    logger.info("compile warm-up: the frame traced for %d more shapes in %.1f s", traced, time.perf_counter() - started)
    return traced


def compile_shapes(engine: CSMEngine) -> list[tuple[int, int]]:
    """(rows, cache capacity) of the steady frames a first request can meet beyond the warm-up's generations
    (which ran every batch size in the first bucket): one request alone in every bucket up to the one a voice's
    prompt with the longest chunk and its frame cap needs. Later buckets, and bigger batches in them, are
    traced while the loop runs, a few frames ahead of need (scheduler.BUCKET_LOOKAHEAD)."""
    longest = max((len(tokens) for tokens in engine._prompts.values()), default=0)
    last = min(bucket_for(longest + engine.longest_chunk_positions() + 1), bucket_for(MAX_POSITIONS + 1))
    return [(1, capacity) for capacity in range(CAPACITY_STEP, last + 1, CAPACITY_STEP)]
