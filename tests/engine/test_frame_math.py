"""The one-function frame (engine/frame.py) and the leaner Mimi decode (engine/codec.py) compute the same bits
as the loop they replaced (tests/support/reference_frame.py: commit a1c44ca's frame, mlx-audio's RoPE, depth
decoder and `Mimi.decode_step`): same seed, same batch, byte-identical codes and PCM, with rows joining and
leaving, a chunk ending on end-of-speech with a speculative frame in flight, pipelined or not. The same shapes
run on both sides, so this holds on every backend. Compiled vs not: test_frame_loop's compiled test."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from serve_app.core.messages import SynthesisRequest, Usage
from serve_app.engine import frame
from serve_app.engine.batch import CAPACITY_STEP, bucket_for
from serve_app.engine.codec import MimiDecoder, MimiDecodeState, decode_states
from serve_app.engine.runners import compile_shapes
from serve_app.engine.scheduler import BUCKET_LOOKAHEAD, BatchScheduler, GenerationJob
from tests.support import reference_frame
from tests.support.forcing import end_of_speech_at
from tests.support.generation import accepted_codes, generate

# Four requests, two at a time: the third and fourth join while others generate; different voices, prompts,
# temperatures, top-k and chunk counts.
SPECS = [
    ("conversational", ["Hello there, how are you?", "Second chunk."], 11, 7),
    ("fast", ["Hi."], 12, 5),
    ("professional", ["One two three.", "Four."], 13, 9),
    ("fast", ["x y"], 14, 4),
]


def run(engine, voices, monkeypatch, specs, max_batch, pipelined=True) -> list[tuple[bytes, Usage, np.ndarray]]:
    """Each request's PCM, Usage and the codes its session accepted."""
    seen, requests = accepted_codes(monkeypatch), []
    outputs, _ = generate(engine, voices, specs, pipelined, max_batch, requests)
    return [(pcm, usage, np.stack(seen[id(r)])) for (pcm, usage), r in zip(outputs, requests)]


def with_reference(engine, monkeypatch) -> None:
    monkeypatch.setattr(engine, "frame_step", reference_frame.ReferenceFrameStep(engine.model, False))


@pytest.mark.parametrize(
    "max_batch, pipelined", [(1, True), (2, False), (4, True)], ids=["1-pipelined", "2-unpipelined", "4-pipelined"]
)
def test_frame_equals_the_loop_it_replaced(engine, voices, monkeypatch, max_batch, pipelined):
    ours = run(engine, voices, monkeypatch, SPECS, max_batch, pipelined)
    with_reference(engine, monkeypatch)
    theirs = run(engine, voices, monkeypatch, SPECS, max_batch, pipelined)
    for (pcm, usage, codes), (ref_pcm, ref_usage, ref_codes) in zip(ours, theirs):
        assert np.array_equal(codes, ref_codes)
        assert (pcm, usage) == (ref_pcm, ref_usage)
    assert [u.output_tokens for _, u, _ in ours] == [14, 5, 18, 4]


def test_a_speculative_frame_is_discarded_as_the_old_loop_did(engine, voices, monkeypatch):
    """The 5th launch ends request 0's first chunk while its 6th frame is in flight: the new loop takes back
    that draw exactly as the old one did (the rows' keys stay on the device between frames now)."""
    specs = SPECS[:2]
    end_of_speech_at(engine, monkeypatch, 5)
    ours = run(engine, voices, monkeypatch, specs, 2)
    monkeypatch.undo()
    with_reference(engine, monkeypatch)
    end_of_speech_at(engine, monkeypatch, 5)
    theirs = run(engine, voices, monkeypatch, specs, 2)
    assert [(p, u) for p, u, _ in ours] == [(p, u) for p, u, _ in theirs]
    assert ours[0][1].output_tokens == 4 + 7


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_rope_on_pairs_is_mlx_audios_rope_bit_for_bit(engine, dtype):
    rope = engine.model.decoder.layers[0].self_attn.rope
    cos, sin = frame.rope_tables(rope, dtype)
    x = mx.random.normal((3, 2, 4, rope.dim), key=mx.random.key(1)).astype(dtype)
    for offset in (0, 5, 31):
        expected = rope(x, offset=offset)
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        got = frame.rope(pairs, cos[offset : offset + 2][None, :, None], sin[offset : offset + 2][None, :, None])
        got = got.reshape(x.shape)  # (rotated pairs back to head_dim)
        assert got.dtype == expected.dtype and mx.array_equal(got, expected).item()


def test_every_rows_noise_in_one_draw_is_its_own_draw():
    keys = [mx.random.key(seed) for seed in (3, 99, 12345)]
    noise, after = frame.draw_noise(mx.stack(keys), 32, 64)
    alone, alone_after = reference_frame.draw_noise(keys, 32, 64)
    assert mx.array_equal(noise, alone).item() and mx.array_equal(after, mx.stack(alone_after)).item()
    # A row's noise does not depend on the others.
    assert mx.array_equal(frame.draw_noise(mx.stack(keys[1:2]), 32, 64)[0][0], noise[1]).item()


@pytest.mark.parametrize("rows", [1, 2])
def test_mimi_decoder_equals_mimi_decode_step(engine, rows):
    """Groups as the loop decodes them (2 frames, then 6, then a chunk's 3), the rows together."""
    ours = MimiDecoder(engine.mimi, compiled=False)
    reference = MimiDecoder(engine.mimi, compiled=False)
    reference.step = engine.mimi.decode_step  # mlx-audio's own: every codebook alone, a mask per layer
    mine, theirs = [MimiDecodeState(ours) for _ in range(rows)], [MimiDecodeState(reference) for _ in range(rows)]
    rng = np.random.default_rng(rows)
    for frames in (2, 6, 3):
        codes = list(rng.integers(0, 2048, size=(rows, engine.num_codebooks, frames)).astype(np.int32))
        for got, want in zip(decode_states(mine, codes), decode_states(theirs, codes)):
            assert got.shape == (frames * 1920,) and np.array_equal(got, want)
            assert np.abs(got).max() > 0


@pytest.mark.slow("traces a compiled frame per cache size")
def test_the_next_cache_bucket_is_traced_ahead_of_need(engine, voices, monkeypatch):
    """A compiled frame meets a new shape when the rows outgrow the cache's bucket; the loop traces it a few
    frames ahead, right after a launch, not when the row needs it. (A spy stands in for the compile: the
    frames themselves run the engine's own uncompiled FrameStep.)"""
    step, calls = engine.frame_step, []

    class Spy:
        compiled = True

        def __call__(self, *args):
            return step(*args)

        def prepare(self, rows, capacity):
            calls.append((rows, capacity, scheduler._kv.capacity, int(scheduler._kv.lengths.max())))
            return True

    monkeypatch.setattr(engine, "frame_step", Spy())
    scheduler = BatchScheduler(engine, 1)
    posts: list = []
    # A voice whose clip fills most of the second bucket: its row reaches the third within ~130 frames.
    request = SynthesisRequest(["Hi."], voices.resolve("professional"), seed=1, max_frames_per_chunk=300)
    scheduler.add(GenerationJob(request, posts.append))
    started_in = None
    while scheduler.active and not calls:
        scheduler.step()
        started_in = started_in or (scheduler._kv.capacity if scheduler.rows else None)
    rows, capacity, had, length = calls[0]
    assert (rows, had, capacity) == (1, started_in, started_in + CAPACITY_STEP)
    # Traced at the first frame it could be, BUCKET_LOOKAHEAD frames before the row needs the new bucket.
    assert length + 1 + BUCKET_LOOKAHEAD > had >= length + BUCKET_LOOKAHEAD


def test_prepare_traces_without_evaluating(engine):
    compiled = frame.FrameStep(engine.model, compiled=True)
    before = mx.get_active_memory()
    assert compiled.prepare(2, 2 * CAPACITY_STEP) and compiled.shapes == {(2, 2 * CAPACITY_STEP)}
    assert not compiled.prepare(2, 2 * CAPACITY_STEP)  # once per shape
    assert mx.get_active_memory() <= before + (1 << 20)  # nothing computed: no cache of 512 positions made
    assert not frame.FrameStep(engine.model, compiled=False).prepare(1, CAPACITY_STEP)


def test_only_steady_frames_take_the_compiled_path(engine, voices, monkeypatch):
    """A frame with rows joining (a batch starting, a request's next chunk, a request arriving) runs the plain
    function, so the compiled one keeps a graph per (rows, bucket) only."""
    step = frame.FrameStep(engine.model, compiled=False)
    through, plain = [], step._fn

    def compiled_path(prev, positions, keys, values, joined, *rest):
        through.append((prev.shape[0], len(joined)))
        return plain(prev, positions, keys, values, joined, *rest)

    step._fn = compiled_path
    monkeypatch.setattr(engine, "frame_step", step)
    specs = [("fast", ["Hi.", "Two."], 1, 3), ("fast", ["Hello there."], 2, 6), ("fast", ["x"], 3, 2)]
    _, scheduler = generate(engine, voices, specs, max_batch=2)
    assert through and {joining for _, joining in through} == {0}
    assert scheduler.stats.launches > len(through)  # the frames with rows joining went the plain way
    assert step.shapes == {(rows, CAPACITY_STEP) for rows, _ in through} == {(1, CAPACITY_STEP), (2, CAPACITY_STEP)}


def test_warm_up_traces_a_request_alone_in_every_bucket_its_voice_can_reach(engine):
    """The generations of warm-up ran every batch size in the first bucket; one request alone can then reach
    every bucket up to the longest voice prompt with the longest chunk."""
    shapes = compile_shapes(engine)
    longest = max(len(tokens) for tokens in engine._prompts.values())
    last = bucket_for(longest + engine.longest_chunk_positions() + 1)
    assert shapes == [(1, capacity) for capacity in range(CAPACITY_STEP, last + 1, CAPACITY_STEP)]
    assert last > CAPACITY_STEP
    step = frame.FrameStep(engine.model, compiled=True)
    assert sum(step.prepare(*shape) for shape in shapes) == len(shapes)  # each traced once, none evaluated
