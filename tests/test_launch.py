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
