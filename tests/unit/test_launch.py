"""The start command: HOST and PORT reach Serve's http_options; the shipped config stays as it is."""

from __future__ import annotations

import yaml

from serve_app.core.constants import PROJECT_ROOT
from serve_app.core.settings import Settings
from serve_app.launch import render_config


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


def _deployments(app) -> dict:
    """Every deployment of a bound application graph, by name."""
    from ray.serve.deployment import Application

    found, todo = {}, [app]
    while todo:
        deployment = todo.pop()._bound_deployment
        found[deployment.name] = deployment
        todo += [arg for arg in deployment.init_args if isinstance(arg, Application)]
    return found


def test_builder_derives_serve_options_from_settings(tmp_path):
    from serve_app.app import build_application
    from serve_app.core.constants import STOP_GRACE_S

    settings = Settings(cache_dir=tmp_path, max_batch_size=4, max_queued_requests=6)
    found = _deployments(build_application(settings))
    assert set(found) == {"SpeechIngress", "TextFrontend", "AudioEncoder", "CSMModel"}
    model = found["CSMModel"]
    assert model.num_replicas == 1
    assert model.init_args[0] is settings
    # Admission lets 4 + 6 streams in; every deployment they pass through has a slot for each, and more.
    for name, deployment in found.items():
        assert deployment._deployment_config.max_ongoing_requests > 10, name
    assert model._deployment_config.graceful_shutdown_timeout_s == STOP_GRACE_S
    # Slow clients hold ingress slots while their bodies arrive: room for hundreds, then Serve's queue, then
    # an immediate 503 with Retry-After rather than an unbounded wait.
    ingress = found["SpeechIngress"]._deployment_config
    assert ingress.max_ongoing_requests >= 500 and ingress.max_queued_requests > 0
    assert ingress.backpressure_config.status_code == 503 and ingress.backpressure_config.retry_after_s >= 1
    assert model._deployment_config.health_check_period_s <= 10
    assert sum(d.ray_actor_options["num_cpus"] for d in found.values()) < 1.5
    bigger = _deployments(build_application(Settings(cache_dir=tmp_path, max_batch_size=8, max_queued_requests=100)))
    assert bigger["CSMModel"]._deployment_config.max_ongoing_requests > 108
    # Serve's access lines (five per /health poll) only with ACCESS_LOG, in every deployment.
    for access_log, built in (
        (False, found),
        (True, _deployments(build_application(Settings(cache_dir=tmp_path, access_log=True)))),
    ):
        assert {d._deployment_config.logging_config["enable_access_log"] for d in built.values()} == {access_log}


def test_processes_that_run_no_mlx_never_import_it():
    """The builder (serve run's process) and the ingress, frontend and encoder replicas import only these
    modules; MLX, mlx-audio and the tokenizer load in the model replica alone."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import serve_app.app, serve_app.api.ingress, serve_app.audio.encoder, serve_app.text.frontend, "
        "serve_app.model.replica, serve_app.model.loading, serve_app.tools.loadtest, serve_app.launch\n"
        "from serve_app.core.settings import Settings\n"
        "serve_app.app.build_application(Settings())\n"
        "heavy = {'mlx', 'mlx_audio', 'tokenizers', 'huggingface_hub'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_pid_file_is_held_under_a_lock_not_trusted_by_its_pid(tmp_path):
    """A stale PID file naming a live, unrelated process (a pid reused after a reboot) does not wedge the
    service, and a live supervisor's lock refuses a second one whatever its file says."""
    import os
    import subprocess
    import sys

    from serve_app.service import PidLock, running_pid

    pid_file = tmp_path / "server.pid"
    pid_file.write_text(f"{os.getppid()}\n")  # a live process, but nobody holds the lock: stale
    assert running_pid(pid_file) is None
    lock = PidLock(pid_file)
    assert lock.acquire()
    assert running_pid(pid_file) == os.getpid() and pid_file.read_text().strip() == str(os.getpid())
    # Another process cannot take it while we hold it.
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from serve_app.service import PidLock, running_pid; "
            f"p = Path({str(pid_file)!r}); print(running_pid(p)); sys.exit(PidLock(p).acquire())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 0 and other.stdout.strip() == str(os.getpid()), other.stderr
    lock.release()
    assert not pid_file.exists() and running_pid(pid_file) is None
    # A holder that dies (SIGKILL, no clean-up) leaves its file behind, and its lock goes with it.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; "
            "from serve_app.service import PidLock; "
            f"assert PidLock(Path({str(pid_file)!r})).acquire(); print('held', flush=True); "
            "time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert running_pid(pid_file) == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert pid_file.exists() and running_pid(pid_file) is None
    garbage = PidLock(pid_file)
    pid_file.write_text("garbage")
    assert garbage.acquire() and pid_file.read_text().strip() == str(os.getpid())
    garbage.release()


def test_a_cluster_address_gets_what_ray_needs_on_a_mac_and_never_runs_without_auth():
    import pytest

    from serve_app.launch import prepare_ray_environment

    for local in ({"RAY_TMPDIR": "/tmp/x"}, {"RAY_ADDRESS": "local", "RAY_TMPDIR": "/tmp/x"}):
        prepare_ray_environment(local)
        assert local["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # a local cluster stays on loopback
    cluster = {"RAY_ADDRESS": "192.168.1.20:6379", "RAY_AUTH_MODE": "token"}
    prepare_ray_environment(cluster)
    assert cluster["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    with pytest.raises(SystemExit, match="RAY_AUTH_MODE=disabled"):
        prepare_ray_environment({"RAY_ADDRESS": "192.168.1.20:6379", "RAY_AUTH_MODE": "disabled"})
    assert local["GRPC_VERBOSITY"] == cluster["GRPC_VERBOSITY"] == "ERROR"  # no INFO line per ffmpeg start
    # Serve's loops wake less often on an idle server (launch.IDLE_RAY_SERVE), alone or in a cluster.
    assert local["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == cluster["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert local["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"
    chosen = {"RAY_TMPDIR": "/tmp/x", "GRPC_VERBOSITY": "DEBUG", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"}
    prepare_ray_environment(chosen)
    assert chosen["GRPC_VERBOSITY"] == "DEBUG"  # an operator's own value wins
    assert chosen["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"


def test_ray_gets_a_temp_folder_of_this_users_own(tmp_path, monkeypatch):
    import os
    import stat

    from serve_app.launch import private_ray_dir

    environ: dict[str, str] = {}
    private_ray_dir(environ)
    folder = environ["RAY_TMPDIR"]
    info = os.stat(folder)
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
    assert len(folder) < 30  # Ray's socket paths below it must fit in 107 characters
    given = {"RAY_TMPDIR": str(tmp_path)}
    private_ray_dir(given)
    assert given == {"RAY_TMPDIR": str(tmp_path)}  # a folder the user chose is theirs to choose


def test_secrets_never_reach_the_apps_args_or_runtime_env(tmp_path, monkeypatch):
    """Serve logs the app's args, and Ray's runtime-env agent logs a runtime_env's variables: the secrets
    go to a 0600 file in CACHE_DIR instead, and the replicas read them there."""
    import os
    import stat

    tricky = 'sk-very-secret "quoted" \\back $HOME ${X} é'
    monkeypatch.setenv("API_KEY", tricky)
    monkeypatch.setenv("HF_TOKEN", "hf_very_secret")
    monkeypatch.setenv("ENV_FILE", str(tmp_path / "none.env"))
    (tmp_path / "none.env").write_text("")
    settings = Settings.load().model_copy(update={"cache_dir": tmp_path})
    config = render_config(settings, PROJECT_ROOT / "serve_config.yaml")
    text = config.read_text()
    assert "very-secret" not in text and "very_secret" not in text and "runtime_env" not in text
    (app,) = yaml.safe_load(text)["applications"]
    secrets_file = tmp_path / "secrets.env"
    assert app["args"]["SECRETS_FILE"] == str(secrets_file)
    assert stat.S_IMODE(os.stat(secrets_file).st_mode) == 0o600 and stat.S_IMODE(os.stat(config).st_mode) == 0o600
    # What Ray is handed (the bound settings) holds no secret, and a replica finds them again.
    monkeypatch.delenv("API_KEY")
    monkeypatch.delenv("HF_TOKEN")
    bound = Settings.load({k: str(v) for k, v in app["args"].items()}).without_secrets()
    assert bound.api_key is None and bound.hf_token is None
    import pickle

    assert b"very" not in pickle.dumps(bound)
    replica = bound.with_secrets()
    assert replica.api_key.get_secret_value() == tricky  # as given: quotes, backslash, "$" and all
    assert replica.hf_token.get_secret_value() == "hf_very_secret"


def test_host_is_an_address_or_a_host_name():
    import pytest

    from serve_app.core.settings import ConfigError

    for good in ("0.0.0.0", "::", "127.0.0.1", "fe80::1", "studio.local", "mac-studio"):
        assert Settings.load({"HOST": good}, env_file=None).host == good
    for bad in ("$(id)", "a b", "x;rm -rf ~", "`id`", "host\nPORT=1", ""):
        with pytest.raises(ConfigError, match="HOST"):
            Settings.load({"HOST": bad})


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
