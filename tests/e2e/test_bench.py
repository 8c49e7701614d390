"""`python -m serve_app.tools.bench` end to end on the tiny checkpoint, kept small: every part runs (the bare
engine, the mlx-audio reference's skip on a small Mimi, the real server over HTTP) and the results files hold
the numbers the docs' performance page is built from; then the memory command, and two campaign harnesses
(ops/bench/), which stay runnable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import ROOT

pytestmark = pytest.mark.server


def run_bench(module: str, out, *args: str) -> Path:
    """`python -m <module> ARGS --out OUT` from the checkout, bounded; the one machine folder it wrote."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    [folder] = list(out.iterdir())
    return folder


def test_bench_writes_json_markdown_and_chart(tiny_checkpoint, tmp_path):
    args = ["--checkpoint", str(tiny_checkpoint), "--frames", "6", "--repeats", "2", "--concurrency", "1,2"]
    folder = run_bench("serve_app.tools.bench", tmp_path / "results", *args, "--formats", "pcm,mp3")
    result = json.loads((folder / f"{tiny_checkpoint.name}.json").read_text())
    engine, server, cmp = result["engine"], result["server"], result["comparison"]
    assert engine["frames"] == 6 and 0 < engine["first_pcm_ms"] < 1000 * engine["total_s"]
    assert set(engine["concurrency"]) == set(server["concurrency"]) == {"1", "2"}
    assert "skipped" in result["reference"]  # the tiny Mimi is not mlx-audio's hard-coded one
    for fmt in ("pcm", "mp3"):
        assert server["formats"][fmt]["ttfb_ms"] > 0
        stages = server["formats"][fmt]["stages_ms"]  # from the server's Server-Timing headers
        assert stages["model"] > 0 and stages["total"] >= stages["model"] and ("encode" in stages) == (fmt == "mp3")
        assert cmp["first_byte_overhead_ms"][fmt] == pytest.approx(
            server["formats"][fmt]["ttfb_ms"] - engine["first_pcm_ms"], abs=0.2
        )
    # every pcm stream held exactly 6 frames (the bench checks the bytes), and memory came from the replica
    assert server["memory"]["model_replica"]["mlx_active_mb"] > 0 and server["memory"]["processes"] > 3
    table = (folder / f"{tiny_checkpoint.name}.md").read_text()
    assert "Server over HTTP, streamed pcm" in table and "| 2 |" in table and "Where the server's first byte" in table
    assert (folder / f"{tiny_checkpoint.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_memory_command_writes_one_row_per_quantize_level(tiny_checkpoint, tmp_path):
    """`python -m serve_app.tools.bench memory`: each QUANTIZE level loaded in a process of its own, through the
    same report writer (JSON and a Markdown table)."""
    args = ["memory", "--checkpoint", str(tiny_checkpoint), "--quantize", "0,8", "--voice", "fast"]
    folder = run_bench("serve_app.tools.bench", tmp_path / "results", *args)
    result = json.loads((folder / f"memory-{tiny_checkpoint.name}.json").read_text())
    assert [level["quantize"] for level in result["levels"]] == [0, 8]
    full, q8 = (level["after_load"]["mlx_active_mb"] for level in result["levels"])
    assert 0 < q8 < full  # 8-bit weights take less memory than bf16, even at this size
    assert len({level["after_load"]["pid"] for level in result["levels"]}) == 2
    table = (folder / f"memory-{tiny_checkpoint.name}.md").read_text()
    assert "| off (bf16) |" in table and "| 8 |" in table


def test_voice_bench_compares_kv_reuse_side_by_side(tiny_checkpoint, tmp_path):
    args = ["--checkpoint", str(tiny_checkpoint), "--frames", "3", "--chunks", "3", "--repeats", "1"]
    folder = run_bench("ops.bench.voices", tmp_path / "results", *args)
    result = json.loads((folder / f"voices-{tiny_checkpoint.name}.json").read_text())
    assert set(result["median_s"]) == {"conversational/reuse", "conversational/before", "fast/reuse", "fast/before"}
    assert set(result["join_stall"]) == {"reuse", "before", "chunked-only"}
    for row in result["median_s"].values():
        assert 0 < row["first"] < row["total"]
    assert result["prefix_cache"]["entries"] == 2 and len(result["targets"]) == 4
    assert "| conversational/reuse |" in (folder / f"voices-{tiny_checkpoint.name}.md").read_text()


def test_the_gpu_script_runs_the_loop_bench_end_to_end(tmp_path):
    """ops/gpu-bench.sh, what a lent GPU runs in its one call, tried on this machine's MLX with the tiny
    checkpoint: the loop benchmark counts kernels, syncs and build time and compares with mlx-audio's loop."""
    env = {
        **os.environ,
        **{"OUT": str(tmp_path), "FRAMES": "3", "COMPILE": "off", "PIPELINES": "on", "CACHE_DIR": str(tmp_path)},
    }
    done = subprocess.run(
        ["ops/gpu-bench.sh", "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "gpu available" in (tmp_path / "gpu-bench.log").read_text()
    [folder] = list((tmp_path / "bench").iterdir())
    result = json.loads((folder / "loop-tiny.json").read_text())
    loop = result["summary"]["loop"]
    assert set(loop) == {"this compile=off pipeline=on"}
    for row in (r for per_batch in loop.values() for r in per_batch.values()):
        assert row["frames_per_s"] > 0 and 1 <= row["syncs_per_frame"] < 3 and row["graph_build_ms_per_frame"] > 0
        components = row["kernels_by_component"]
        assert set(components) == {"embeddings", "backbone", "depth_decoder", "noise", "sampling", "mimi_per_frame"}
        assert row["kernels_per_frame"] == round(sum(components.values()))  # uncompiled: nothing fuses across
        dispatches = row["count"]["dispatches_per_frame"]  # what Metal launches: at least one per kernel
        assert row["kernels_per_frame"] <= dispatches["low"] <= dispatches["high"]
    assert loop["this compile=off pipeline=on"]["2"]["batching_gain"] > 0
    reference = result["summary"]["reference"]
    assert reference["frames_per_s"] > 0 and reference["kernels_per_frame"] > 100  # mlx-audio's loop, same weights
    markdown = (folder / "loop-tiny.md").read_text()
    assert "vs mlx-audio loop" in markdown and "| depth_decoder |" in markdown
    assert "## Metal dispatches per frame" in markdown and "| M3/M4 Max/Ultra |" in markdown
