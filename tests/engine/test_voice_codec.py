"""A custom voice's Mimi codes carry the tag of the codec that made them, end to end: from the store, through
the voice directory's prompt (what the text frontend sends with a request), to the engine, which uses them only
when its own Mimi has that tag. Across a change of Mimi weights (a second tiny checkpoint, another seed) the
engine encodes the kept clip again, keeps those codes beside the old ones, and never speaks through the other
codec's tokens; on a machine without the clip it refuses with a clear 400."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.core.errors import InvalidRequestError
from serve_app.core.settings import Settings
from serve_app.model.loading import ReplicaVoices, load_engine
from serve_app.tools.tiny_checkpoint import write_checkpoint
from serve_app.voices.directory import VoiceDirectory
from serve_app.voices.store import CustomVoiceStore, VoiceRecord, new_id, read_wav
from tests.support.servers import ENGINE_CAPS, TINY_CODEBOOKS

TRANSCRIPT = "This is how I sound."


def _tone(seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(24000 * seconds)) / 24000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _ids(tokens) -> np.ndarray:
    return np.array(tokens.ids)


@pytest.fixture(scope="module")
def other_mimi(tmp_path_factory):
    """The same layout with other random weights: another Mimi, so another codes tag."""
    return write_checkpoint(tmp_path_factory.mktemp("other-mimi"), seed=1, codebooks=TINY_CODEBOOKS)


@pytest.fixture
def made_by_a(engine, voices, tmp_path):
    """A custom voice made on a server whose model is the session's tiny checkpoint (engine A): its store
    holds the clip and A's codes, tagged with A's Mimi."""
    settings = Settings(cache_dir=tmp_path / "cache")
    store = CustomVoiceStore(settings)
    consent = store.add_consent("Jo", "en-US", _tone(1.0))
    sample = _tone()
    codes_a = engine.encode_audio(sample)
    record = VoiceRecord(
        id=new_id("voice"), name="Jo", created_at=1, consent=consent.id, transcript=TRANSCRIPT, duration_s=1.5
    )
    store.add_voice(record, sample, codes_a, engine.codes_tag, set())
    return settings, store, record, codes_a


def test_the_prompt_a_request_carries_names_its_codec(engine, voices, made_by_a):
    settings, store, record, codes_a = made_by_a
    directory = VoiceDirectory(voices, store)
    prompt = directory.prompt(directory.resolve("jo"))
    assert prompt.codes_tag == engine.codes_tag and np.array_equal(prompt.codes, codes_a)


@pytest.mark.slow("writes and loads a second checkpoint")
def test_after_a_change_of_mimi_the_clip_is_encoded_again_and_the_old_codes_are_never_used(
    engine, voices, made_by_a, other_mimi, tmp_path
):
    settings, store, record, codes_a = made_by_a
    directory = VoiceDirectory(voices, store)
    preset = directory.resolve(record.id)
    sent = directory.prompt(preset)  # A's codes, as the frontend sends them with every request in this voice
    engine_b = load_engine(Settings(model_id=str(other_mimi), cache_dir=settings.cache_dir, **ENGINE_CAPS))
    engine_b.voices = ReplicaVoices(settings, voices)
    assert engine_b.codes_tag != engine.codes_tag

    expected = engine_b.encode_audio(read_wav(store.folder(record.id) / "sample.wav"))
    assert not np.array_equal(expected, codes_a), "the two codecs must disagree for this test to mean anything"
    [tokens] = engine_b.fixed_context(preset.params(), sent)  # a replica that has not seen the voice yet
    assert np.array_equal(_ids(tokens), _ids(engine_b.segment_codes(0, TRANSCRIPT, expected)))
    assert not np.array_equal(_ids(tokens), _ids(engine_b.segment_codes(0, TRANSCRIPT, codes_a)))
    kept = store.folder(record.id) / f"codes-{engine_b.codes_tag}.npy"
    assert np.array_equal(np.load(kept), expected)  # kept beside A's for the next start
    assert (store.folder(record.id) / f"codes-{engine.codes_tag}.npy").is_file()

    # The check is what decides: codes sent under B's own tag are used as they are.
    engine_b.forget_voice(record.id)
    own = type(sent)(0, TRANSCRIPT, codes=codes_a, codes_tag=engine_b.codes_tag)
    [tokens] = engine_b.fixed_context(preset.params(), own)
    assert np.array_equal(_ids(tokens), _ids(engine_b.segment_codes(0, TRANSCRIPT, codes_a)))

    # A machine whose store does not hold the voice cannot encode the clip: a 400 that says why.
    engine_b.forget_voice(record.id)
    engine_b.voices = ReplicaVoices(Settings(cache_dir=tmp_path / "elsewhere"), voices)
    with pytest.raises(InvalidRequestError, match="another Mimi codec") as refused:
        engine_b.fixed_context(preset.params(), sent)
    assert refused.value.code == "invalid_voice" and refused.value.status_code == 400
