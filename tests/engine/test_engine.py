"""The CSM engine on the tiny checkpoint: streaming, seeds, caps, context and cancellation, without Ray."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serve_app.core.constants import SAMPLES_PER_FRAME
from serve_app.core.errors import ModelNotReadyError
from serve_app.core.messages import ContextSegment, SynthesisRequest, Usage
from serve_app.core.settings import Settings
from serve_app.engine import session as session_module
from serve_app.engine.prompts import Tokens, fit_context
from serve_app.engine.runners import synthesize
from serve_app.engine.worker import ModelWorker
from serve_app.model.loading import load_engine
from serve_app.model.replica import CSMModel
from serve_app.voices.presets import VoiceLibrary
from tests.support.servers import ENGINE_CAPS as CAPS


def run(engine, chunks, voice="conversational", voices=None, **kw):
    preset = VoiceLibrary.load(Settings().voices_dir).resolve(voice)
    items = list(synthesize(engine, SynthesisRequest(chunks, preset, **kw)))
    assert isinstance(items[-1], Usage)
    return items[:-1], items[-1]


def test_streams_small_first_group_then_larger_groups(engine):
    pcm, usage = run(engine, ["Hello there, friend."], seed=1)
    sizes = [len(p) // 2 for p in pcm]
    assert sizes[0] == engine.options.first_group_frames * SAMPLES_PER_FRAME
    assert sizes[1] == engine.options.group_frames * SAMPLES_PER_FRAME
    assert usage.output_tokens == engine.options.max_frames_for("Hello there, friend.")
    assert sum(sizes) == usage.output_tokens * SAMPLES_PER_FRAME
    samples = np.frombuffer(b"".join(pcm), "<i2")
    assert np.sqrt(np.mean(samples.astype(float) ** 2)) > 300  # audible, not silence


def test_seed_is_reproducible_and_per_request(engine):
    a, _ = run(engine, ["Same text."], seed=42)
    b, _ = run(engine, ["Same text."], seed=42)
    c, _ = run(engine, ["Same text."], seed=43)
    assert a == b and a != c


def test_runaway_cap_from_text_length(engine):
    short = engine.options.max_frames_for("Hi.")
    long = engine.options.max_frames_for("Hi." * 50)
    assert short == 9 and long > 10 * short  # 0.5 s + 0.05 s/char at 12.5 frames/s
    _, usage = run(engine, ["Hi.", "Second chunk here."], seed=1)
    assert usage.output_tokens == short + engine.options.max_frames_for("Second chunk here.")


def test_later_chunks_see_earlier_chunks_as_context(engine_reference, monkeypatch):
    """The reference path (no KV reuse) builds each chunk's context from the prompt and earlier chunks."""
    seen = []
    original = session_module.fit_context

    def spy(fixed, history, budget):
        chosen = original(fixed, history, budget)
        seen.append((len(fixed), len(history), len(chosen)))
        return chosen

    monkeypatch.setattr(session_module, "fit_context", spy)
    run(engine_reference, ["One.", "Two.", "Three."], seed=1)
    assert seen == [(1, 0, 1), (1, 1, 2), (1, 2, 3)]  # voice prompt + every earlier chunk


def test_context_keeps_the_prompt_and_the_most_recent_history():
    def seg(n):
        return Tokens(np.zeros((n, 33), np.int32), np.zeros((n, 33), bool))

    prompt, old, mid, new = seg(100), seg(300), seg(300), seg(300)
    chosen = fit_context([prompt], [old, mid, new], budget=750)
    assert chosen == [prompt, mid, new]
    assert fit_context([seg(900)], [new], budget=500) == [new]


def test_conversation_context_segments_reach_the_model(engine, monkeypatch):
    """A context segment is not just accepted: its positions are in the chunk's context (ahead of the text),
    and it changes what CSM says with the same seed; the same context and seed say the same again."""
    audio = np.sin(np.linspace(0, 200, 24000)).astype(np.float32) * 0.3
    context = [ContextSegment(speaker=1, text="Earlier turn.", audio=audio)]
    expected = len(engine.segment_tokens(context[0]))
    chosen_lengths = []
    original = session_module.fit_context

    def spy(fixed, history, budget):
        chosen = original(fixed, history, budget)
        chosen_lengths.append([len(seg) for seg in chosen])
        return chosen

    monkeypatch.setattr(session_module, "fit_context", spy)
    with_context, usage = run(engine, ["Reply."], voice="fast", seed=1, context=context)
    assert chosen_lengths == [[expected]]  # `fast` has no prompt: the context is the whole of it
    assert usage.output_tokens > 0 and with_context
    without, _ = run(engine, ["Reply."], voice="fast", seed=1)
    again, _ = run(engine, ["Reply."], voice="fast", seed=1, context=context)
    assert b"".join(with_context) != b"".join(without)
    assert b"".join(again) == b"".join(with_context)


def test_context_that_does_not_fit_keeps_the_clip_and_the_most_recent_turns(engine, monkeypatch):
    """CSM has 2,048 positions: the voice's clip always, then the most recent turns that fit (oldest out
    first), then the text and its frames. Three turns of ~700 positions each cannot all fit."""
    turns = [
        ContextSegment(speaker=1, text=f"Turn {i}.", codes=np.full((engine.num_codebooks, 690), i + 1, dtype=np.int32))
        for i in range(3)
    ]
    chosen = []
    original = session_module.fit_context

    def spy(fixed, history, budget):
        kept = original(fixed, history, budget)
        chosen.append((len(fixed), [len(seg) for seg in kept]))
        return kept

    monkeypatch.setattr(session_module, "fit_context", spy)
    run(engine, ["Reply."], seed=1, context=turns)  # `conversational` has a reference clip
    ((prompts, kept),) = chosen
    clip, lengths = kept[0], [len(engine.segment_tokens(t)) for t in turns]
    assert prompts == 1 and clip == len(engine._prompts["conversational"])
    assert kept[1:] == lengths[-(len(kept) - 1) :] and 1 <= len(kept) - 1 < 3  # a suffix: the newest turns
    assert sum(kept) + len(engine.text_tokens("Reply.", 0)) + engine.frame_cap("Reply.") <= 2048


def test_cancel_stops_within_a_frame(engine):
    frames = []
    cancel = threading.Event()
    preset = VoiceLibrary.load(Settings().voices_dir).resolve("fast")
    gen = synthesize(engine, SynthesisRequest(["A long sentence " * 20], preset, seed=1), cancel.is_set)
    first = next(gen)
    cancel.set()
    frames = list(gen)
    assert len(first) == 2 * 2 * SAMPLES_PER_FRAME
    assert frames == []  # nothing more after the cancel, not even the final group


def test_worker_stream_cancels_when_consumer_leaves(engine, voices):
    """A consumer that stops listening leaves the batch at the next frame, long before its cap."""
    from serve_app.engine.scheduler import BatchScheduler

    request = SynthesisRequest(["A long sentence " * 40], voices.resolve("fast"), seed=1)
    assert engine.options.max_frames_for(request.chunks[0]) > 300  # ~10 s of generation here

    async def consume():
        worker = ModelWorker()
        worker.scheduler = BatchScheduler(engine, 4)
        async for _item in worker.stream(request):
            break
        left = time.monotonic()
        while worker.generating and time.monotonic() - left < 5:
            await asyncio.sleep(0.01)
        gone_after = time.monotonic() - left
        worker.stop()
        return gone_after

    assert asyncio.run(consume()) < 0.5


def test_worker_runs_everything_on_one_thread():
    worker = ModelWorker()
    names = {worker.submit(lambda: threading.current_thread().name).result() for _ in range(5)}
    assert names == {"mlx-worker"}
    worker.stop()


def test_model_deployment_reports_load_failure(tmp_path, voices):
    model = CSMModel(Settings(model_id=str(tmp_path / "missing")), voices)
    for _ in range(100):
        health = asyncio.run(model.health())
        if health.status != "loading":
            break
        time.sleep(0.05)
    assert health.status == "failed" and "no such directory" in health.error

    async def first():
        async for item in model.generate(None):
            return item

    with pytest.raises(ModelNotReadyError, match="failed to load.*no such directory") as info:
        asyncio.run(first())
    assert info.value.status_code == 503


def test_model_deployment_streams_when_ready(tiny_checkpoint, voices):
    model = CSMModel(Settings(model_id=str(tiny_checkpoint), **CAPS), voices)

    async def collect():
        for _ in range(200):
            if (await model.health()).status == "ready":
                break
            await asyncio.sleep(0.05)
        request = SynthesisRequest(["Hello."], voices.resolve("fast"), seed=1)
        return [item async for item in model.generate(request)]

    items = asyncio.run(collect())
    assert all(isinstance(i, bytes) for i in items[:-1]) and isinstance(items[-1], Usage)


def test_missing_prompt_clip_names_the_voice(tiny_checkpoint, tmp_path, voices):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "prompts" / "conversational_b.wav").unlink()
    from serve_app.core.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="voice 'professional' prompt.audio: .*conversational_b.wav.* not found"):
        load_engine(Settings(model_id=str(copy)), voices)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_load_and_speak(tiny_checkpoint, voices, bits):
    import mlx.nn as nn

    engine = load_engine(Settings(model_id=str(tiny_checkpoint), quantize=bits, **CAPS), voices)
    q_proj = engine.model.backbone.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == bits
    pcm, usage = run(engine, ["Hello there."], seed=1)
    samples = np.frombuffer(b"".join(pcm), "<i2")
    assert len(samples) == usage.output_tokens * SAMPLES_PER_FRAME > 0
    assert np.sqrt(np.mean(samples.astype(float) ** 2)) > 300


def test_whisper_plays_8_db_quieter_than_the_same_sampling_without_gain(engine, voices):
    """Same preset, same seed, same codes: only the gain differs, so the PCM ratio is exactly -8 dB (0.398)."""
    whisper = voices.resolve("whisper")
    unity = whisper.model_copy(update={"gain_db": 0.0})  # same name: the same voice prompt
    quiet = np.frombuffer(
        b"".join(
            i for i in synthesize(engine, SynthesisRequest(["Softly now."], whisper, seed=5)) if isinstance(i, bytes)
        ),
        "<i2",
    ).astype(float)
    loud = np.frombuffer(
        b"".join(
            i for i in synthesize(engine, SynthesisRequest(["Softly now."], unity, seed=5)) if isinstance(i, bytes)
        ),
        "<i2",
    ).astype(float)
    assert len(quiet) == len(loud) > 0
    unclipped = np.abs(loud) < 32000  # where the unity copy hit full scale the ratio says nothing
    assert unclipped.mean() > 0.9
    ratio = np.sqrt(np.mean(quiet[unclipped] ** 2) / np.mean(loud[unclipped] ** 2))
    assert ratio == pytest.approx(10 ** (-8 / 20), rel=0.01)
