"""The design card's own ops command, a bare `serve run serve_config.yaml` (no launcher, so no proxy callback
of ours), on the tiny checkpoint: every response carries exactly one `x-request-id` (Serve's own, which the
app adopts), and a client that passes that header's value back as it received it gets context from it; and
Home Assistant's Wyoming port starts with the app, and is gone when it stops."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys

import httpx
import pytest
import yaml
from openai import OpenAI
from wyoming.tts import Synthesize

from serve_app.api.proxy import PROXY_CALLBACK_VARIABLE
from serve_app.core.constants import PROJECT_ROOT
from serve_app.launch import prepare_ray_environment
from serve_app.tools.local_server import free_port
from tests.support.servers import TEST_ENV, Server, healthy, one_request_id_names_the_next
from tests.support.waiting import wait_for
from tests.support.wyoming import client as wyoming_client
from tests.support.wyoming import read_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def bare_serve_run(tiny_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve-run")
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    serve = shutil.which("serve", path=os.path.dirname(sys.executable))
    assert serve, "ray[serve]'s `serve` command is installed beside this Python"

    def command(port: int) -> list[str]:  # the file as shipped, on a free loopback port
        config["http_options"].update(host="127.0.0.1", port=port)
        path = work / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        return [serve, "run", str(path)]

    env = {**TEST_ENV, "MODEL_ID": str(tiny_checkpoint), "RAY_ADDRESS": "local", "WYOMING_PORT": str(free_port())}
    prepare_ray_environment(env)  # Ray private and on loopback, as on a user's machine
    env[PROXY_CALLBACK_VARIABLE] = ""  # Serve's proxy exactly as it comes: none of our middleware
    server = Server(work, env, command=command)
    try:
        server.wait_until(healthy)
        yield server
    finally:
        server.stop()


def logged(server: Server, request_id: str) -> None:
    """The request's log line names this id (Ray forwards replica output to the log as it comes)."""
    wait_for(lambda: f"request id={request_id} " in server.log_text(), f"a log line for request {request_id}")


def request_ids(response: httpx.Response) -> list[str]:
    return [value for name, value in response.headers.multi_items() if name.lower() == "x-request-id"]


def test_one_request_id_that_the_next_request_can_name(bare_serve_run):
    client = OpenAI(base_url=bare_serve_run.api, api_key="unused", max_retries=0, timeout=120)
    first, second = one_request_id_names_the_next(client)
    logged(bare_serve_run, first)  # the log line names the same id
    logged(bare_serve_run, second)

    refused = httpx.post(f"{bare_serve_run.api}/audio/speech", json={"input": "x", "voice": "nobody"}, timeout=30)
    assert refused.status_code == 400 and len(request_ids(refused)) == 1
    logged(bare_serve_run, request_ids(refused)[0])
    assert "Traceback" not in bare_serve_run.log_text()
    assert "user-provided callback" not in bare_serve_run.log_text()  # it really was Serve's proxy as it comes


def test_the_wyoming_port_lives_as_long_as_the_app(bare_serve_run):
    """Runs last here: it stops the server."""
    port = bare_serve_run.health().json()["wyoming"]["port"]

    async def speak():
        async with wyoming_client(bare_serve_run) as wyoming:
            await wyoming.write_event(Synthesize(text="Hello there.").event())
            return await read_until(wyoming, "audio-stop")

    events = asyncio.run(speak())
    assert events[0].type == "audio-start" and any(e.type == "audio-chunk" for e in events)
    bare_serve_run.stop()

    def closed() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            return True
        return False

    wait_for(closed, "the Wyoming port closed with the app")
