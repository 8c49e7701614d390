"""ffmpeg missing at start (FFMPEG_PATH names no program): /health is a 503 that names it, every speech request
is a 503 `ffmpeg_unavailable` at once (raw pcm too: the encoder owns every response), and the rest of the API
still answers. The application's deployments in Serve's local testing mode, in this process."""

from __future__ import annotations

import time

import pytest

from tests.support.local_app import LocalApp, assert_error, make_settings

MISSING_FFMPEG = "/nonexistent/bin/ffmpeg"


@pytest.fixture(scope="module")
def app(tiny_checkpoint, tmp_path_factory) -> LocalApp:
    return LocalApp(make_settings(tiny_checkpoint, tmp_path_factory, ffmpeg_path=MISSING_FFMPEG))


def test_missing_ffmpeg_is_named_by_health_and_requests_get_503(app):
    health = app.request("GET", "/health")
    assert health.status_code == 503 and MISSING_FFMPEG in health.json()["reason"]
    assert health.json()["model"]["status"] == "ready"  # only the encoder is missing
    started = time.monotonic()
    for fmt in ("mp3", "pcm"):
        response = app.request("POST", "/v1/audio/speech", json={"input": "hi", "response_format": fmt})
        error = assert_error(response, 503, None, "ffmpeg_unavailable")
        assert error["type"] == "server_error" and MISSING_FFMPEG in error["message"]
        assert response.headers["retry-after"].isdigit()
    assert time.monotonic() - started < 10, "nothing may hang"
    assert app.request("GET", "/v1/models").status_code == 200  # the rest of the API still works
