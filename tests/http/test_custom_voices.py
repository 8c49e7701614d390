"""Custom voices in OpenAI's shape, in-process (Serve's local testing mode): every hostile upload, the
settings that guard creation, and a voice that outlives its server. (The official `openai` SDK's every
voice route against the real server: tests/e2e/test_voices_sdk.py.)

Uploads are made here with ffmpeg; every answer is checked for OpenAI's error body, and after every refused
upload nothing new is stored and the server still speaks.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from serve_app.model.loading import load_engine
from serve_app.voices.store import MAX_UPLOAD_BYTES
from tests.support.audio import decode, rms
from tests.support.local_app import LocalApp, assert_error, make_audio, make_clips, make_settings

TRANSCRIPT = "Hello, this is my voice for the test."


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return make_clips()


# --- in-process: hostile uploads, settings, restarts ---------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_checkpoint, tmp_path_factory) -> LocalApp:
    return LocalApp(make_settings(tiny_checkpoint, tmp_path_factory, custom_voice_max_s=20.0))


@pytest.fixture(scope="module")
def consent_id(app, clips) -> str:
    response = app.request(
        "POST",
        "/v1/audio/voice_consents",
        data={"name": "Owner", "language": "en-GB"},
        files={"recording": ("c.wav", clips["wav"], "audio/wav")},
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def stored(app: LocalApp) -> list[str]:
    """Everything under the store's voices folder (hidden temporary names included)."""
    folder = app.settings.cache_dir / "custom_voices" / "voices"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def create(app: LocalApp, consent: str, data: bytes, ctype: str = "audio/wav", **fields) -> httpx.Response:
    form = {"name": "Hostile", "consent": consent, **fields}
    return app.request("POST", "/v1/audio/voices", data=form, files={"audio_sample": ("x", data, ctype)})


HLS = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"
CONCAT = b"ffconcat version 1.0\nfile /etc/passwd\n"


@pytest.mark.parametrize(
    "upload, ctype, fields, status, param, code",
    [
        ("not audio", "audio/wav", {}, 400, "audio_sample", "invalid_audio"),
        ("wav header only", "audio/wav", {}, 400, "audio_sample", "invalid_audio"),
        ("m4a cut in half", "audio/mp4", {}, 400, "audio_sample", "invalid_audio"),
        ("empty", "audio/wav", {}, 400, "audio_sample", "empty_file"),
        ("hls playlist of a local file", "audio/mpeg", {}, 400, "audio_sample", "invalid_audio"),
        ("concat list of a local file", "application/octet-stream", {}, 400, "audio_sample", "invalid_audio"),
        ("png image", "image/png", {}, 400, "audio_sample", "unsupported_file_type"),
        ("bomb", "audio/flac", {}, 400, "audio_sample", "audio_too_long"),
        ("long", "audio/mpeg", {}, 400, "audio_sample", "audio_too_long"),
        ("short", "audio/wav", {}, 400, "audio_sample", "audio_too_short"),
        ("silent", "audio/wav", {}, 400, "audio_sample", "audio_silent"),
        ("wav", "audio/wav", {"consent": "cons_000000000000000000000000"}, 400, "consent", "consent_not_found"),
        ("wav", "audio/wav", {"consent": "../../etc/passwd"}, 400, "consent", "consent_not_found"),
        ("wav", "audio/wav", {"type": "prompt"}, 400, "type", "unsupported_value"),
        ("wav", "audio/wav", {"name": "  "}, 400, "name", "missing_required_parameter"),
        ("wav", "audio/wav", {"name": "conversational"}, 400, "name", "voice_name_taken"),
        ("wav", "audio/wav", {"transcript": "\u200b\u200b"}, 400, "transcript", "invalid_input"),
    ],
)
def test_hostile_uploads_get_openai_errors_and_change_nothing(
    app, consent_id, clips, upload, ctype, fields, status, param, code
):
    data = {
        "not audio": b"this is plain text, not a recording " * 50,
        "wav header only": clips["wav"][:44],
        "m4a cut in half": clips["m4a"][: len(clips["m4a"]) // 2],
        "empty": b"",
        "hls playlist of a local file": HLS,
        "concat list of a local file": CONCAT,
        "png image": b"\x89PNG\r\n\x1a\n" + bytes(200),
    }
    data = data[upload] if upload in data else clips[upload]
    before = stored(app)
    form = {"consent": consent_id, **fields}
    assert_error(create(app, form.pop("consent"), data, ctype, **form), status, param, code)
    assert stored(app) == before
    speech = app.request("POST", "/v1/audio/speech", json={"input": "Still here.", "response_format": "wav"})
    assert speech.status_code == 200 and rms(decode(speech.content)) > 0.01


def test_an_m4a_written_with_ffmpegs_defaults_clones_and_speaks(app, consent_id, clips):
    """ffmpeg writes an mp4's index (`moov`) after the audio unless told otherwise; a pipe cannot seek back to
    it, so the upload is decoded from a private temporary file instead, and is then refused only if it truly
    cannot be read (the message says what arrived)."""
    data = clips["m4a_default"]
    assert data.find(b"moov") > data.find(b"mdat") > 0  # the index really is at the end
    response = create(app, consent_id, data, "audio/mp4", name="Jo default m4a", transcript=TRANSCRIPT)
    assert response.status_code == 200, response.text
    voice = response.json()
    assert 9.9 < voice["duration_s"] < 10.1
    speech = app.request(
        "POST", "/v1/audio/speech", json={"input": "Hello.", "voice": voice["id"], "response_format": "wav"}
    )
    assert speech.status_code == 200 and rms(decode(speech.content)) > 0.01
    assert app.request("DELETE", f"/v1/audio/voices/{voice['id']}").status_code == 200
    cut = create(app, consent_id, data[: len(data) * 3 // 4], "audio/mp4")  # the index cut off: unreadable
    error = assert_error(cut, 400, "audio_sample", "invalid_audio")
    assert f"{len(data) * 3 // 4:,} bytes of an MP4/M4A container" in error["message"]
    text = assert_error(create(app, consent_id, b"plain text " * 20, "audio/wav"), 400, "audio_sample", "invalid_audio")
    assert "220 bytes of unrecognised data" in text["message"]


def test_without_a_key_only_this_machine_may_create_or_delete_voices(app, consent_id, clips):
    """With API_KEY unset, the routes that store or delete a person's voice answer a LAN client 403
    `api_key_required`, saying to set API_KEY; reading and speaking stay open; this machine may write."""
    lan = "192.168.1.50"  # the transport only pretends; nothing leaves this process
    voice_id = create(app, consent_id, clips["wav"], name="Mine").json()["id"]
    before = stored(app)
    form = {"name": "Intruder", "consent": consent_id}
    attempts = [
        (
            "POST",
            "/v1/audio/voice_consents",
            {"data": {"name": "x", "language": "en"}, "files": {"recording": ("c.wav", clips["wav"], "audio/wav")}},
        ),
        ("POST", "/v1/audio/voices", {"data": form, "files": {"audio_sample": ("x.wav", clips["wav"], "audio/wav")}}),
        ("POST", f"/v1/audio/voice_consents/{consent_id}", {"json": {"name": "renamed"}}),
        ("DELETE", f"/v1/audio/voice_consents/{consent_id}", {}),
        ("DELETE", f"/v1/audio/voices/{voice_id}", {}),
    ]
    for method, path, kw in attempts:
        error = assert_error(app.request(method, path, client_address=lan, **kw), 403, None, "api_key_required")
        assert "API_KEY" in error["message"]
    assert stored(app) == before
    assert app.request("GET", f"/v1/audio/voice_consents/{consent_id}", client_address=lan).json()["name"] == "Owner"
    speech = app.request(
        "POST",
        "/v1/audio/speech",
        client_address=lan,
        json={"input": "Hi.", "voice": voice_id, "response_format": "wav"},
    )
    assert speech.status_code == 200 and rms(decode(speech.content)) > 0.01
    assert app.request("DELETE", f"/v1/audio/voices/{voice_id}").json()["deleted"] is True  # from this machine


# OpenAI's accepted upload types, each as a real file of that type (stereo 48 kHz where the codec allows).
ACCEPTED = [
    ("audio/mpeg", "mp3", ["-c:a", "libmp3lame"]),
    ("audio/x-wav", "wav", []),
    ("audio/ogg", "ogg", ["-c:a", "libopus"]),
    ("audio/aac", "adts", ["-c:a", "aac"]),
    ("audio/flac", "flac", []),
    ("audio/webm", "webm", ["-c:a", "libopus"]),
    ("audio/mp4", "mp4", ["-c:a", "aac"]),
]


@pytest.mark.parametrize("ctype, fmt, codec", ACCEPTED, ids=[a[1] for a in ACCEPTED])
def test_every_accepted_upload_type_decodes(app, ctype, fmt, codec):
    data = make_audio("sine=f=330:r=48000,aformat=channel_layouts=stereo", 2, fmt, *codec)
    response = app.request(
        "POST",
        "/v1/audio/voice_consents",
        data={"name": fmt, "language": "en"},
        files={"recording": (f"r.{fmt}", data, ctype)},
    )
    assert response.status_code == 200, response.text
    assert app.request("DELETE", f"/v1/audio/voice_consents/{response.json()['id']}").json()["deleted"] is True


def test_oversized_uploads_get_413_declared_or_not(app, consent_id, clips):
    before = stored(app)
    big = clips["wav"] + bytes(MAX_UPLOAD_BYTES)
    assert_error(create(app, consent_id, big), 413, None, "request_too_large")

    async def chunked():  # no Content-Length: counted as it arrives
        body = (
            b'--b\r\nContent-Disposition: form-data; name="audio_sample"; filename="x.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + big + b"\r\n--b--\r\n"
        )
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    response = app.request(
        "POST", "/v1/audio/voices", content=chunked(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert_error(response, 413, None, "request_too_large")
    assert stored(app) == before


def test_names_are_display_text_and_ids_are_the_servers(app, consent_id, clips):
    """A name full of path characters is just a name: the folder is the generated id, nothing else is
    written; the bound on voices holds; the voice speaks with the transcript-free (audio-only) context."""
    response = create(app, consent_id, clips["flac"], "audio/flac", name="../../etc/passwd\\x")
    assert response.status_code == 200, response.text
    voice = response.json()
    assert voice["name"] == "../../etc/passwd\\x" and voice["conditioning"] == "audio_only"
    assert voice["transcript"] is None
    assert stored(app) == [voice["id"]]
    assert app.request("GET", f"/v1/audio/voices/{voice['id']}").json() == voice  # retrieve (our extension)
    assert sorted(
        p.name for p in (app.settings.cache_dir / "custom_voices" / "voices" / voice["id"]).iterdir()
    ) == sorted(
        [
            "voice.json",
            "sample.wav",
            next(
                p.name for p in (app.settings.cache_dir / "custom_voices" / "voices" / voice["id"]).glob("codes-*.npy")
            ),
        ]
    )
    speech = app.request(
        "POST",
        "/v1/audio/speech",
        json={"input": "Audio only.", "voice": {"id": voice["id"]}, "response_format": "pcm"},
    )
    assert speech.status_code == 200 and len(speech.content) > 0
    assert app.request("DELETE", f"/v1/audio/voices/{voice['id']}").json()["deleted"] is True
    assert stored(app) == []
    for unknown in ("voice_0123", "voice_000000000000000000000000", "cons_000000000000000000000000"):
        assert_error(app.request("DELETE", f"/v1/audio/voices/{unknown}"), 404, "voice_id", "voice_not_found")
    assert app.request("DELETE", "/v1/audio/voices/..%2F..%2Fetc").status_code == 404  # no such route
    assert_error(app.request("GET", "/v1/audio/voice_consents/cons_x"), 404, "consent_id", "consent_not_found")


def test_the_bound_the_key_and_the_switch(tiny_checkpoint, tmp_path_factory, clips):
    """MAX_CUSTOM_VOICES holds; with API_KEY every voice route needs it; CUSTOM_VOICES=false stops creation
    but stored voices still speak and can be deleted."""
    settings = make_settings(tiny_checkpoint, tmp_path_factory, api_key="sk-voices", max_custom_voices=1)
    keyed = LocalApp(settings)
    key = {"Authorization": "Bearer sk-voices"}
    files = {"recording": ("c.wav", clips["wav"], "audio/wav")}
    assert_error(
        keyed.request("POST", "/v1/audio/voice_consents", data={"name": "n", "language": "en"}, files=files),
        401,
        None,
        "invalid_api_key",
    )
    assert_error(keyed.request("GET", "/v1/audio/voice_consents"), 401, None, "invalid_api_key")
    consent = keyed.request(
        "POST", "/v1/audio/voice_consents", data={"name": "n", "language": "en"}, files=files, headers=key
    ).json()["id"]
    assert_error(
        keyed.request(
            "POST", "/v1/audio/voice_consents", data={"name": "m", "language": "en"}, files=files, headers=key
        ),
        400,
        None,
        "consent_limit_reached",
    )
    sample = {"audio_sample": ("s.mp3", clips["mp3"], "audio/mpeg")}
    first = keyed.request(
        "POST", "/v1/audio/voices", data={"name": "One", "consent": consent}, files=sample, headers=key
    )
    assert first.status_code == 200, first.text
    assert_error(
        keyed.request("POST", "/v1/audio/voices", data={"name": "Two", "consent": consent}, files=sample, headers=key),
        400,
        None,
        "voice_limit_reached",
    )
    assert_error(keyed.request("DELETE", f"/v1/audio/voices/{first.json()['id']}"), 401, None, "invalid_api_key")

    # The same store, creation switched off: the stored voice still speaks and can be deleted.
    off = LocalApp(settings.model_copy(update={"custom_voices": False, "api_key": None}))
    assert_error(
        off.request("POST", "/v1/audio/voices", data={"name": "Three", "consent": consent}, files=sample),
        403,
        None,
        "custom_voices_disabled",
    )
    speech = off.request(
        "POST", "/v1/audio/speech", json={"input": "Still mine.", "voice": "one", "response_format": "wav"}
    )
    assert speech.status_code == 200 and rms(decode(speech.content)) > 0.01
    assert off.request("DELETE", f"/v1/audio/voices/{first.json()['id']}").status_code == 200


@pytest.mark.slow("starts a second application and a third engine")
def test_a_voice_outlives_its_server_and_is_never_encoded_twice(tiny_checkpoint, tmp_path_factory, clips, monkeypatch):
    """Created on one app, then a new app on the same CACHE_DIR (a restart, or another replica): it lists the
    voice, loads its stored Mimi codes without encoding, and the same seed gives the same PCM."""
    settings = make_settings(tiny_checkpoint, tmp_path_factory)
    first = LocalApp(settings)
    consent = first.request(
        "POST",
        "/v1/audio/voice_consents",
        data={"name": "n", "language": "en"},
        files={"recording": ("c.ogg", clips["wav"], "audio/ogg")},
    ).json()["id"]
    voice = first.request(
        "POST",
        "/v1/audio/voices",
        data={"name": "Kept", "consent": consent, "transcript": TRANSCRIPT},
        files={"audio_sample": ("s.wav", clips["wav"], "audio/wav")},
    ).json()
    body = {"input": "Same seed, same voice.", "voice": {"id": voice["id"]}, "response_format": "pcm", "seed": 7}
    before = first.request("POST", "/v1/audio/speech", json=body).content

    from serve_app.engine.csm import CSMEngine

    def no_encoding(self, audio):
        raise AssertionError("a stored voice was encoded again")

    # A model replica on another machine: an empty store of its own, the voice only in the request.
    from serve_app.core.messages import ContextSegment, SynthesisRequest
    from serve_app.engine.runners import synthesize
    from serve_app.voices.presets import VoicePreset
    from serve_app.voices.store import CustomVoiceStore

    transcript, codes, codes_tag = CustomVoiceStore(settings).prompt(voice["id"])
    elsewhere = load_engine(settings.model_copy(update={"cache_dir": tmp_path_factory.mktemp("elsewhere")}))
    request = SynthesisRequest(
        [body["input"]],
        VoicePreset(name=voice["id"], description="", custom=True),
        seed=7,
        voice_prompt=ContextSegment(0, transcript, codes=codes, codes_tag=codes_tag),
    )
    assert b"".join(i for i in synthesize(elsewhere, request) if isinstance(i, bytes)) == before

    monkeypatch.setattr(CSMEngine, "encode_audio", no_encoding)  # in-process: the new replica's engine too
    monkeypatch.setattr(CSMEngine, "load_voice_prompts", lambda self, voices: None)  # presets would encode
    second = LocalApp(settings)
    assert voice["id"] in [v["id"] for v in second.request("GET", "/v1/audio/voices").json()["voices"]]
    after = second.request("POST", "/v1/audio/speech", json=body).content
    assert len(before) > 0 and after == before
    assert np.array_equal(np.frombuffer(after, "<i2"), np.frombuffer(before, "<i2"))
