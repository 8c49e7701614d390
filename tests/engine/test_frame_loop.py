"""The frame loop's speed work keeps the output: pipelined (frame N+1 launched before frame N is read) vs
not and compiled vs not byte for byte on the tiny checkpoint (the same shapes run, so on every backend), Mimi
batched across requests vs alone byte for byte where rows are independent of the batch (tests/support/backend.py),
else within 40 dB. And the loop's shape: one host synchronisation per frame, taken after the next frame was launched."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.core.settings import Settings
from serve_app.engine.codec import MimiDecodeState, decode_states
from serve_app.engine.scheduler import BatchScheduler
from serve_app.model.loading import load_engine
from tests.support.backend import assert_same_pcm
from tests.support.forcing import end_of_speech_at
from tests.support.generation import generate
from tests.support.reference_frame import ReferenceFrameStep

CHUNKS = ["Hello there, how are you?", "Second chunk."]


def test_pipelined_equals_unpipelined(engine, voices):
    specs = [("conversational", CHUNKS, 1, 7), ("fast", ["Hi."], 2, 5), ("fast", CHUNKS, 3, 3)]
    piped, _ = generate(engine, voices, specs)
    plain, _ = generate(engine, voices, specs, pipelined=False)
    assert piped == plain
    assert [u.output_tokens for _, u in piped] == [14, 5, 6]


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "unpipelined"])
def test_a_chunk_ending_on_end_of_speech_discards_its_speculative_frame(engine, voices, monkeypatch, pipelined):
    """The 5th frame ends the first chunk: the pipelined loop had launched a 6th for it, which must leave no
    trace (its PRNG split and its cache position are taken back), so the second chunk is the same."""
    reference, _ = generate(engine, voices, [("fast", CHUNKS, 4, 9)], pipelined=False)
    end_of_speech_at(engine, monkeypatch, 5)
    [(pcm, usage)], _ = generate(engine, voices, [("fast", CHUNKS, 4, 9)], pipelined=pipelined)
    assert usage.output_tokens == 4 + 9  # the end-of-speech frame is not audio
    if pipelined:
        monkeypatch.undo()
        end_of_speech_at(engine, monkeypatch, 5)
        [(plain_pcm, plain_usage)], _ = generate(engine, voices, [("fast", CHUNKS, 4, 9)], pipelined=False)
        assert (pcm, usage) == (plain_pcm, plain_usage)
    assert pcm[: 4 * 1920 * 2] == reference[0][0][: 4 * 1920 * 2] and pcm != reference[0][0]


@pytest.mark.slow  # MLX's CPU backend compiles with a C++ compiler: ~30 s of a cold cache
def test_compiled_equals_uncompiled(tiny_checkpoint, voices, engine, monkeypatch):
    compiled = load_engine(Settings(model_id=str(tiny_checkpoint), mlx_compile="on"), voices)
    assert compiled.frame_step.compiled
    # One request (batch 1, its two chunks): every compiled function the frame loop has, at the fewest shapes
    # (each new shape is a C++ compile on the CPU backend; batches of more rows run the same functions).
    specs = [("conversational", CHUNKS, 5, 9)]
    ours = generate(compiled, voices, specs)[0]
    assert ours == generate(engine, voices, specs)[0]
    # And the loop before the one-function frame (test_frame_math.py), as it ran: mlx-audio's Mimi decode too.
    monkeypatch.setattr(engine, "frame_step", ReferenceFrameStep(engine.model, compiled=False))
    monkeypatch.setattr(engine.mimi_decoder, "step", engine.mimi.decode_step)
    assert ours == generate(engine, voices, specs)[0]


def test_batched_mimi_equals_each_stream_alone(engine):
    rng = np.random.default_rng(0)
    groups = [rng.integers(0, 2048, size=(3, engine.num_codebooks, t)).astype(np.int32) for t in (2, 6, 6)]
    alone = [MimiDecodeState(engine.mimi_decoder) for _ in range(3)]
    together = [MimiDecodeState(engine.mimi_decoder) for _ in range(3)]
    for codes in groups:
        expected = [stream.decode(codes[i]) for i, stream in enumerate(alone)]
        for got, want in zip(decode_states(together, list(codes)), expected):
            assert_same_pcm(got, want)
    # Streams that are not aligned (another position, another group length) still decode right, apart.
    late = MimiDecodeState(engine.mimi_decoder)
    mixed = decode_states([together[0], late, together[1]], [groups[1][0], groups[0][2], groups[1][1][:, :4]])
    assert_same_pcm(mixed[0], alone[0].decode(groups[1][0]))
    assert_same_pcm(mixed[1], MimiDecodeState(engine.mimi_decoder).decode(groups[0][2]))
    assert_same_pcm(mixed[2], alone[1].decode(groups[1][1][:, :4]))
    assert max(np.abs(p).max() for p in mixed) > 0


def test_one_host_sync_per_frame_taken_after_the_next_launch(engine, voices, monkeypatch):
    reads: list[tuple[int, int]] = []
    read = BatchScheduler._read

    def record(self, frame, after_launch=False):
        reads.append((self.stats.launches, self.stats.frames))
        return read(self, frame, after_launch)

    monkeypatch.setattr(BatchScheduler, "_read", record)
    frames = 12
    [(pcm, usage)], loop = generate(engine, voices, [("fast", ["Hello."], 7, frames)], max_batch=1)
    assert usage.output_tokens == frames and len(pcm) == frames * 1920 * 2
    # Every frame is read after the one behind it was launched, but the one that completes the first group
    # (first audio goes out before the next launch) and the last (its cap: nothing behind it).
    first = engine.options.first_group_frames
    assert reads == [(n + 1, n) if n in (first - 1, frames - 1) else (n + 2, n) for n in range(frames)]
    groups = 1 + -(-(frames - engine.options.first_group_frames) // engine.options.group_frames)
    assert loop.stats.syncs == frames + 1 + groups  # frame reads, the prompt's prefill, Mimi reads
