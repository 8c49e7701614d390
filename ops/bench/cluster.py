"""Scale-out, side by side in one run: the same load test against the app with one model replica and with
one per node, on the same local Ray cluster (`python -m ops.bench.cluster --checkpoint DIR`).

On one machine the nodes share its cores, so the ratio shows routing and back-pressure at work, not the speed
a second machine adds (a second Mac adds its own replica's throughput; see the README).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serve_app.core.constants import PROJECT_ROOT
from serve_app.tools.local_cluster import LocalCluster
from serve_app.tools.local_server import LocalServer

ENV = {
    "MAX_AUDIO_BASE_S": "0.5",
    "MAX_AUDIO_S_PER_CHAR": "0.05",
    "HF_HUB_OFFLINE": "1",
    "MAX_BATCH_SIZE": "2",
    "MAX_QUEUED_REQUESTS": "2",
}


def run_load(server: LocalServer, clients: int, requests: int, out: Path) -> dict:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "serve_app.tools.loadtest",
            "--url",
            server.base_url,
            "--clients",
            str(clients),
            "--requests",
            str(requests),
            "--hang-up",
            "0",
            "--max-seconds",
            "300",
            "--json",
            str(out),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    report["audio_s_per_s"] = round(report["audio_s"] / report["wall_s"], 3)
    report.pop("failures", None)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.cluster")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    results = {}
    for replicas in ("1", "auto"):
        # A fresh two-node cluster each time: Serve keeps its first HTTP port for the life of a cluster.
        cluster = LocalCluster(work / f"ray-{replicas}")
        try:
            server = LocalServer(
                work / f"server-{replicas}",
                {**ENV, "MODEL_ID": args.checkpoint, "MODEL_REPLICAS": replicas, **cluster.server_env()},
            )
            try:
                started = time.monotonic()
                server.wait_until(
                    lambda r: (
                        r.status_code == 200
                        and r.json()["model_replicas"]["serving"] == r.json()["model_replicas"]["configured"]
                    ),
                    timeout=300,
                )
                health = server.health().json()
                capacity = health["capacity"]
                report = run_load(server, 8 * capacity, args.requests, work / f"load-{replicas}.json")
                served = {
                    r["node"]["id"][:8]: r["served"]
                    for r in httpx.get(f"{server.base_url}/health", timeout=10).json()["replicas"]
                }
                results[f"replicas_{health['model_replicas']['configured']}"] = {
                    "start_s": round(time.monotonic() - started, 1),
                    "capacity": capacity,
                    "clients": 8 * capacity,
                    "served_per_node": served,
                    **report,
                }
            finally:
                server.stop()
        finally:
            cluster.stop()
    one, two = results.get("replicas_1"), results.get("replicas_2")
    if one and two:
        results["throughput_ratio_2_vs_1"] = round(two["audio_s_per_s"] / one["audio_s_per_s"], 2)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
