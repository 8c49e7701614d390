"""RequestScreen (serve_app/api/screen.py) in the real ingress, in-process (Serve's local testing
mode): Host and Origin checks, what the open lists and /health show without the key, the docs' rule, the
body's deadline, and control characters kept out of the log. The slow-body test with real sockets is in
test_security.py."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from tests.support.local_app import SPEECH, LocalApp, assert_error, make_settings

LAN = "192.168.1.50"  # a client on the home network (the transport only pretends; nothing leaves this process)


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint, tmp_path_factory) -> LocalApp:
    return LocalApp(
        make_settings(
            tiny_checkpoint,
            tmp_path_factory,
            api_key="sk-guard",
            allowed_hosts="tts.example",
            cors_origins="http://allowed.example:3000",
            body_timeout_s=1.0,
            body_min_rate=1024,
        )
    )


KEY = {"Authorization": "Bearer sk-guard"}


def test_host_names_that_are_not_this_machine_are_refused(guarded):
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 still sends Host: evil.example."""
    for base in ("http://evil.example:8880", "http://attacker.test", "http://0.0.0.0:8880"):
        error = assert_error(guarded.request("GET", "/v1/models", base_url=base), 403, None, "host_not_allowed")
        assert "ALLOWED_HOSTS" in error["message"]
    for base in ("http://localhost:8880", "http://127.0.0.1:8880", "http://[::1]:8880", "http://tts.example"):
        assert guarded.request("GET", "/v1/models", base_url=base).status_code == 200, base
    # Refused before any work: a speech request with a body is not read, not admitted, not logged as speech.
    assert_error(
        guarded.request("POST", SPEECH, base_url="http://evil.example", json={"input": "hi"}, headers=KEY),
        403,
        None,
        "host_not_allowed",
    )


def test_browser_origins_may_not_change_state_unless_allowed(guarded):
    form = {"name": (None, "Ann"), "language": (None, "en")}
    for origin in ("http://evil.example", "null"):  # a page elsewhere; a sandboxed frame or a file
        for method, path, kw in (
            ("POST", SPEECH, {"json": {"input": "hi"}}),
            ("POST", "/v1/audio/voice_consents", {"files": form}),
            ("DELETE", "/v1/audio/voices/voice_0123", {}),
        ):
            response = guarded.request(method, path, headers={**KEY, "Origin": origin}, **kw)
            assert_error(response, 403, None, "origin_not_allowed")
    # Allowed: CORS_ORIGINS, the server's own pages (same origin), and clients that send no Origin at all.
    allowed = guarded.request(
        "POST",
        SPEECH,
        json={"input": "Hi.", "response_format": "pcm"},
        headers={**KEY, "Origin": "http://allowed.example:3000"},
    )
    assert allowed.status_code == 200 and len(allowed.content) > 0
    assert allowed.headers["access-control-allow-origin"] == "http://allowed.example:3000"
    same = guarded.request(
        "POST",
        SPEECH,
        json={"input": "Hi.", "response_format": "pcm"},
        headers={**KEY, "Origin": "http://localhost:8880"},
    )
    assert same.status_code == 200
    # An allowed page's preflight (it carries no key) is answered with the CORS headers it needs.
    preflight = guarded.request(
        "OPTIONS",
        SPEECH,
        headers={
            "Origin": "http://allowed.example:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://allowed.example:3000"
    # Reading is not changing state: a GET with a foreign Origin is answered (without CORS headers the browser
    # does not let the page read it).
    read = guarded.request("GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers


def test_the_key_is_checked_before_the_body_is_read(guarded):
    """A request without the key gets its 401 while its body has not even been sent."""

    async def go():
        async def never_ending_body():
            yield b'{"input": "'
            await asyncio.sleep(3600)

        async with guarded.client() as client:
            return await asyncio.wait_for(
                client.post(SPEECH, content=never_ending_body(), headers={"content-type": "application/json"}), 30
            )

    assert_error(guarded.call(go()), 401, None, "invalid_api_key")


def test_a_body_that_does_not_arrive_in_time_gets_408(guarded):
    async def go():
        async def trickle():
            yield b'{"input": "'
            for _ in range(100):
                await asyncio.sleep(0.2)
                yield b"a"

        async with guarded.client() as client:
            return await client.post(
                SPEECH, content=trickle(), headers={**KEY, "content-type": "application/json", "content-length": "200"}
            )

    error = assert_error(guarded.call(go()), 408, None, "request_timeout")
    assert "in time" in error["message"]


def test_an_upload_that_does_not_arrive_in_time_gets_408_not_a_form_error(guarded):
    """The multipart parser reads the body too: a trickling upload is a 408 there as well."""

    async def go():
        async def trickle():
            yield (
                b'--x\r\nContent-Disposition: form-data; name="recording"; filename="c.wav"\r\n'
                b"Content-Type: audio/wav\r\n\r\n"
            )
            for _ in range(100):
                await asyncio.sleep(0.2)
                yield b"a"

        async with guarded.client() as client:
            return await client.post(
                "/v1/audio/voice_consents",
                content=trickle(),
                headers={**KEY, "content-type": "multipart/form-data; boundary=x"},
            )

    assert_error(guarded.call(go()), 408, None, "request_timeout")


def _custom_voice(app: LocalApp) -> str:
    from tests.support.local_app import make_audio

    clip = ("c.wav", make_audio("sine=f=220:r=24000", 3, "wav"), "audio/wav")
    consent = app.request(
        "POST",
        "/v1/audio/voice_consents",
        data={"name": "Jo Private", "language": "en"},
        files={"recording": clip},
        headers=KEY,
    )
    assert consent.status_code == 200, consent.text
    voice = app.request(
        "POST",
        "/v1/audio/voices",
        data={"name": "Jo Private", "consent": consent.json()["id"]},
        files={"audio_sample": clip},
        headers=KEY,
    )
    assert voice.status_code == 200, voice.text
    return voice.json()["id"]


def test_custom_voices_and_details_are_not_shown_without_the_key(guarded):
    voice_id = _custom_voice(guarded)
    listed = {v["id"] for v in guarded.request("GET", "/v1/audio/voices").json()["voices"]}
    assert voice_id not in listed and "conversational" in listed
    assert voice_id in {v["id"] for v in guarded.request("GET", "/v1/audio/voices", headers=KEY).json()["voices"]}
    eleven = guarded.request("GET", "/elevenlabs/v1/voices").json()["voices"]
    assert all(v["category"] == "premade" for v in eleven)
    assert any(
        v["category"] == "cloned"
        for v in guarded.request("GET", "/elevenlabs/v1/voices", headers={"xi-api-key": "sk-guard"}).json()["voices"]
    )
    # /health: the status and why to the LAN; every detail with the key or from this machine.
    public = guarded.request("GET", "/health", client_address=LAN)
    assert public.status_code == 200 and public.json() == {"status": "ok"}
    for kw in ({"client_address": LAN, "headers": KEY}, {"client_address": "127.0.0.1"}):
        detailed = guarded.request("GET", "/health", **kw).json()
        assert detailed["model"]["memory"]["pid"] and voice_id in detailed["voices"]
    # The docs and the OpenAPI document follow the same rule.
    for path in ("/docs", "/openapi.json"):
        assert_error(guarded.request("GET", path, client_address=LAN), 401, None, "invalid_api_key")
        assert guarded.request("GET", path, client_address=LAN, headers=KEY).status_code == 200
        assert guarded.request("GET", path).status_code == 200


def test_control_characters_from_a_client_are_escaped_in_the_log(guarded, caplog):
    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        guarded.request("GET", "/v1/audio/voices/x%1b%5b31mred%00%0aforged%20line")
    lines = [r.getMessage() for r in caplog.records if "unauthorized" in r.getMessage()]
    assert lines and all("\x1b" not in line and "\x00" not in line and "\n" not in line for line in lines)
    assert any("\\x1b[31mred\\x00\\x0aforged line" in line for line in lines), lines


def test_an_empty_api_key_is_refused_at_start():
    from serve_app.core.settings import ConfigError, Settings

    with pytest.raises(ConfigError, match="API_KEY.*empty"):
        Settings.load({"API_KEY": "  "})
    with pytest.raises(ConfigError, match="HF_TOKEN.*empty"):
        Settings.load({"HF_TOKEN": ""})


def test_host_header_parsing():
    from serve_app.api.screen import host_of

    assert host_of("LOCALHOST:8880") == "localhost"
    assert host_of("[::1]:8880") == "::1" and host_of("[fe80::1]") == "fe80::1"
    assert host_of("192.168.1.5") == "192.168.1.5" and host_of("studio.local.") == "studio.local"
    assert httpx.URL("http://[::1]:1/").host == "::1"  # what a client sends is what we parse


def test_uploads_are_admitted_a_few_at_a_time(guarded):
    """Two uploads at once and four waiting; the next gets 429 with Retry-After before its body is read.
    Held open here by bodies that never finish (the gate is entered before the form is parsed)."""
    from serve_app.api.voice_routes import UPLOADS_AT_ONCE, UPLOADS_WAITING

    async def go():
        release = asyncio.Event()

        async def held_body():  # a file part, fast enough for BODY_MIN_RATE (1 KiB/s), done once released
            yield (
                b'--x\r\nContent-Disposition: form-data; name="recording"; filename="c.wav"\r\n'
                b"Content-Type: audio/wav\r\n\r\n"
            )
            while not release.is_set():
                await asyncio.sleep(0.25)
                yield b" " * 2048
            yield b"\r\n--x--\r\n"

        headers = {**KEY, "content-type": "multipart/form-data; boundary=x"}
        async with guarded.client() as client:
            held = [
                asyncio.create_task(client.post("/v1/audio/voice_consents", content=held_body(), headers=headers))
                for _ in range(UPLOADS_AT_ONCE + UPLOADS_WAITING)
            ]
            await asyncio.sleep(1.5)  # all of them are in (two in progress, four in line), longer than BODY_TIMEOUT_S
            refused = await client.post(
                "/v1/audio/voice_consents",
                files={"recording": ("c.wav", b"x", "audio/wav")},
                data={"name": "n", "language": "en"},
                headers=KEY,
            )
            release.set()
            answers = await asyncio.gather(*held)
            return refused, answers

    refused, answers = guarded.call(go())
    assert_error(refused, 429, None, "rate_limit_exceeded")
    assert int(refused.headers["retry-after"]) >= 1
    # Each was read and judged in its turn (waiting in line did not count against its body's deadline): a
    # form with no fields is a 400, never a 408 or a 429.
    assert all(a.status_code == 400 for a in answers), [a.text for a in answers]
