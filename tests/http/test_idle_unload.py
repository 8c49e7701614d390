"""IDLE_UNLOAD_S: after an idle period the model replica releases its weights (MLX memory goes back), /health
says so and stays 200, and the next request reloads them and gets the same audio as before."""

from __future__ import annotations

import pytest

from tests.support.local_app import SPEECH, LocalApp, make_settings
from tests.support.waiting import wait_for


def model_health(app: LocalApp) -> tuple[int, dict]:
    response = app.request("GET", "/health")
    return response.status_code, response.json()["model"]


def model_in(app: LocalApp, state: str) -> dict:
    """The model's /health entry once it reports `state`."""

    def reached():
        model = model_health(app)[1]
        return model if model["status"] == state else None

    return wait_for(reached, f"the model became {state!r}")


@pytest.mark.slow("waits for an idle unload, then a reload")
def test_idle_unload_releases_the_weights_and_the_next_request_reloads_them(tiny_checkpoint, tmp_path_factory):
    app = LocalApp(make_settings(tiny_checkpoint, tmp_path_factory, idle_unload_s=1.0))
    body = {"input": "Back from a nap.", "response_format": "pcm", "seed": 5}
    first = app.request("POST", SPEECH, json=body)
    assert first.status_code == 200 and len(first.content) > 0
    status, loaded = model_health(app)
    assert status == 200 and loaded["status"] == "ready" and loaded["idle_unload"]["unloaded"] is False

    unloaded = model_in(app, "unloaded")
    status, _ = model_health(app)
    assert status == 200  # it can still serve: requests wait for the reload
    assert unloaded["idle_unload"]["unloaded"] is True and "prefix_cache" not in unloaded

    # The tiny model's weights (~9 MB of audio embeddings alone) and its caches are no longer held by MLX. The
    # figure is this whole process's (the other tests' engines live here too, and may hold a buffer a moment
    # longer): waited for, not read once.
    def released():
        model = model_health(app)[1]
        return model if model["memory"]["mlx_active_mb"] < loaded["memory"]["mlx_active_mb"] - 5 else None

    unloaded = wait_for(released, f"MLX memory released (loaded: {loaded['memory']})", timeout=30)
    assert unloaded["status"] == "unloaded"

    again = app.request("POST", SPEECH, json=body)
    assert again.status_code == 200 and again.content == first.content
    reloaded = model_health(app)[1]
    assert reloaded["status"] == "ready" and reloaded["last_load_s"] > 0
    print(
        f"\nreload after idle unload (tiny checkpoint, in-process): {reloaded['last_load_s']:.2f} s; MLX active "
        f"{loaded['memory']['mlx_active_mb']} MB loaded, {unloaded['memory']['mlx_active_mb']} MB unloaded"
    )
