"""Running the batch scheduler on the calling thread, for in-process use: warm-up, benchmarks, tests.

The server's model replica drives the same scheduler from its worker thread instead (worker.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from serve_app.core.messages import END, SynthesisRequest, VoiceParams, received
from serve_app.engine.scheduler import BatchScheduler, GenerationJob

if TYPE_CHECKING:
    from serve_app.engine.csm import CSMEngine


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


def warm_up(engine: CSMEngine) -> None:
    """Short generations, so requests do not pay for first-call kernel setup; with a compiled frame
    decoder, one per batch size up to MAX_BATCH_SIZE (it compiles once per shape)."""
    preset = VoiceParams(name="warm-up")
    frames = engine.options.first_group_frames + 1
    sizes = range(1, engine.options.max_batch_size + 1) if engine.frame_decoder.compiled else (1,)
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
