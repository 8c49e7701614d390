"""A Ray cluster of several nodes on this one machine, for the scale-out test and benchmark: a head
(`ray start --head`) and workers (`ray start --address`), each a raylet of its own declaring the "mlx"
resource, as the README's "Several machines" has each Mac do.

Every `ray start --block` runs in a session of its own, and everything Ray starts for that node (GCS,
raylet, workers, replicas) stays in it, so `stop` ends exactly the processes this cluster started, by
session, never by name. Token authentication is on, as on a fresh Ray install.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_app.api.proxy import PROXY_CALLBACK, PROXY_CALLBACK_VARIABLE
from serve_app.core.constants import IDLE_RAY_SERVE
from serve_app.core.processes import kill_session
from serve_app.tools.local_server import free_port

RAY = str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    def __init__(self, work: Path, nodes: int = 2, cpus_per_node: int = 2):
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: Ray refuses `ray start --address` on macOS without it (Linux's
        # default), the head's proxy applies the write deadline and Serve's loops wake less often when idle, as
        # docs/pages/cluster.md's recipe says.
        self.env = {
            **IDLE_RAY_SERVE,
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            PROXY_CALLBACK_VARIABLE: PROXY_CALLBACK,
        }
        self.env.pop("RAY_ADDRESS", None)
        # A cluster with token authentication needs a token before its head starts; `ray start` makes none.
        # `ray get-auth-token --generate` writes ~/.ray/auth_token only if there is none (the README's recipe).
        if not self.env.get("RAY_AUTH_TOKEN") and not self.env.get("RAY_AUTH_TOKEN_PATH"):
            subprocess.run(
                [RAY, "get-auth-token", "--generate"], env=self.env, capture_output=True, check=True, timeout=60
            )
        self.procs: list[subprocess.Popen] = []
        common = [
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(cpus_per_node),
            "--resources",
            '{"mlx": 1}',
            "--disable-usage-stats",
        ]
        # A temporary root of its own: `ray start --head` records its address in <root>/ray_current_cluster,
        # where any later `ray.init()` on this machine without an address would find it (and hang on it once
        # this cluster is gone).
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        try:
            self._start(
                "head",
                ["--head", "--port", str(self.port), "--include-dashboard=false", "--temp-dir", self.temp_dir, *common],
            )
            self._wait_for_port()
            for i in range(1, nodes):
                self._start(f"node{i}", ["--address", self.address, *common])
            self._wait_for_nodes(nodes)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.work / f"{name}.log", "wb") as out:
            self.procs.append(
                subprocess.Popen(
                    [RAY, "start", *args], env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def _wait_for_port(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"ray start --head exited: {(self.work / 'head.log').read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError("the head node's GCS did not open its port")

    def _wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        """Until `count` nodes are alive (a server started earlier would count fewer for MODEL_REPLICAS=auto)."""
        probe = (
            "import ray, sys, time\n"
            f"ray.init(address={self.address!r}, logging_level='error')\n"
            f"deadline = time.monotonic() + {timeout}\n"
            f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
            "    if time.monotonic() > deadline: sys.exit(1)\n"
            "    time.sleep(0.25)\n"
        )
        done = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, timeout=timeout + 60)
        if done.returncode != 0:
            raise RuntimeError(f"the cluster did not reach {count} nodes: {done.stderr.decode()[-1500:]}")

    def server_env(self) -> dict[str, str]:
        """What a server started against this cluster needs (LocalServer's env overrides)."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}

    def stop(self) -> None:
        """SIGKILL every process of every node's session (GCS, raylets, workers, replicas)."""
        for proc in self.procs:
            kill_session(proc.pid)
            proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
