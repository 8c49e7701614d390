"""Fixtures only (helpers live in tests/support/), the session's environment, and the tiers.

Tiers are folders, each a marker as well (`-m`): unit/ (pure Python, ffmpeg), engine/ (the CSM engine on
the tiny checkpoint, in-process MLX), http/ (the application in Serve's local testing mode), e2e/ (the
README's own launcher: real servers, clusters, OpenClaw). `server`, `cluster` and `network` mark what a
test needs; `slow` marks every test that starts a server of its own or a cluster, and (with its reason as
the mark's argument) each one in the other tiers that takes seconds by its nature. The edit-test loop is
`./ops/test.sh -m "not slow"`; the README's test command (and CI) runs everything.

The server is started exactly as the README does (`python -m serve_app.launch`, i.e. `serve run` on
serve_config.yaml) with MODEL_ID pointing at the tiny checkpoint, on a free loopback port. Nothing here
reaches the network (but OpenClaw's first install, marked `network`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from serve_app.core.constants import PROJECT_ROOT as ROOT

# The suite never touches the developer's HOME: Ray writes its token to ~/.ray/auth_token, and CACHE_DIR's
# default lives under it. One HOME of its own for the whole session, set before anything starts (every
# server and tool the tests start inherits it). npm keeps its download cache in the project's .cache.
_HOME = tempfile.mkdtemp(prefix="sesame-tts-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["HOME"] = _HOME
os.environ.setdefault("npm_config_cache", str(ROOT / ".cache" / "npm"))
# Requests to our own servers never go through a proxy (macOS hands Python its system proxy settings, which
# apply only while no proxy variable is set).
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost,::1")
os.environ.setdefault("no_proxy", os.environ["NO_PROXY"])

# Anything in this process that starts Ray (serve.shutdown() after Serve's local testing mode does) starts a
# local instance of its own, never attaching to a cluster that some test (or a developer) left on this machine.
os.environ.setdefault("RAY_ADDRESS", "local")

TIERS = ("unit", "engine", "http", "e2e")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Each test gets its tier's marker, `server` when it uses the shared server, `slow` when it starts
    servers or clusters of its own (the e2e tier) or is marked so, and its group (`xdist_group`)."""
    tiers = {}
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        tier = tiers[item.nodeid] = parts[0] if parts[0] in TIERS else None
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if {"server", "openai_client"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)
        if "openclaw" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.network)
        if tier == "e2e" or item.get_closest_marker("cluster") or item.get_closest_marker("server"):
            item.add_marker(pytest.mark.slow)
    # Groups of tests that must run in one process, one after another: a module (its module-scoped servers
    # and its order), or every module that uses one shared server. ./ops/test.sh runs the groups on two
    # workers (pytest-xdist: --dist loadgroup, started in this order: --no-loadscope-reorder); each group's
    # server stops after its last test (pytest_runtest_teardown below). The e2e groups come first, the
    # heaviest work, so the in-process tiers fill in beside them; a group's modules run one after another.
    groups: dict = {}
    for item in items:
        used = getattr(item, "fixturenames", ())  # every fixture it needs, through others (openai_client) too
        shared = next((name for name in _SHARED if name in used), None)
        if shared or item.module.__name__ not in groups:
            groups[item.module.__name__] = shared or item.module.__name__
    order: dict = {}
    for item in items:
        group = groups[item.module.__name__]
        item.add_marker(pytest.mark.xdist_group(group))
        order.setdefault(group, (tiers[item.nodeid] != "e2e", len(order)))
    items.sort(key=lambda item: order[groups[item.module.__name__]])


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The suite's checkpoint: tiny, with fewer codebooks (tests/support/servers.TINY_CODEBOOKS says why)."""
    from serve_app.tools.tiny_checkpoint import write_checkpoint
    from tests.support.servers import TINY_CODEBOOKS

    return write_checkpoint(tmp_path_factory.mktemp("tiny-csm"), codebooks=TINY_CODEBOOKS)


@pytest.fixture(scope="session")
def csm_tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint as the tool writes it by default: CSM's 32 codebooks per frame."""
    from serve_app.tools.tiny_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-csm-32"))


@pytest.fixture(scope="session")
def voices():
    from serve_app.core.settings import Settings
    from serve_app.voices.presets import VoiceLibrary

    return VoiceLibrary.load(Settings().voices_dir)


@pytest.fixture(scope="session")
def engine(tiny_checkpoint, voices):
    """The real CSM engine on the tiny checkpoint, in-process (no Ray)."""
    from serve_app.core.settings import Settings
    from serve_app.model.loading import load_engine
    from tests.support.servers import ENGINE_CAPS

    return load_engine(Settings(model_id=str(tiny_checkpoint), **ENGINE_CAPS), voices)


@pytest.fixture(scope="session")
def engine_reference(tiny_checkpoint, voices):
    """The same engine without KV reuse: every chunk re-prefills its whole context (PREFIX_CACHE=off)."""
    from serve_app.core.settings import Settings
    from serve_app.model.loading import load_engine
    from tests.support.servers import ENGINE_CAPS

    return load_engine(Settings(model_id=str(tiny_checkpoint), prefix_cache=False, **ENGINE_CAPS), voices)


# The shared servers are stopped right after the last test that uses each (not at the session's end): an idle
# Ray cluster costs a fifth of a core, which every later test would pay.
_SHARED: dict = {name: {"last_user": None, "server": None} for name in ("server", "lan_service")}


def pytest_collection_finish(session):
    """Which test is the last to use each shared server, among those that will run (after -k and -m)."""
    for name, shared in _SHARED.items():
        users = [item.nodeid for item in session.items if name in getattr(item, "fixturenames", ())]
        shared["last_user"] = users[-1] if users else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    for shared in _SHARED.values():
        if item.nodeid == shared["last_user"] and shared["server"] is not None:
            shared["server"].stop()


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory):
    from serve_app.tools.local_server import free_port
    from tests.support.servers import healthy, launch_server

    # Wyoming on too (Home Assistant's protocol, tests/e2e/test_wyoming.py): the same server, another port.
    server = launch_server(tmp_path_factory.mktemp("server"), tiny_checkpoint, WYOMING_PORT=str(free_port()))
    _SHARED["server"]["server"] = server
    try:
        server.wait_until(healthy)
        yield server
    finally:
        _SHARED["server"]["server"] = None
        server.stop()


@pytest.fixture(scope="session")
def lan_service(tiny_checkpoint, tmp_path_factory, macos_path):
    """The server as a LAN-facing Mac runs it (tests/support/service.py), for tests/e2e/test_security.py and
    test_service.py, which run one after the other; the control script's last test stops it (and so does this,
    should a test fail before)."""
    from tests.support import service

    controlled = service.start(tmp_path_factory.mktemp("lan"), tiny_checkpoint, macos_path)
    _SHARED["lan_service"]["server"] = controlled
    try:
        yield controlled
    finally:
        _SHARED["lan_service"]["server"] = None
        controlled.stop()
        shutil.rmtree(controlled.ray_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    # No retries (a test sees every failure); a long timeout, so a loaded machine is slow rather than failing.
    return OpenAI(base_url=server.api, api_key="sk-test-unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def macos_path(tmp_path_factory) -> str:
    """A PATH value that behaves like macOS's userland (tests/support/macos_userland.py)."""
    from tests.support.macos_userland import build

    return build(tmp_path_factory.mktemp("macos-bin"))


@pytest.fixture(scope="session")
def openclaw() -> tuple[Path, str]:
    """(openclaw binary, PATH with a Node that OpenClaw accepts first), installed once into .cache/openclaw."""
    from tests.support import openclaw

    return openclaw.install()


@pytest.fixture(scope="module")
def local_serve():
    """Serve's local testing mode needs no Ray: its apps live in this process and end with it (their MLX
    threads release themselves at exit: tests/engine/test_worker.py). `serve.shutdown()` would start a Ray
    instance only to find nothing (16 s here), so it runs only where this process did start Ray."""
    yield
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
