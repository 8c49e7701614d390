"""The application graph in Serve's local testing mode (real deployment classes, in this process) and a way
to call its HTTP API with httpx, plus the checks every HTTP test makes of an error body."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import uuid
from pathlib import Path

import httpx

from serve_app.core.settings import Settings

SPEECH = "/v1/audio/speech"


class LocalApp:
    """One application graph in local testing mode, and a way to call its HTTP API."""

    def __init__(self, settings: Settings):
        from ray import serve

        from serve_app.app import build_application

        self.settings = settings
        handle = serve.run(
            build_application(settings),
            name=f"http-{uuid.uuid4().hex[:8]}",
            route_prefix=None,
            _local_testing_mode=True,
        )
        self.asgi = handle.build_asgi_app.remote().result()  # the replica's own routes, bound to its instance
        self.call(self._wait_ready())

    @staticmethod
    def call(coroutine):
        return asyncio.run(coroutine)

    def client(
        self, client_address: str = "127.0.0.1", base_url: str = "http://localhost:8880", **kw
    ) -> httpx.AsyncClient:
        """A client of the ingress's ASGI app, as if connecting from `client_address` to `base_url`."""
        transport = httpx.ASGITransport(app=self.asgi, client=(client_address, 52000))
        return httpx.AsyncClient(transport=transport, base_url=base_url, timeout=120, **kw)

    async def _wait_ready(self) -> None:
        async with self.client() as c:
            for _ in range(600):
                body = (await c.get("/health")).json()
                if body["model"]["status"] != "loading":
                    return
                await asyncio.sleep(0.05)
        raise AssertionError("the model did not load")

    def request(
        self, method: str, path: str, client_address: str = "127.0.0.1", base_url: str = "http://localhost:8880", **kw
    ) -> httpx.Response:
        async def go():
            async with self.client(client_address, base_url) as c:
                return await c.request(method, path, **kw)

        return self.call(go())


def make_settings(tiny_checkpoint, tmp_path_factory, **overrides) -> Settings:
    return Settings(
        model_id=str(tiny_checkpoint),
        cache_dir=tmp_path_factory.mktemp("cache"),
        max_audio_base_s=0.5,
        max_audio_s_per_char=0.02,
        **overrides,
    )


def assert_error(response: httpx.Response, status: int, param, code) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error"}, response.text  # never FastAPI's {"detail": ...}
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code)
    assert "Traceback" not in error["message"]
    return error


def make_audio(lavfi: str, seconds: float, fmt: str, *codec: str) -> bytes:
    """Audio from one of ffmpeg's generators, in a container, as bytes (through a file: mp4 needs to seek)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"clip.{fmt}"
        subprocess.run(
            [
                "ffmpeg",
                "-hide_banner",
                "-loglevel",
                "error",
                "-f",
                "lavfi",
                "-i",
                lavfi,
                "-t",
                str(seconds),
                *codec,
                "-f",
                fmt,
                str(path),
            ],
            check=True,
        )
        return path.read_bytes()


_TONE = "sine=f=220:r=44100"
# Uploads for the custom-voice tests, by name: (ffmpeg's generator, seconds, container, codec options).
CLIPS = {
    "wav": (_TONE, 3, "wav"),
    "mp3": (_TONE, 3, "mp3"),
    "m4a": (_TONE, 3, "ipod", "-c:a", "aac"),  # moov at the end, small: read from a pipe all the same
    # ffmpeg's default mp4 layout (moov at the end) past what a pipe holds: ffmpeg must seek back to read it.
    "m4a_default": (_TONE, 10, "mp4", "-c:a", "aac"),
    "flac": (_TONE, 3, "flac"),
    "short": (_TONE, 0.3, "wav"),
    "long": (_TONE, 40, "mp3"),
    "silent": ("anullsrc=r=24000:cl=mono", 3, "wav"),
    # Two hours of silence in ~1.3 MB: ~690 MB of float samples if decoded without a cap.
    "bomb": ("anullsrc=r=8000:cl=mono", 7200, "flac"),
}


def make_clips(*names: str) -> dict[str, bytes]:
    """The named uploads of CLIPS (all of them when none is named), made with ffmpeg."""
    return {name: make_audio(*CLIPS[name]) for name in names or CLIPS}
