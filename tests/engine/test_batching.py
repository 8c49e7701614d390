"""Continuous batching on the tiny checkpoint, without Ray: a request's audio does not depend on who shares
its batch, requests join and leave between frames, and every request in a batch still streams. Byte for
byte where this backend computes rows independently of the batch (tests/support/backend.py says when)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from serve_app.core.constants import SAMPLES_PER_FRAME
from serve_app.core.messages import SynthesisRequest, Usage
from serve_app.core.settings import Settings
from serve_app.engine.batch import BatchKV, prefill
from serve_app.engine.frame import backbone_math, embed_frame
from serve_app.engine.scheduler import END, BatchScheduler, GenerationJob
from serve_app.model.loading import load_engine
from tests.support.backend import ROWS_INDEPENDENT, assert_same_speech

# Different voices (prompt lengths, temperatures, top-k), text lengths (frame caps) and chunk counts.
REQUESTS = [
    ("conversational", ["Hello there, how are you?", "Second chunk."], 1),
    ("fast", ["Hi."], 2),
    ("professional", ["A somewhat longer sentence for the third request.", "And more."], 3),
    ("conversational", ["Hello there, how are you?"], 4),
]


class Recorder:
    """A job's output, and the scheduler step at which each item arrived."""

    def __init__(self, scheduler_steps: list):
        self.items: list = []
        self.steps: list[int] = []
        self._clock = scheduler_steps
        self.cancelled = False

    def post(self, item) -> None:
        self.items.append(item)
        self.steps.append(len(self._clock))

    @property
    def pcm(self) -> bytes:
        return b"".join(i for i in self.items if isinstance(i, bytes))

    @property
    def usage(self) -> Usage:
        return next(i for i in self.items if isinstance(i, Usage))


def run(engine, voices, specs, max_batch, join_at=None, cancel=None, pipelined=True):
    """Run `specs` through one scheduler. join_at[i]: the step at which request i is added (default 0);
    cancel[i]: the step after which request i is cancelled."""
    join_at, cancel = join_at or {}, cancel or {}
    scheduler = BatchScheduler(engine, max_batch, pipelined=pipelined)
    clock: list = []
    recorders = [Recorder(clock) for _ in specs]
    sizes = []
    pending = dict(enumerate(specs))
    while pending or scheduler.active:
        for i in [i for i in pending if join_at.get(i, 0) <= len(clock)]:
            voice, chunks, seed = pending.pop(i)
            rec = recorders[i]
            scheduler.add(
                GenerationJob(
                    SynthesisRequest(chunks, voices.resolve(voice), seed=seed), rec.post, lambda rec=rec: rec.cancelled
                )
            )
        for i, step in cancel.items():
            recorders[i].cancelled = recorders[i].cancelled or len(clock) >= step
        if scheduler.active:
            scheduler.step()
            sizes.append(len(scheduler.rows))
        clock.append(None)
    return recorders, sizes


@pytest.fixture(scope="module")
def alone(engine, voices):
    """Each request on its own through the unpipelined loop: what every batched, pipelined run must equal."""
    return [run(engine, voices, [spec], max_batch=1, pipelined=False)[0][0] for spec in REQUESTS]


@pytest.mark.slow("generates with every voice, batched and alone")
def test_batched_output_equals_unbatched_output(engine, voices, alone):
    together, sizes = run(engine, voices, REQUESTS, max_batch=4)
    assert max(sizes) == 4  # they really shared the batch
    for solo, batched in zip(alone, together):
        assert batched.items[-1] is END
        assert_same_speech((batched.pcm, batched.usage), (solo.pcm, solo.usage))
        samples = np.frombuffer(batched.pcm, "<i2")
        assert len(samples) == batched.usage.output_tokens * SAMPLES_PER_FRAME
        assert np.sqrt(np.mean(samples.astype(float) ** 2)) > 300


@pytest.mark.slow("generates several chunks to watch a stream's rhythm")
def test_requests_join_a_running_batch_between_frames(engine, voices, alone):
    together, sizes = run(engine, voices, REQUESTS, max_batch=4, join_at={1: 3, 2: 5, 3: 9})
    assert sizes[:3] == [1, 1, 1] and 2 in sizes and 3 in sizes
    for solo, batched in zip(alone, together):
        assert_same_speech((batched.pcm, batched.usage), (solo.pcm, solo.usage))


@pytest.mark.slow("needs every request generated alone first, then batched")
def test_a_request_leaving_does_not_disturb_the_others(engine, voices, alone):
    together, _ = run(engine, voices, REQUESTS, max_batch=4, cancel={0: 4})
    gone = together[0]
    assert gone.items[-1] is END and not any(isinstance(i, Usage) for i in gone.items)
    assert len(gone.pcm) < len(alone[0].pcm)
    if ROWS_INDEPENDENT:
        assert alone[0].pcm.startswith(gone.pcm)  # what it got before leaving was its own audio
    for solo, batched in zip(alone[1:], together[1:]):
        assert_same_speech((batched.pcm, batched.usage), (solo.pcm, solo.usage))


def test_every_request_in_a_batch_streams(engine, voices):
    together, _ = run(engine, voices, REQUESTS, max_batch=4)
    group = engine.options.first_group_frames
    for rec in together:
        first = next(i for i, item in enumerate(rec.items) if isinstance(item, bytes))
        assert len(rec.items[first]) == 2 * group * SAMPLES_PER_FRAME
        # posted in the step that reads its 2nd frame (launched one step earlier), not at the end
        assert rec.steps[first] == group
    last_step = max(rec.steps[-1] for rec in together)
    assert all(rec.steps[0] < last_step / 2 for rec in together)


@pytest.mark.slow("generates several chunks to watch a stream's rhythm")
def test_max_batch_size_bounds_the_batch_and_the_rest_wait(engine, voices, alone):
    together, sizes = run(engine, voices, REQUESTS, max_batch=2)
    assert max(sizes) == 2
    for solo, batched in zip(alone, together):
        assert_same_speech((batched.pcm, batched.usage), (solo.pcm, solo.usage))


def test_batched_backbone_step_matches_mlx_audio_backbone(tiny_checkpoint, voices):
    """Our per-row-position step is the same math as mlx-audio's backbone with its own KV cache."""
    engine = load_engine(Settings(model_id=str(tiny_checkpoint), dtype="float32"), voices)
    model, k = engine.model, engine.num_codebooks
    rng = np.random.default_rng(0)
    prompts = [engine.text_tokens(text, 0) for text in ("Hello.", "A longer prompt than the first one.")]
    kv, reference = BatchKV(len(model.backbone.layers)), []
    for tokens in prompts:
        _, cache = prefill(model, mx.array(tokens.ids)[None], mx.array(tokens.mask)[None])
        kv.add(cache)
        _, ref_cache = prefill(model, mx.array(tokens.ids)[None], mx.array(tokens.mask)[None])
        reference.append(ref_cache)
    for _ in range(3):
        codes = mx.array(rng.integers(0, 2048, size=(2, k)), dtype=mx.int32)
        kv.prepare_step()
        weights = engine.frame_step.weights
        h = embed_frame(model, codes, weights.offsets)
        ours, kv.keys, kv.values = backbone_math(model.backbone, weights, h, mx.array(kv.lengths), kv.keys, kv.values)
        kv.lengths = kv.lengths + 1
        for row, cache in enumerate(reference):
            h = embed_frame(model, codes[row : row + 1], weights.offsets)[:, None, :]
            theirs = model.backbone(h, cache=cache)[:, -1, :]
            np.testing.assert_allclose(np.array(ours[row]), np.array(theirs[0]), rtol=1e-4, atol=1e-4)
    assert list(kv.lengths) == [cache[0].offset for cache in reference]
