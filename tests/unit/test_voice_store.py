"""The custom-voice store on disk (serve_app/voices/store.py): private modes, leftovers of interrupted
writes swept at start, and a full disk answered with 507 and nothing half-stored."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest

from serve_app.core.errors import InsufficientStorageError
from serve_app.core.settings import Settings
from serve_app.voices import store as custom_voices
from serve_app.voices.store import CustomVoiceStore, VoiceRecord, new_id


@pytest.fixture
def store(tmp_path) -> CustomVoiceStore:
    return CustomVoiceStore(Settings(cache_dir=tmp_path))


def _clip(seconds: float = 3.0) -> np.ndarray:
    return (0.3 * np.sin(np.arange(int(24000 * seconds)) * 0.05)).astype(np.float32)


def _voice(store: CustomVoiceStore, consent: str, name: str = "Jo") -> VoiceRecord:
    record = VoiceRecord(
        id=new_id("voice"),
        name=name,
        created_at=1,
        consent=consent,
        transcript=None,
        duration_s=3.0,
        conditioning="audio_only",
    )
    return store.add_voice(record, _clip(), np.zeros((32, 10), np.int32), "tag", set())


def _modes(root) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")] if p.name != ".lock"
    }


def test_recordings_and_records_are_private(store):
    consent = store.add_consent("Jo", "en", _clip())
    _voice(store, consent.id)
    modes = _modes(store.root)
    assert modes and all(mode == (0o700 if (store.root / path).is_dir() else 0o600) for path, mode in modes.items()), (
        modes
    )


def test_folders_made_by_an_earlier_version_are_made_private(store):
    (store.root / "voices").mkdir(parents=True, mode=0o755)
    os.chmod(store.root, 0o755)
    store.add_consent("Jo", "en", _clip())
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE((store.root / "voices").stat().st_mode) == 0o700


def test_leftovers_of_interrupted_writes_are_swept(store):
    kept = store.add_consent("Jo", "en", _clip())
    voice = _voice(store, kept.id)
    consents, voices = store.root / "consents", store.root / "voices"
    # What a crash at each step leaves: a half-written voice folder, a deletion's trash, a recording whose
    # record was never written, temporary names of both kinds, a codes file being replaced.
    (voices / ".new-voice_0123456789abcdef01234567").mkdir()
    (voices / ".new-voice_0123456789abcdef01234567" / "sample.wav").write_bytes(b"RIFF")
    (voices / ".deleted-voice_x-1234").mkdir()
    (consents / "cons_0123456789abcdef01234567.wav").write_bytes(b"RIFF")
    (consents / ".cons_0123456789abcdef01234567.wav").write_bytes(b"RIFF")
    (consents / f".{kept.id}.json.abcd1234").write_text("{")
    (voices / voice.id / ".codes-1234abcd.npy").write_bytes(b"\x93NUMPY")
    removed = CustomVoiceStore(Settings(cache_dir=store.root.parent)).sweep()
    assert len(removed) == 6, removed
    assert sorted(p.name for p in consents.iterdir()) == sorted([f"{kept.id}.json", f"{kept.id}.wav"])
    assert [p.name for p in voices.iterdir()] == [voice.id]
    assert sorted(p.name for p in (voices / voice.id).iterdir()) == ["codes-tag.npy", "sample.wav", "voice.json"]
    assert store.voices()[voice.id].name == "Jo" and store.consent(kept.id).name == "Jo"
    assert store.sweep() == []


@pytest.mark.parametrize("where", ["consent", "voice"])
def test_a_full_disk_is_a_507_and_nothing_half_stored(store, monkeypatch, where):
    consent = store.add_consent("Jo", "en", _clip()) if where == "voice" else None
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*")) if store.root.exists() else []

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(custom_voices, "write_wav", full)
    with pytest.raises(InsufficientStorageError) as info:
        store.add_consent("Ann", "en", _clip()) if where == "consent" else _voice(store, consent.id, "Ann")
    assert info.value.status_code == 507 and info.value.code == "insufficient_storage"
    after = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    assert [p for p in after if p not in before and p.name != ".lock" and str(p) not in ("consents", "voices")] == []
