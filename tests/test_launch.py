"""The start command: HOST and PORT reach Serve's http_options; the shipped config stays as it is."""

from __future__ import annotations

import yaml

from serve_app.launch import render_config
from serve_app.settings import PROJECT_ROOT, Settings


def test_shipped_config():
    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8880, "request_timeout_s": None}
    (app,) = config["applications"]
    assert app["import_path"] == "serve_app.app:build_app" and app["route_prefix"] == "/"


def test_render_applies_host_and_port(tmp_path):
    settings = Settings(host="127.0.0.1", port=9123, cache_dir=tmp_path)
    rendered = yaml.safe_load(render_config(settings, PROJECT_ROOT / "serve_config.yaml").read_text())
    assert rendered["http_options"] == {"host": "127.0.0.1", "port": 9123, "request_timeout_s": None}
    assert rendered["applications"] == yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())["applications"]


def test_builder_applies_serve_options(tmp_path):
    from serve_app.app import DEPLOYMENT_OPTIONS, build_application

    app = build_application(Settings(cache_dir=tmp_path))
    assert app is not None
    assert DEPLOYMENT_OPTIONS["CSMModel"]["num_replicas"] == 1
    assert sum(o["ray_actor_options"]["num_cpus"] for o in DEPLOYMENT_OPTIONS.values()) < 1.5


def test_pid_file_refuses_a_live_server_and_replaces_a_stale_one(tmp_path):
    import os

    import pytest

    from serve_app.launch import claim_pid_file

    pid_file = tmp_path / "server.pid"
    pid_file.write_text(f"{os.getppid()}\n")  # a live process
    with pytest.raises(SystemExit, match="already running"):
        claim_pid_file(pid_file)
    pid_file.write_text("4194303\n")  # above pid_max: certainly not running
    claim_pid_file(pid_file)
    assert pid_file.read_text().strip() == str(os.getpid())
    pid_file.write_text("garbage")
    claim_pid_file(pid_file)
    assert pid_file.read_text().strip() == str(os.getpid())


def test_ray_variables_from_env_file_reach_serve_run(tmp_path, monkeypatch):
    import os

    from serve_app.launch import export_ray_variables

    env_file = tmp_path / ".env"
    env_file.write_text("RAY_GRAFANA_HOST=http://127.0.0.1:3000\nPORT=9000\n")
    monkeypatch.setenv("ENV_FILE", str(env_file))
    monkeypatch.delenv("RAY_GRAFANA_HOST", raising=False)
    export_ray_variables()
    assert os.environ["RAY_GRAFANA_HOST"] == "http://127.0.0.1:3000"
    monkeypatch.delenv("RAY_GRAFANA_HOST")
