"""Scale-out: the same app on a two-node Ray cluster (two raylets on this machine, each declaring the "mlx"
resource), MODEL_REPLICAS=auto: two model replicas on two nodes, requests spread over both, admission
counts both, a killed replica's in-flight requests fail while the other keeps serving, and it comes back."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from serve_app.tools.local_cluster import LocalCluster
from tests.support.audio import decode, rms
from tests.support.servers import launch_server, run_loadtest

pytestmark = [pytest.mark.server, pytest.mark.cluster]
MAX_BATCH, MAX_QUEUED = 2, 4
CAPACITY = 2 * MAX_BATCH + MAX_QUEUED  # two replicas' batches and the queue
# ~26 s of audio at the tests' frame caps (~330 frames): still generating when a replica is killed, however
# slowly a loaded machine got all four streams to their first audio, and however fast it generates (the victim
# is chosen from health published up to 2 s before).
HOLD_TEXT = "This request runs long enough to still be generating when the replica goes away. " * 6


def serving(body: dict) -> list[dict]:
    return [r for r in body["replicas"] if r["status"] == "ready"]


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    nodes = LocalCluster(work / "ray")
    server = None
    try:
        server = launch_server(
            work / "server",
            tiny_checkpoint,
            MODEL_REPLICAS="auto",
            MAX_BATCH_SIZE=str(MAX_BATCH),
            MAX_QUEUED_REQUESTS=str(MAX_QUEUED),
            **nodes.server_env(),
        )
        server.wait_until(lambda r: r.status_code == 200 and len(serving(r.json())) == 2, timeout=240)
        yield server
    finally:
        if server is not None:
            server.stop()
        nodes.stop()


def speak(server, text: str, out: dict, key, streaming: threading.Semaphore | None = None) -> None:
    """One request; `streaming` is released at its first audio bytes."""
    try:
        with httpx.stream(
            "POST", f"{server.api}/audio/speech", timeout=120, json={"input": text, "response_format": "pcm"}
        ) as response:
            if response.status_code != 200:
                data = response.read()
            else:
                pieces = []
                for piece in response.iter_raw():
                    if not pieces and streaming is not None:
                        streaming.release()
                    pieces.append(piece)
                data = b"".join(pieces)
            out[key] = (response.status_code, data, "complete")
    except httpx.HTTPError as exc:
        out[key] = (200, b"", type(exc).__name__)


def test_two_replicas_on_two_nodes_share_the_requests(cluster):
    body = cluster.health().json()
    replicas = serving(body)
    assert len({r["node"]["id"] for r in replicas}) == 2, body["replicas"]  # never two on one node
    assert body["model_replicas"] == {"configured": 2, "serving": 2}
    assert body["capacity"] == CAPACITY
    before = {r["replica"]: r["served"] for r in replicas}
    results: dict = {}
    threads = [
        threading.Thread(target=speak, args=(cluster, f"Request number {i} of eight.", results, i)) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(results) == list(range(8))
    statuses = [status for status, _, _ in results.values()]
    assert statuses == [200] * 8, statuses  # the capacity is both replicas' batches plus the queue
    for status, data, end in results.values():
        if status == 200:
            assert end == "complete" and rms(decode(data, "pcm")) > 0.01

    def spread() -> dict:  # published every 2 s: wait until both replicas' counts include these 8
        after = {r["replica"]: r["served"] for r in serving(cluster.health().json())}
        return {rid: after.get(rid, 0) - before[rid] for rid in before}

    deadline = time.monotonic() + 15
    while sum(spread().values()) < 8 and time.monotonic() < deadline:
        time.sleep(0.25)
    spread = spread()
    assert all(n > 0 for n in spread.values()), spread  # each replica served some
    print(f"\n8 concurrent requests: statuses {sorted(statuses)}, served per replica {sorted(spread.values())}")


def test_loadtest_at_eight_times_capacity_gives_only_audio_or_429(cluster, tmp_path):
    report = run_loadtest(cluster.base_url, 8 * CAPACITY, 12, tmp_path)  # more at once than both admit
    assert report["ok"] >= 1 and report["attempts_429"] >= 1, report
    print(
        f"\nload test at 8x capacity on two nodes: {report['ok']} audio, {report['rate_limited']} 429, "
        f"{report['audio_s']} s of audio in {report['wall_s']} s"
    )


def test_a_killed_replica_fails_only_its_own_requests_and_comes_back(cluster):
    """Runs last: kills one model replica outright, mid-stream."""
    results: dict = {}
    streaming = threading.Semaphore(0)
    threads = [threading.Thread(target=speak, args=(cluster, HOLD_TEXT, results, i, streaming)) for i in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(4):  # all four are streaming (each has its first audio)
        assert streaming.acquire(timeout=120)
    # The victim is a replica generating now (Serve chose where the four went; each replica publishes its
    # batch every 2 s), so the kill always cuts requests in flight.
    victim = cluster.wait_until(lambda r: any(x["generating"] for x in serving(r.json())), timeout=30).json()
    victim = next(x for x in serving(victim) if x["generating"])
    os.kill(victim["memory"]["pid"], signal.SIGKILL)
    killed = time.monotonic()
    # Meanwhile a new request is served by the other replica.
    during = httpx.post(
        f"{cluster.api}/audio/speech", json={"input": "The other one answers.", "response_format": "wav"}, timeout=120
    )
    assert during.status_code == 200 and rms(decode(during.content)) > 0.01
    for thread in threads:
        thread.join(timeout=180)
    ends = [end for _, _, end in results.values()]
    assert "complete" in ends, ends  # the other replica's requests finished
    assert any(end != "complete" for end in ends), ends  # the killed one's ended with an error, not a short file
    # (The dead replica's published entry reads "gone" once stale; its replacement publishes a new pid.)
    back = cluster.wait_until(
        lambda r: (
            len(serving(r.json())) == 2
            and victim["memory"]["pid"] not in [x["memory"]["pid"] for x in serving(r.json())]
        ),
        timeout=180,
    ).json()
    recovered = time.monotonic() - killed
    assert victim["memory"]["pid"] not in [r["memory"]["pid"] for r in serving(back)]
    print(
        f"\nreplica killed: in-flight ends {sorted(ends)}; a new request got 200 meanwhile; two replicas serving "
        f"again after {recovered:.1f} s"
    )
