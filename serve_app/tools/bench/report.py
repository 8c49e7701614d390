"""Benchmark results: the machine's name, the comparisons, and the JSON, Markdown and PNG files."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional


def _gpu_name() -> Optional[str]:
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            )
            .stdout.strip()
            .splitlines()
        )
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    """What ran the benchmark, and a folder name for its results (e.g. linux-x86_64-2cpu-mlx-cpu)."""
    import mlx.core as mx

    system, arch, cpus = platform.system().lower(), platform.machine().lower(), os.cpu_count() or 0
    chip = None
    if system == "darwin":
        chip = subprocess.run(
            ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
        ).stdout.strip()
    gpu = _gpu_name()
    device = "cpu"
    if mx.is_available(mx.gpu):
        device = "metal" if mx.metal.is_available() else "cuda"
    parts = ["macos" if system == "darwin" else system, arch, chip or f"{cpus}cpu"]
    if gpu and device == "cuda":
        parts.append(gpu)
    parts.append(f"mlx-{device}")
    name = re.sub(r"[^a-z0-9._-]+", "-", "-".join(parts).lower()).strip("-")
    return {
        "name": name,
        "system": system,
        "arch": arch,
        "cpus": cpus,
        "chip": chip,
        "gpu": gpu,
        "mlx_device": device,
        "mlx_version": mx.__version__,
        "python": platform.python_version(),
    }


def compare(result: dict) -> dict:
    """The targets, as ratios measured in this one run."""
    engine, server, reference = result.get("engine"), result.get("server"), result.get("reference")
    out: dict = {}
    if engine and server:
        first = engine["first_pcm_ms"]
        out["first_byte_overhead_ms"] = {fmt: round(v["ttfb_ms"] - first, 1) for fmt, v in server["formats"].items()}
        # From wall times (the same audio on both sides), not from the rounded rates.
        out["throughput_vs_engine"] = {
            n: round(engine["concurrency"][n]["wall_s"] / v["wall_s"], 3)
            for n, v in server["concurrency"].items()
            if n in engine["concurrency"]
        }
    for name, part in (("engine", engine), ("server", server)):
        levels = (part or {}).get("concurrency", {})
        if "1" in levels:  # n requests at once against n times one request alone
            out[f"{name}_batching_gain"] = {
                n: round(int(n) * levels["1"]["wall_s"] / v["wall_s"], 3) for n, v in levels.items()
            }
    if engine and reference and "frames_per_s" in reference:
        out["engine_vs_mlx_audio_fps"] = round(engine["frames_per_s"] / reference["frames_per_s"], 3)
    return out


def _ms(v) -> str:
    return "–" if v is None else f"{v:,.0f} ms"


def markdown(result: dict) -> str:
    if result.get("kind") == "memory":
        return memory_markdown(result)
    m, engine, server, ref, cmp = (
        result["machine"],
        result.get("engine"),
        result.get("server"),
        result.get("reference"),
        result["comparison"],
    )
    lines = [
        f"# Benchmark: {result['checkpoint_kind']} checkpoint on {m['name']}",
        "",
        f"`{result['command']}` — {result['date']}, MLX {m['mlx_version']} ({m['mlx_device']}), "
        f"{result['frames']} frames ({result['frames'] / 12.5:.2f} s of audio) per request, "
        f'text: "{result["text"]}", voice `{result["voice"]}`.',
        "",
        "| Measured | First audio | Total | Frames/s | RTF | vs bare engine |",
        "|---|---|---|---|---|---|",
    ]
    if engine:
        lines.append(
            f"| Bare engine, in-process ({'compiled' if engine['compiled'] else 'not compiled'}) | "
            f"{_ms(engine['first_pcm_ms'])} | {engine['total_s']:.2f} s | {engine['frames_per_s']:.2f} | "
            f"{engine['rtf']:.2f} | – |"
        )
    if ref:
        if "skipped" in ref:
            lines.append(f"| mlx-audio `Model.generate` | skipped: {ref['skipped']} | | | | |")
        else:
            lines.append(
                f"| mlx-audio `Model.generate` (no streaming) | – | {ref['total_s']:.2f} s | "
                f"{ref['frames_per_s']:.2f} | {ref['rtf']:.2f} | engine is "
                f"{cmp.get('engine_vs_mlx_audio_fps', 0):.2f}x its frames/s |"
            )
    for fmt, v in (server or {}).get("formats", {}).items():
        lines.append(
            f"| Server over HTTP, streamed {fmt} | {_ms(v['ttfb_ms'])} | {v['total_s']:.2f} s | "
            f"{result['frames'] / v['total_s']:.2f} | {v['rtf']:.2f} | first byte "
            f"{cmp['first_byte_overhead_ms'][fmt]:+.0f} ms |"
        )
    staged = {fmt: v["stages_ms"] for fmt, v in (server or {}).get("formats", {}).items() if v.get("stages_ms")}
    if staged:
        lines += [
            "",
            "Where the server's first byte went (medians of its `Server-Timing` header, ms; `model`: from the "
            "encoder's call to the model's first PCM in the encoder, `encode`: from there to ffmpeg's first "
            "bytes, `hops`: the rest between the ingress and the encoder):",
            "",
        ]
        order = ["admit", "plan", "model", "encode", "hops", "total"]
        names = [n for n in order if any(n in v for v in staged.values())]
        names += sorted({n for v in staged.values() for n in v} - set(names))
        lines += ["| Format | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for fmt, stages in staged.items():
            lines.append(f"| {fmt} | " + " | ".join(str(stages.get(k, "–")) for k in names) + " |")
    lines += [
        "",
        "| Concurrent requests | Engine audio s/s | Engine gain vs 1 | Server audio s/s | Server / engine | "
        "Server gain vs 1 | Server p50 / p95 first byte |",
        "|---|---|---|---|---|---|---|",
    ]
    levels = (engine or {}).get("concurrency", {}) or (server or {}).get("concurrency", {})
    for n in levels:
        e = (engine or {}).get("concurrency", {}).get(n)
        v = (server or {}).get("concurrency", {}).get(n)
        cells = [f"{e['audio_s_per_s']:.3g}", f"{cmp['engine_batching_gain'][n]:.2f}x"] if e else ["–", "–"]
        cells += (
            [
                f"{v['audio_s_per_s']:.3g}",
                f"{cmp['throughput_vs_engine'][n]:.0%}" if e else "–",
                f"{cmp['server_batching_gain'][n]:.2f}x",
                f"{_ms(v['ttfb_p50_ms'])} / {_ms(v['ttfb_p95_ms'])}",
            ]
            if v
            else ["not run"] + ["–"] * 3
        )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if server:
        mem = server["memory"]
        rep = mem["model_replica"]
        lines += [
            "",
            f"Memory: model replica MLX active {rep['mlx_active_mb']:,.0f} MB, MLX peak {rep['mlx_peak_mb']:,.0f} MB "
            f"(during the last batch), resident {rep['rss_mb']:,.0f} MB; all {mem['processes']} server "
            f"processes together {mem['all_processes_rss_mb']:,.0f} MB resident.",
        ]
    if not server:
        lines.append("")
    if engine:
        em = engine["memory"]
        lines.append(f"Bare engine process: MLX peak {em['mlx_peak_mb']:,.0f} MB, resident {em['rss_mb']:,.0f} MB.")
    if ref and "memory" in ref:
        lines.append(
            f"mlx-audio process: MLX peak {ref['memory']['mlx_peak_mb']:,.0f} MB, resident "
            f"{ref['memory']['rss_mb']:,.0f} MB."
        )
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> Optional[Path]:
    """Aggregate throughput by concurrency (engine vs server) and first audio by path, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    engine, server = result.get("engine") or {}, result.get("server") or {}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    levels = list(server.get("concurrency", {}))
    x = range(len(levels))
    left.bar(
        [i - 0.2 for i in x],
        [engine.get("concurrency", {}).get(n, {}).get("audio_s_per_s", 0) for n in levels],
        0.4,
        label="bare engine",
    )
    left.bar(
        [i + 0.2 for i in x], [server["concurrency"][n]["audio_s_per_s"] for n in levels], 0.4, label="server (HTTP)"
    )
    left.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    left.set_xticks(list(x), levels)
    left.set(xlabel="concurrent requests", ylabel="audio seconds per wall second", title="Aggregate throughput")
    left.legend()
    names, values = [], []
    if engine:
        names.append("engine\nfirst PCM")
        values.append(engine["first_pcm_ms"])
    for fmt, v in server.get("formats", {}).items():
        names.append(f"server\n{fmt}")
        values.append(v["ttfb_ms"])
    right.bar(names, values, color="tab:green")
    right.set(ylabel="ms", title="Time to first audio (1 request)")
    fig.suptitle(f"{result['checkpoint_kind']} checkpoint, {result['machine']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(result: dict, folder: Path) -> list[Path]:
    """Either command's result as `<checkpoint>.{json,md,png}` (speed) or `memory-<checkpoint>.{json,md}`."""
    folder.mkdir(parents=True, exist_ok=True)
    is_memory = result.get("kind") == "memory"
    stem = folder / (f"memory-{result['checkpoint_kind']}" if is_memory else result["checkpoint_kind"])
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    png = None if is_memory else chart(result, stem.with_suffix(".png"))
    return paths + ([png] if png else [])


def _mb(v) -> str:
    return "–" if v is None else f"{v:,.0f} MB"


def memory_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Memory per QUANTIZE: {result['checkpoint_kind']} checkpoint on {m['name']}",
        "",
        f"`{result['command']}` — {result['date']}, MLX {m['mlx_version']} ({m['mlx_device']}), voice "
        f"`{result['voice']}`: load, then one 2-frame request, each level in a fresh process.",
        "",
        "| QUANTIZE | Load | MLX peak during load | MLX active after load | MLX peak during a request "
        "| Resident after the request |",
        "|---|---|---|---|---|---|",
    ]
    for part in result["levels"]:
        if "skipped" in part:
            lines.append(f"| ? | {part['skipped']} | | | | |")
            continue
        load, after = part["after_load"], part["after_request"]
        level = part["quantize"] or "off (bf16)"
        lines.append(
            f"| {level} | {load['load_s']} s | {_mb(load['mlx_peak_mb'])} | {_mb(load['mlx_active_mb'])} "
            f"| {_mb(after['mlx_peak_mb'])} | {_mb(after['rss_mb'])} |"
        )
    return "\n".join(lines) + "\n"
