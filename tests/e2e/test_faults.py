"""Faults: a model that fails to load, and memory exhaustion during generation.

The fault server is the real application started as the boot service does (`python -m serve_app.launch
--service`: the supervisor, which writes what `./ops/serve.sh` would print into the rotated log), on a
checkpoint cut short; last, its Ray cluster dies under it. (ffmpeg missing at start is
tests/http/test_missing_ffmpeg.py, in-process; ffmpeg dying mid-stream is in test_api.py; a killed model
replica in test_reliability.py; SIGTERM with streams in flight in test_service.py.)
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import subprocess
import time

import httpx
import mlx.core as mx
import pytest

from serve_app.core.errors import OutOfMemoryError
from serve_app.core.messages import SynthesisRequest
from serve_app.core.processes import cpu_seconds
from serve_app.core.settings import Settings
from serve_app.model.loading import load_engine
from serve_app.model.replica import CSMModel
from serve_app.text.chunking import chunk_text
from serve_app.voices.presets import VoiceLibrary
from tests.support.docs import first_request
from tests.support.servers import launch_server, session_processes, settled
from tests.support.waiting import wait_for

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def fault_servers(tiny_checkpoint, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken-checkpoint")
    shutil.copytree(tiny_checkpoint, broken, dirs_exist_ok=True)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated mid-file
    bad_model = launch_server(tmp_path_factory.mktemp("bad-model"), broken, service=True)
    try:
        bad_model.wait_until(lambda r: r.json()["model"]["status"] == "failed")
        yield {"bad_model": bad_model}
    finally:
        bad_model.stop()


def assert_503(response: httpx.Response, code: str) -> dict:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("server_error", code)
    return error


def test_the_docs_first_request_shows_a_not_ready_servers_error_and_its_output_has_no_traceback(
    fault_servers, tmp_path
):
    """What a newcomer runs first, exactly as the getting-started page prints it, against a server whose model
    did not load: curl exits non-zero, prints the server's message and leaves no bogus test.mp3. The server's
    output (the terminal of `./ops/serve.sh`) holds one line per refused request and no traceback."""
    server = fault_servers["bad_model"]
    command = first_request().replace("http://localhost:8880", server.base_url)
    assert server.base_url in command
    for _ in range(2):
        run = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert run.returncode != 0
        assert "model_load_failed" in run.stdout and "model.safetensors" in run.stdout, run
        assert not (tmp_path / "test.mp3").exists()
    wait_for(lambda: server.log_text().count("status=503") >= 2, "a log line per refused request")
    assert "Traceback" not in server.log_text()
    assert "CALL health" not in server.log_text()  # Serve's access lines are off by default (ACCESS_LOG)
    assert "fork_posix" not in server.log_text()  # nor gRPC's INFO line each time the encoder starts ffmpeg
    assert "voice presets conversational, fast, professional, whisper" in server.log_text()  # and when they load


def test_model_load_failure_names_the_file_and_does_not_spin(fault_servers):
    server = fault_servers["bad_model"]
    health = server.health()
    assert health.status_code == 503
    body = health.json()
    assert body["model"]["status"] == "failed"
    assert "model.safetensors" in body["reason"]
    refused = httpx.post(f"{server.api}/audio/speech", json={"input": "hi"}, timeout=30)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_load_failed"
    assert "model.safetensors" in refused.json()["error"]["message"]
    assert "retry-after" not in refused.headers  # it stays failed until a restart: nothing to retry
    # The failed replica stays up, idle, reporting why: no restart loop, no busy thread.
    pid = body["model"]["memory"]["pid"]
    cpu_before = cpu_seconds(pid)
    time.sleep(3)
    assert server.health().json()["model"]["memory"]["pid"] == pid
    assert cpu_seconds(pid) - cpu_before < 0.5


@pytest.fixture
def restore_mlx_memory_limit():
    previous = mx.set_memory_limit(1 << 40)
    mx.set_memory_limit(previous)
    yield
    mx.set_memory_limit(previous)


def _run(model: CSMModel, request: SynthesisRequest) -> list:
    async def collect():
        return [item async for item in model.generate(request)]

    return asyncio.run(collect())


def _peak_above_start_mb(engine, request: SynthesisRequest) -> float:
    """How far MLX's memory peaked above what it held when `request` began, in MiB."""
    from serve_app.engine.runners import synthesize

    mx.clear_cache()
    start = mx.get_active_memory()
    mx.reset_peak_memory()
    for _ in synthesize(engine, request):
        pass
    return (mx.get_peak_memory() - start) / 2**20


def test_memory_limit_fails_that_request_releases_the_cache_and_the_next_succeeds(
    tiny_checkpoint, restore_mlx_memory_limit
):
    """The model deployment's class, run in-process with MLX_MEMORY_LIMIT_MB set between what a short and a
    long request need. Those needs are measured first, on this backend, by the same engine without a limit:
    allocators differ (Metal rounds buffers to pages and keeps its own cache; the CPU backend does not), so no
    number from one backend is assumed on another. Without KV reuse every chunk re-prefills the voice clip
    and the growing history, so the long request needs far more than the short one (tiny checkpoint, Linux
    CPU: 1.4 MiB vs 22.4 MiB above the 17.8 MiB of weights, measured)."""

    settings = Settings(
        model_id=str(tiny_checkpoint), max_audio_base_s=0.16, max_audio_s_per_char=0.0, prefix_cache=False
    )
    voices = VoiceLibrary.load(settings.voices_dir)
    big = SynthesisRequest(chunk_text("word " * 200, 220, 100), voices.resolve("conversational"), seed=1)
    small = SynthesisRequest(["Hi there."], voices.resolve("fast"), seed=1)
    gc.collect()  # earlier tests' engines are garbage now: the baseline must not fall during this test
    mx.clear_cache()
    before = mx.get_active_memory()
    probe = load_engine(settings, voices)
    weights_mb = (mx.get_active_memory() - before) / 2**20
    small_mb, big_mb = _peak_above_start_mb(probe, small), _peak_above_start_mb(probe, big)
    assert big_mb > small_mb + 8, (small_mb, big_mb)  # room for a limit between them
    del probe
    gc.collect()
    mx.clear_cache()
    limit = int((mx.get_active_memory() + 2**20 * (weights_mb + (small_mb + big_mb) / 2)) / 2**20)

    model = CSMModel(settings.model_copy(update={"mlx_memory_limit_mb": limit}), voices)
    assert settled(model)["status"] == "ready"
    with pytest.raises(OutOfMemoryError) as info:
        _run(model, big)
    assert info.value.status_code == 503 and info.value.code == "out_of_memory"
    assert f"MLX_MEMORY_LIMIT_MB={limit}" in info.value.message
    assert asyncio.run(model.health()).memory["mlx_cache_mb"] == 0  # MLX's cache was released
    items = _run(model, small)
    assert sum(len(item) for item in items if isinstance(item, bytes)) > 0
    assert items[-1].output_tokens > 0


def test_the_supervisor_exits_when_its_ray_cluster_dies(fault_servers):
    """Runs last in this module: it ends the server's Ray cluster. `serve run` outlives a dead cluster with its
    port closed; the supervisor notices (it watches Ray's core processes) and exits non-zero, so launchd's
    KeepAlive / systemd's Restart=on-failure start a fresh server (whether its model loaded or not)."""
    from serve_app.supervisor import CLUSTER_GONE_EXIT

    server = fault_servers["bad_model"]
    serve_pid = server.session_pid
    running = session_processes(serve_pid)
    cluster = [line for line in running if line.split()[2].rsplit("/", 1)[-1] in ("raylet", "gcs_server")]
    assert len(cluster) == 2, (serve_pid, running)
    for line in cluster:
        os.kill(int(line.split()[1]), signal.SIGKILL)
    code = server.proc.wait(timeout=120)
    log = server.log_text()
    assert code == CLUSTER_GONE_EXIT, log[-3000:]
    assert "raylet exited: the Ray cluster is gone" in log.replace("gcs_server and ", "")
    wait_for(lambda: session_processes(serve_pid) == [], "every process of the server's session ended")
    assert not (server.work / "cache" / "server.pid").exists()
