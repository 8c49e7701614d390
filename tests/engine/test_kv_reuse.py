"""Backbone KV reuse (voice prefixes prefilled once; later chunks continue their own cache row) produces
exactly the codes of the reference path, which re-prefills every chunk's whole context (PREFIX_CACHE=off).

Greedy decoding (top-k 1) in float32 on the tiny checkpoint, so the comparison has no ties to break: the
same audio bytes mean the same codes, frame by frame (Mimi's decode is deterministic)."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.core.messages import SynthesisRequest, Usage
from serve_app.core.settings import Settings
from serve_app.engine import scheduler as scheduler_module
from serve_app.engine import session as session_module
from serve_app.engine.csm import CSMEngine
from serve_app.engine.runners import run_jobs, synthesize
from serve_app.engine.scheduler import END, GenerationJob
from serve_app.model.loading import load_engine
from tests.support.backend import assert_same_speech
from tests.support.servers import ENGINE_CAPS

VOICES = ["conversational", "professional", "whisper", "fast"]
CHUNKS = ["First part of the answer.", "Then a second one,", "and the end."]


def fp32_engine(tiny_checkpoint, voices, reuse: bool) -> CSMEngine:
    return load_engine(
        Settings(model_id=str(tiny_checkpoint), dtype="float32", prefix_cache=reuse, **ENGINE_CAPS), voices
    )


@pytest.fixture(scope="module")
def reusing(tiny_checkpoint, voices):
    return fp32_engine(tiny_checkpoint, voices, reuse=True)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, voices):
    return fp32_engine(tiny_checkpoint, voices, reuse=False)


def greedy(voices, name: str, chunks: list[str], seed: int = 1, **kw) -> SynthesisRequest:
    return SynthesisRequest(chunks, voices.resolve(name).model_copy(update={"top_k": 1}), seed=seed, **kw)


def solo(engine, request) -> tuple[bytes, Usage]:
    items = list(synthesize(engine, request))
    return b"".join(i for i in items[:-1]), items[-1]


def batched(engine, requests) -> list[tuple[bytes, Usage]]:
    out = [[] for _ in requests]
    jobs = [GenerationJob(r, out[i].append) for i, r in enumerate(requests)]
    run_jobs(engine, jobs, max_batch=len(requests))
    results = []
    for items in out:
        assert items[-1] is END and not any(isinstance(i, BaseException) for i in items), items[-2:]
        results.append((b"".join(i for i in items[:-2]), items[-2]))
    return results


@pytest.fixture
def prefills(monkeypatch):
    """(positions prefilled, positions already in the cache it continued from) for each prefill."""
    seen = []
    original = scheduler_module.prefill

    def spy(model, tokens, mask, cache=None):
        seen.append((tokens.shape[1], 0 if cache is None else cache[0].offset))
        return original(model, tokens, mask, cache)

    monkeypatch.setattr(scheduler_module, "prefill", spy)
    return seen


@pytest.mark.parametrize("voice", VOICES)
def test_a_voice_prefix_prefilled_once_gives_the_same_codes(reusing, reference, voices, voice, prefills):
    request = greedy(voices, voice, ["Hello there, friend."], seed=3)
    ours = solo(reusing, request)
    prompt = reusing._prompts.get(voice)
    if prompt is not None:  # only its own text was prefilled, on top of the voice's cached rows
        assert prefills == [(len(reusing.text_tokens("Hello there, friend.", 0)), len(prompt))]
    assert_same_speech(ours, solo(reference, request))


@pytest.mark.slow("generates several chunks to watch a stream's rhythm")
def test_chunks_continue_their_row_and_match_the_reference(reusing, reference, voices, prefills):
    request = greedy(voices, "conversational", CHUNKS, seed=5)
    ours = solo(reusing, request)
    text = [len(reusing.text_tokens(c, 0)) for c in CHUNKS]
    frames = [reusing.frame_cap(c) for c in CHUNKS]
    prompt = len(reusing._prompts["conversational"])
    # Chunk 1 on the cached prefix; chunks 2 and 3 append the last frame (cut by the cap), the end-of-speech
    # row and their text to the row they already have.
    assert prefills == [
        (text[0], prompt),
        (2 + text[1], prompt + text[0] + frames[0] - 1),
        (2 + text[2], prompt + text[0] + frames[0] + 1 + text[1] + frames[1] - 1),
    ]
    assert_same_speech(ours, solo(reference, request))


@pytest.mark.slow("generates with every voice, batched and alone")
def test_batched_requests_with_every_voice_match_the_reference_alone(reusing, reference, voices):
    requests = [greedy(voices, v, CHUNKS[: 1 + i % 3], seed=10 + i) for i, v in enumerate(VOICES)]
    for ours, want in zip(batched(reusing, requests), [solo(reference, r) for r in requests], strict=True):
        assert_same_speech(ours, want)


@pytest.mark.slow("fills CSM's context to its 2,048 positions")
def test_a_row_that_no_longer_fits_falls_back_to_a_trimmed_prefill_from_the_prefix(
    reusing, reference, voices, prefills, monkeypatch
):
    """With CSM's context made short (480 positions: the voice's prompt is 378), a later chunk no longer fits
    behind the row's whole history: it is prefilled from the cached voice prefix plus the most recent history
    that fits, exactly as the reference path chooses, and the codes stay the same."""
    monkeypatch.setattr(session_module, "MAX_POSITIONS", 480)
    chunks = [f"Chunk number {n} of a longer answer." for n in range(5)]
    request = greedy(voices, "conversational", chunks, seed=9, max_frames_per_chunk=20)
    ours = solo(reusing, request)
    prompt = len(reusing._prompts["conversational"])
    continued = [p for p in prefills[1:] if p[1] > prompt]
    trimmed = [p for p in prefills[1:] if p[1] == prompt]
    assert continued and trimmed, prefills
    assert_same_speech(ours, solo(reference, request))


def test_the_prefix_cache_is_bounded_and_reported(tiny_checkpoint, voices, reusing):
    report = reusing.prefixes.report()
    assert report["entries"] == 2  # conversational and whisper share one clip and transcript; professional has its own
    assert 0 < report["mb"] <= report["limit_mb"]
    small = load_engine(Settings(model_id=str(tiny_checkpoint), voice_cache_mb=0, **ENGINE_CAPS), voices)
    assert small.prefixes.report()["entries"] == 0  # nothing fits: every request prefills its voice itself
    pcm, usage = solo(small, greedy(voices, "conversational", ["Still speaks."]))
    assert usage.output_tokens > 0 and len(pcm) == usage.output_tokens * 1920 * 2


@pytest.mark.slow("fills CSM's context to its 2,048 positions")
def test_a_voice_prompt_too_long_for_a_chunk_is_refused_at_start(tiny_checkpoint, voices, tmp_path):
    import shutil
    import wave

    from serve_app.core.errors import ModelLoadError

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    rate = 24000
    noise = (np.random.default_rng(0).standard_normal(rate * 150) * 3000).astype("<i2")  # 150 s: ~1,900 frames
    with wave.open(str(copy / "prompts" / "conversational_b.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(noise.tobytes())
    with pytest.raises(
        ModelLoadError, match="voice 'professional' prompt.audio .*conversational_b.wav.* over CSM's 2048"
    ):
        load_engine(Settings(model_id=str(copy), **ENGINE_CAPS), voices)


@pytest.mark.slow("generates several chunks to watch a stream's rhythm")
def test_a_long_prompt_joins_in_pieces_and_the_stream_keeps_its_rhythm(tiny_checkpoint, voices, reference):
    """PREFILL_STEP_POSITIONS=32: a request whose 378-position voice clip must be prefilled (no KV reuse here)
    joins a streaming request over many steps, and the streaming one still gets a frame every step. Both
    produce exactly the codes they produce alone (where the prompt goes in at once)."""
    from serve_app.engine.scheduler import BatchScheduler

    chunked = load_engine(
        Settings(
            model_id=str(tiny_checkpoint), dtype="float32", prefix_cache=False, prefill_step_positions=32, **ENGINE_CAPS
        ),
        voices,
    )
    streaming = greedy(voices, "fast", ["A long first request that keeps on streaming."], seed=1)
    joining = greedy(voices, "conversational", ["Joining."], seed=2)
    out = {"streaming": [], "joining": []}
    scheduler = BatchScheduler(chunked, 4)
    scheduler.add(GenerationJob(streaming, out["streaming"].append))
    for _ in range(4):  # past its first audio (read in a step of its own, before the next launch)
        scheduler.step()
    [first] = scheduler.rows
    scheduler.add(GenerationJob(joining, out["joining"].append))
    steps = 0
    while len(scheduler.rows) < 2:
        before = first.usage.output_tokens
        scheduler.step()
        assert first.usage.output_tokens == before + 1  # a frame every step while the other prefills
        steps += 1
    prompt = len(chunked._prompts["conversational"]) + len(chunked.text_tokens("Joining.", 0))
    assert steps == -(-prompt // 32)  # in 32-position pieces
    while scheduler.active:
        scheduler.step()
    for name, request in (("streaming", streaming), ("joining", joining)):
        items = out[name]
        assert items[-1] is END
        assert_same_speech((b"".join(items[:-2]), items[-2]), solo(reference, request))


@pytest.mark.slow("fills CSM's context to its 2,048 positions")
def test_a_voice_clip_that_does_not_fit_is_left_out_as_without_reuse(reusing, reference, voices, monkeypatch):
    """With CSM's context made shorter than the voice's clip plus the chunk (420 positions), the reference path
    leaves the clip out; the cached prefix must not sneak it back in."""
    monkeypatch.setattr(session_module, "MAX_POSITIONS", 420)
    request = greedy(voices, "conversational", ["Short."], seed=4, max_frames_per_chunk=40)
    assert_same_speech(solo(reusing, request), solo(reference, request))
