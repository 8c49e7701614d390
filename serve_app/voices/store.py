"""Custom voices and their consent recordings, in OpenAI's API shape, kept on disk under CACHE_DIR.

A custom voice is a reference clip (any accepted upload, decoded by ffmpeg to 24 kHz mono) and, optionally,
its transcript: CSM takes both as context, as it does a preset's prompt. The clip's Mimi codes are stored
beside it the first time a model replica encodes it, so a restart or another replica never encodes again.

Layout (everything written to a temporary name, flushed to disk, renamed into place and the folder flushed
too, so a reader never sees half a voice and a crash or a power cut never leaves one; leftovers of a write
that was cut short are swept when the store opens; folders 0700 and files 0600: voice recordings are
personal; a full disk is a 507 with nothing stored):

    CACHE_DIR/custom_voices/
        .lock                      mutations hold it (several frontend replicas may write)
        consents/cons_<hex>.json   the consent's metadata;  cons_<hex>.wav  its recording (24 kHz, 16-bit)
        voices/voice_<hex>/        voice.json, sample.wav, codes-<mimi tag>.npy

Ids are generated here; names are display text only and never reach a path. No MLX in this module: the
ingress, the frontend and the model replica all read the same store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import time
import unicodedata
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import BaseModel

from serve_app.core.constants import SAMPLE_RATE
from serve_app.core.errors import InsufficientStorageError, InvalidRequestError, NotFoundError
from serve_app.core.settings import Settings

# OpenAI's limit per uploaded recording, and the MIME types its spec accepts (plus the generic ones clients
# send when they cannot tell; ffmpeg's demuxer whitelist decides what the bytes really are).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
ACCEPTED_TYPES = (
    "audio/mpeg",
    "audio/mp3",
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/ogg",
    "audio/aac",
    "audio/flac",
    "audio/x-flac",
    "audio/webm",
    "audio/mp4",
    "audio/x-m4a",
    "audio/m4a",
    "video/mp4",
    "video/webm",
    "application/octet-stream",
)
MIN_SAMPLE_S = 1.0  # shorter than this gives CSM too little of the voice to continue
MIN_CONSENT_S = 0.5
SILENCE_PEAK = 10 ** (-50 / 20)  # a clip whose loudest sample is under -50 dBFS is taken as silence
MAX_NAME_CHARS = 128
MAX_TRANSCRIPT_CHARS = 2000
_BCP47 = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")
_ID = re.compile(r"^(cons|voice)_[0-9a-f]{24}$")


class ConsentRecord(BaseModel):
    """OpenAI's VoiceConsentResource."""

    object: str = "audio.voice_consent"
    id: str
    name: str
    language: str
    created_at: int


class VoiceRecord(BaseModel):
    """OpenAI's VoiceResource (the SDK's `Voice`), then our extensions: the consent it was made under, the
    transcript CSM is given with the clip (None: the clip alone), what CSM is conditioned on, the clip's length."""

    object: str = "audio.voice"
    id: str
    name: str
    created_at: int
    type: str = "audio_sample"
    # --- Extensions ---
    consent: str
    transcript: Optional[str] = None
    conditioning: str = "audio_only"  # or "audio_and_transcript"
    duration_s: float = 0.0

    def description(self) -> str:
        how = "with its transcript" if self.transcript else "audio only, no transcript"
        return f"Custom voice '{self.name}', cloned from a {self.duration_s:.1f} s sample ({how})."


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def display_name(value: Optional[str], param: str) -> str:
    """A name as display text: trimmed, 1..MAX_NAME_CHARS, no control characters (it is never a path)."""
    name = (value or "").strip()
    if not name:
        raise InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if len(name) > MAX_NAME_CHARS or any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        raise InvalidRequestError(
            f"Invalid value for '{param}': at most {MAX_NAME_CHARS} characters, no control characters.",
            param=param,
            code="invalid_value",
        )
    return name


def language_tag(value: Optional[str]) -> str:
    tag = (value or "").strip()
    if not _BCP47.match(tag):
        raise InvalidRequestError(
            "Invalid value for 'language': give a BCP 47 tag such as 'en-US'.",
            param="language",
            code="invalid_value" if tag else "missing_required_parameter",
        )
    return tag


def check_clip(pcm: np.ndarray, param: str, min_s: float, max_s: float) -> float:
    """The clip's duration once it is known to be long enough, short enough and not silent."""
    seconds = len(pcm) / SAMPLE_RATE
    if seconds < min_s:
        raise InvalidRequestError(
            f"The audio in '{param}' is {seconds:.2f} s long; at least {min_s:g} s is needed.",
            param=param,
            code="audio_too_short",
        )
    if seconds > max_s:
        raise InvalidRequestError(
            f"The audio in '{param}' is longer than {max_s:g} s (CUSTOM_VOICE_MAX_S); send a shorter clip.",
            param=param,
            code="audio_too_long",
        )
    if float(np.max(np.abs(pcm))) < SILENCE_PEAK:
        raise InvalidRequestError(f"The audio in '{param}' is silent.", param=param, code="audio_silent")
    return round(seconds, 3)


def write_wav(path: Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as src:
        return np.frombuffer(src.readframes(src.getnframes()), dtype="<i2").astype(np.float32) / 32767.0


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _flush(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: the names renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private(path: Path) -> None:
    """A file written to a temporary name: this user's only, and on disk, before it is renamed into place."""
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod(0o700 if item.is_dir() else 0o600)
        _flush(item)


class CustomVoiceStore:
    """The consents and custom voices of one CACHE_DIR. Reads are lock-free (renames are atomic); every
    change holds the store's lock, so the MAX_CUSTOM_VOICES bound holds with several writers."""

    def __init__(self, settings: Settings):
        self.root = settings.cache_dir / "custom_voices"
        self.limit = settings.max_custom_voices
        self._consents = self.root / "consents"
        self._voices = self.root / "voices"
        self._listing: tuple[int, dict[str, VoiceRecord]] = (-1, {})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        for folder in (self.root, self._consents, self._voices):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder.stat().st_mode & 0o077:  # made by an earlier version, or under a loose umask
                folder.chmod(0o700)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            except OSError as exc:
                if exc.errno in _NO_SPACE:
                    raise InsufficientStorageError(
                        "The disk is full: nothing was stored. Free some space on the server and try again."
                    ) from None
                raise
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _place(self, tmp: Path, target: Path) -> None:
        """Rename a finished temporary file or folder into place, durably."""
        _private(tmp)
        os.replace(tmp, target)
        _flush(target.parent)

    def _write_json(self, path: Path, data: BaseModel) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            tmp.write_text(data.model_dump_json())
            self._place(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def sweep(self) -> list[str]:
        """Remove what a write cut short left behind (temporary names, a consent's recording without its
        record, a deletion's trash); returns what was removed. Run once when the store's owner starts."""
        removed = []
        if not self.root.is_dir():
            return removed
        with self._locked():
            for folder in (self._consents, self._voices):
                for item in folder.iterdir():
                    orphan = item.suffix == ".wav" and not item.with_suffix(".json").exists()
                    if item.name.startswith(".") or folder is self._consents and orphan:
                        shutil.rmtree(item) if item.is_dir() else item.unlink()
                        removed.append(f"{folder.name}/{item.name}")
            for voice in self._voices.glob("voice_*"):
                for item in voice.glob(".*"):
                    item.unlink()
                    removed.append(f"voices/{voice.name}/{item.name}")
        return removed

    # --- consents -------------------------------------------------------------------------------------

    def consents(self) -> list[ConsentRecord]:
        """Newest first, as OpenAI lists them."""
        records = [self._read_consent(p) for p in self._consents.glob("cons_*.json")] if self._consents.is_dir() else []
        return sorted((r for r in records if r), key=lambda r: (-r.created_at, r.id))

    def _read_consent(self, path: Path) -> Optional[ConsentRecord]:
        with contextlib.suppress(OSError, ValueError):
            return ConsentRecord.model_validate_json(path.read_text())
        return None

    def consent(self, consent_id: str) -> ConsentRecord:
        record = self._read_consent(self._consents / f"{consent_id}.json") if _ID.match(consent_id) else None
        if record is None or not consent_id.startswith("cons_"):
            raise NotFoundError(
                f"No voice consent with id '{consent_id}'.", param="consent_id", code="consent_not_found"
            )
        return record

    def page(self, limit: int, after: Optional[str]) -> tuple[list[ConsentRecord], bool]:
        """One page of consents after the one with id `after` (cursor pagination): (records, has_more)."""
        records = self.consents()
        if after:
            ids = [r.id for r in records]
            if after not in ids:
                raise InvalidRequestError(
                    f"Invalid value for 'after': no voice consent with id '{after}'.",
                    param="after",
                    code="invalid_value",
                )
            records = records[ids.index(after) + 1 :]
        return records[:limit], len(records) > limit

    def add_consent(self, name: str, language: str, recording: np.ndarray) -> ConsentRecord:
        with self._locked():
            if len(list(self._consents.glob("cons_*.json"))) >= self.limit:
                raise InvalidRequestError(
                    f"This server keeps at most {self.limit} voice consents (MAX_CUSTOM_VOICES); delete one first.",
                    param=None,
                    code="consent_limit_reached",
                )
            record = ConsentRecord(id=new_id("cons"), name=name, language=language, created_at=int(time.time()))
            tmp = self._consents / f".{record.id}.wav"
            try:
                write_wav(tmp, recording)
                self._place(tmp, self._consents / f"{record.id}.wav")
                self._write_json(self._consents / f"{record.id}.json", record)
            except BaseException:  # nothing half-made stays: the recording goes with its record
                tmp.unlink(missing_ok=True)
                (self._consents / f"{record.id}.wav").unlink(missing_ok=True)
                raise
        return record

    def rename_consent(self, consent_id: str, name: str) -> ConsentRecord:
        with self._locked():
            record = self.consent(consent_id).model_copy(update={"name": name})
            self._write_json(self._consents / f"{consent_id}.json", record)
        return record

    def delete_consent(self, consent_id: str) -> None:
        """The consent and its recording; voices made under it stay (as OpenAI's do)."""
        with self._locked():
            self.consent(consent_id)
            (self._consents / f"{consent_id}.json").unlink()
            (self._consents / f"{consent_id}.wav").unlink(missing_ok=True)

    # --- voices ---------------------------------------------------------------------------------------

    def voices(self) -> dict[str, VoiceRecord]:
        """Every stored voice by id, oldest first; re-read only when the folder changed."""
        try:
            stamp = self._voices.stat().st_mtime_ns
        except FileNotFoundError:
            return {}
        if stamp != self._listing[0]:
            found = []
            for folder in self._voices.glob("voice_*"):
                with contextlib.suppress(OSError, ValueError):
                    found.append(VoiceRecord.model_validate_json((folder / "voice.json").read_text()))
            self._listing = (stamp, {r.id: r for r in sorted(found, key=lambda r: (r.created_at, r.id))})
        return self._listing[1]

    def find(self, name_or_id: str) -> Optional[VoiceRecord]:
        """A voice by its id, or by its name (case-insensitive)."""
        voices = self.voices()
        if name_or_id in voices:
            return voices[name_or_id]
        wanted = name_or_id.strip().casefold()
        return next((v for v in voices.values() if v.name.casefold() == wanted), None)

    def folder(self, voice_id: str) -> Path:
        if not _ID.match(voice_id) or not voice_id.startswith("voice_"):
            raise NotFoundError(f"No custom voice with id '{voice_id}'.", param="voice_id", code="voice_not_found")
        return self._voices / voice_id

    def check_new_voice(self, name: str, consent: str, taken_names: set[str]) -> None:
        """A new voice's consent exists, its name is free (`taken_names`: the presets', casefolded) and there is
        room; the 400 that says which not."""
        try:
            self.consent(consent)
        except NotFoundError:
            raise InvalidRequestError(
                f"Invalid value for 'consent': no voice consent with id '{consent}'.",
                param="consent",
                code="consent_not_found",
            ) from None
        voices = self.voices()
        if name.casefold() in taken_names | {v.name.casefold() for v in voices.values()}:
            raise InvalidRequestError(
                f"A voice named '{name}' exists already; choose another name.", param="name", code="voice_name_taken"
            )
        if len(voices) >= self.limit:
            raise InvalidRequestError(
                f"This server keeps at most {self.limit} custom voices (MAX_CUSTOM_VOICES); delete one first.",
                param=None,
                code="voice_limit_reached",
            )

    def add_voice(
        self, record: VoiceRecord, sample: np.ndarray, codes: np.ndarray, codes_tag: str, taken_names: set[str]
    ) -> VoiceRecord:
        """Store a voice whose clip has been checked and encoded; the name must be free (presets included)."""
        with self._locked():
            self.check_new_voice(record.name, record.consent, taken_names)  # again, now that nobody else writes
            tmp = self._voices / f".new-{record.id}"
            try:
                tmp.mkdir(mode=0o700)
                write_wav(tmp / "sample.wav", sample)
                np.save(tmp / f"codes-{codes_tag}.npy", codes)
                (tmp / "voice.json").write_text(record.model_dump_json())
                self._place(tmp, self.folder(record.id))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return record

    def delete_voice(self, voice_id: str) -> None:
        with self._locked():
            folder = self.folder(voice_id)
            if not folder.is_dir():
                raise NotFoundError(f"No custom voice with id '{voice_id}'.", param="voice_id", code="voice_not_found")
            trash = self._voices / f".deleted-{voice_id}-{secrets.token_hex(4)}"
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def codes(self, voice_id: str, codes_tag: str) -> tuple[VoiceRecord, Optional[np.ndarray], np.ndarray]:
        """A stored voice for a model replica: its record, its Mimi codes for this Mimi (None when they were
        made by another one) and its sample."""
        folder = self.folder(voice_id)
        try:
            record = VoiceRecord.model_validate_json((folder / "voice.json").read_text())
            path = folder / f"codes-{codes_tag}.npy"
            codes = np.load(path, allow_pickle=False) if path.is_file() else None
            return record, codes, read_wav(folder / "sample.wav")
        except (OSError, ValueError):  # deleted since the frontend resolved it, or damaged on disk
            raise InvalidRequestError(
                f"Voice '{voice_id}' is not available (deleted or unreadable).", param="voice", code="invalid_voice"
            ) from None

    def prompt(self, voice_id: str) -> Optional[tuple[str, np.ndarray, str]]:
        """(transcript, Mimi codes, the tag of the Mimi that made them) as stored when the voice was made
        (None if they cannot be read). A model replica with another Mimi must not use these codes."""
        folder = self.folder(voice_id)
        with contextlib.suppress(OSError, ValueError):
            record = VoiceRecord.model_validate_json((folder / "voice.json").read_text())
            made = min(folder.glob("codes-*.npy"), key=lambda p: p.stat().st_mtime)
            codes_tag = made.stem.removeprefix("codes-")
            return record.transcript or "", np.load(made, allow_pickle=False), codes_tag
        return None

    def save_codes(self, voice_id: str, codes_tag: str, codes: np.ndarray) -> None:
        """Codes for another Mimi than the one the voice was made with (a changed checkpoint)."""
        folder = self.folder(voice_id)
        tmp = folder / f".codes-{secrets.token_hex(4)}.npy"
        try:  # a cache: a failure (a full disk) only means encoding again next time
            np.save(tmp, codes)
            self._place(tmp, folder / f"codes-{codes_tag}.npy")
        except OSError:
            tmp.unlink(missing_ok=True)
