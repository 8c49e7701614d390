"""Running requests through the engine's scheduler in-process, as the engine tests compare them: each
request's PCM bytes and Usage, and (with `accepted_codes`) the codes its session took, frame by frame."""

from __future__ import annotations

from typing import Optional

from serve_app.core.messages import END, SynthesisRequest, Usage
from serve_app.engine.scheduler import BatchScheduler, GenerationJob
from serve_app.engine.session import SpeechSession


def generate(engine, voices, specs, pipelined=True, max_batch=4, requests: Optional[list] = None):
    """Run (voice, chunks, seed, frames) requests together; each one's PCM bytes and Usage, and the loop.
    `requests`: a list the requests made are added to, in the order of `specs`."""
    scheduler = BatchScheduler(engine, max_batch, pipelined=pipelined)
    posts: list[list] = [[] for _ in specs]
    for out, (voice, chunks, seed, frames) in zip(posts, specs):
        request = SynthesisRequest(chunks, voices.resolve(voice), seed=seed, max_frames_per_chunk=frames)
        if requests is not None:
            requests.append(request)
        scheduler.add(GenerationJob(request, out.append))
    while scheduler.active:
        scheduler.step()
    for out in posts:
        assert out[-1] is END, out[-1]
    return [
        (b"".join(i for i in out if isinstance(i, bytes)), next(i for i in out if isinstance(i, Usage)))
        for out in posts
    ], scheduler


def accepted_codes(monkeypatch) -> dict[int, list]:
    """From now on, the codes (K,) every session accepts, listed under id(its request) in the dict returned."""
    seen: dict[int, list] = {}
    accept = SpeechSession.accept

    def record(session, codes):
        seen.setdefault(id(session.request), []).append(codes.copy())
        return accept(session, codes)

    monkeypatch.setattr(SpeechSession, "accept", record)
    return seen
