"""First run: the real hub download code against a loopback stand-in (tests/support/fake_hub.py), progress in /health
and the log, offline after, and what an unreachable hub answers. The model deployment's class runs
in-process on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from serve_app.core.errors import ModelLoadError
from serve_app.core.messages import SynthesisRequest, Usage
from serve_app.core.settings import Settings
from serve_app.engine.checkpoint import MODEL_FILES
from serve_app.engine.hub import fetch_repo
from serve_app.model.replica import CSMModel
from tests.support.fake_hub import FakeHub
from tests.support.servers import ENGINE_CAPS, ROOT, settled

REPO = "test-org/csm-tiny"


@pytest.fixture
def hub(tiny_checkpoint):
    files = {str(p.relative_to(tiny_checkpoint)): p for p in tiny_checkpoint.rglob("*") if p.is_file()}
    # ~26 MB of weights at 64 KB per 8 ms: a download that takes a few seconds, long enough to watch.
    hub = FakeHub({REPO: files}, slow_file="model.safetensors", slow_chunk_s=0.008)
    yield hub
    hub.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def health(model: CSMModel) -> dict:
    return asyncio.run(model.health()).body()


@pytest.mark.slow("serves a checkpoint over HTTP and loads it twice")
def test_first_start_downloads_with_progress_then_loads_offline(hub, tmp_path, voices, caplog):
    settings = Settings(model_id=REPO, cache_dir=tmp_path, hf_endpoint=hub.url, **ENGINE_CAPS)
    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        model = CSMModel(settings, voices)
        seen = []
        deadline = time.monotonic() + 120
        while (state := health(model))["status"] == "loading":
            if "download" in state:
                seen.append(state["download"])
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert state["status"] == "ready", state
    partial = [d for d in seen if d["total_bytes"] and 0 < d["done_bytes"] < d["total_bytes"]]
    assert partial, "no progress was visible while the weights downloaded"
    weights = next(f for f in partial[-1]["files"] if f["file"] == f"{REPO}/model.safetensors")
    assert weights["total_bytes"] == (hub.repos[REPO]["model.safetensors"]).stat().st_size
    assert [d["done_bytes"] for d in seen] == sorted(d["done_bytes"] for d in seen)  # only ever grows
    log = caplog.text
    assert f"downloading {REPO}" in log and "downloading: " in log and f"downloaded {REPO}" in log
    assert sorted(hub.downloads) == sorted(hub.repos[REPO])  # every file, once

    items = asyncio.run(_collect(model, SynthesisRequest(["Downloaded and speaking."], voices.resolve("fast"), seed=1)))
    assert isinstance(items[-1], Usage) and sum(len(i) for i in items[:-1]) > 0

    # The next start finds everything in CACHE_DIR: nothing is fetched, even with the hub gone.
    hub.close()
    again = CSMModel(Settings(model_id=REPO, cache_dir=tmp_path, hf_endpoint=closed_port_url(), **ENGINE_CAPS), voices)
    assert settled(again)["status"] == "ready"


async def _collect(model, request):
    return [item async for item in model.generate(request)]


@pytest.mark.parametrize("offline_env", [False, True], ids=["unreachable", "HF_HUB_OFFLINE"])
def test_no_network_on_first_start_is_a_503_that_says_what_to_do(tmp_path, voices, caplog, monkeypatch, offline_env):
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    settings = Settings(model_id="sesame-test/not-cached", cache_dir=tmp_path, hf_endpoint=closed_port_url())
    with caplog.at_level(logging.INFO, logger="sesame_tts"):
        model = CSMModel(settings, voices)
        state = settled(model)
    assert state["status"] == "failed"
    for words in (
        "needs the network once",
        "MODEL_ID to a local CSM checkpoint folder",
        "./ops/serve.sh --tiny /tmp/csm-tiny",  # a command that runs as printed, in the checkout
    ):
        assert words in state["error"]
    assert '"--tiny"' in (ROOT / "ops" / "serve.sh").read_text()
    assert "LocalEntryNotFoundError" not in state["error"] and "ConnectError" not in state["error"]
    with pytest.raises(ModelLoadError, match="needs the network once") as info:
        asyncio.run(_collect(model, SynthesisRequest(["hi"], voices.resolve("fast"))))
    assert info.value.status_code == 503 and info.value.code == "model_load_failed"
    # An expected failure: one clear log line, no traceback.
    failures = [r for r in caplog.records if "failed to load" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is None
    assert "Traceback" not in caplog.text


def test_a_gated_or_missing_repo_names_itself(hub, tmp_path):
    with pytest.raises(ModelLoadError, match="cannot download test-org/absent: .*404"):
        fetch_repo("test-org/absent", Settings(cache_dir=tmp_path, hf_endpoint=hub.url), MODEL_FILES)
