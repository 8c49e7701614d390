"""The frame-loop benchmark's summary (medians over rounds, ratios within the run) and its Markdown."""

from __future__ import annotations

import statistics

from serve_app.core.constants import FRAME_RATE


def _median(values) -> float:
    values = [v for v in values if v is not None]
    return _sig(statistics.median(values)) if values else None


def _sig(value: float) -> float:
    """Four significant digits: frames/s is ~0.2 at full size on a CPU and ~50 on the tiny checkpoint."""
    return float(f"{value:.4g}")


def summarize(results: dict, batches: list[int]) -> dict:
    top = str(max(batches))
    engine = {}
    for name, parts in results["engine"].items():
        engine[name] = {
            "frames_per_s": _median(p["frames_per_s"] for p in parts),
            f"batch{top}_frames_per_s": _median(p["concurrency"][top]["audio_s_per_s"] * FRAME_RATE for p in parts),
        }
    for mode in {name.split(" ", 1)[1] for name in engine}:
        this, base = engine.get(f"this {mode}"), engine.get(f"baseline {mode}")
        if this and base:
            this["vs_baseline"] = {k: round(this[k] / base[k], 2) for k in ("frames_per_s", f"batch{top}_frames_per_s")}
    loop = {}
    for name, parts in results["loop"].items():
        loop[name] = {}
        for b in map(str, batches):
            rows = [p["batches"][b] for p in parts]
            fps = _sig(results["frames"] / statistics.median(run["wall_s"] for r in rows for run in r["runs"]))
            loop[name][b] = {
                "frames_per_s": fps,
                "aggregate_frames_per_s": _sig(fps * int(b)),
                "kernels_by_component": rows[0].get("kernels_by_component"),  # counted exactly: same every round
                "count": rows[0].get("kernel_count"),
                **{
                    k: _median(r.get(k) for r in rows)
                    for k in (
                        "kernels_per_frame",
                        "graph_build_ms_per_frame",
                        "syncs_per_frame",
                        "host_ms_per_frame",
                        "frame_wait_ms_per_frame",
                    )
                },
            }
    for name, per_batch in loop.items():  # the device's time per frame: measured where nothing is queued behind
        mode = name.split(" ")[1]
        plain = loop.get(f"this {mode} pipeline=off", {})
        base = loop.get(f"baseline {mode}", {})
        for b, row in per_batch.items():
            if b in base and not name.startswith("baseline"):
                row["vs_baseline"] = round(row["frames_per_s"] / base[b]["frames_per_s"], 3)
            if "1" in per_batch and b != "1":
                row["batching_gain"] = round(row["aggregate_frames_per_s"] / per_batch["1"]["frames_per_s"], 3)
            device = plain.get(b, {}).get("frame_wait_ms_per_frame")
            row["device_idle_ms_per_frame"] = (
                round(max(0.0, 1000 / row["frames_per_s"] - device), 3)
                if device is not None and not name.startswith("baseline")
                else None
            )
            row["device_ms_per_frame"] = device if not name.startswith("baseline") else None
    summary = {"engine": engine, "loop": loop}
    if results.get("reference"):
        ref = results["reference"]
        summary["reference"] = {
            "frames_per_s": _median(r["frames_per_s"] for r in ref),
            "kernels_per_frame": _median(r.get("kernels_per_frame") for r in ref),
        }
        for per_batch in loop.values():
            per_batch["1"]["vs_mlx_audio_loop"] = round(
                per_batch["1"]["frames_per_s"] / summary["reference"]["frames_per_s"], 2
            )
    return summary


def _v(value) -> str:
    return "–" if value is None else f"{value:.0f}" if isinstance(value, float) and value > 1000 else str(value)


def _x(value) -> str:
    return "–" if value is None else f"{value}x"


def to_markdown(results: dict, batches: list[int]) -> str:
    s, m = results["summary"], results["machine"]
    top = str(max(batches))
    lines = [
        f"# Frame loop: {results['checkpoint_kind']} checkpoint on {m['name']}",
        "",
        f"`{results['command']}` — {results['date']}, MLX {m['mlx_version']} ({m['mlx_device']}"
        f"{', ' + m['gpu'] if m.get('gpu') else ''}), {results['frames']} frames per request, "
        f"{results['repeats']} repeats, medians of {results['rounds']} interleaved rounds, voice `fast`.",
        "",
    ]
    if s["engine"]:
        lines += [
            "## Bare engine (`python -m serve_app.tools.bench` engine part), this tree vs the baseline commit "
            f"`{results['baseline']}`",
            "",
            f"| Build | Frames/s, 1 request | vs baseline | Frames/s, {top} together | vs baseline |",
            "|---|---|---|---|---|",
        ]
        for name, row in sorted(s["engine"].items()):
            vs = row.get("vs_baseline", {})
            lines.append(
                f"| {name} | {row['frames_per_s']} | {_x(vs.get('frames_per_s'))} | "
                f"{row[f'batch{top}_frames_per_s']} | {_x(vs.get(f'batch{top}_frames_per_s'))} |"
            )
        lines.append("")
    lines += [
        "## Our loop, per batch frame",
        "",
        "| Configuration | Batch | Frames/s per stream | Aggregate | Gain vs batch 1 | vs baseline | Kernels | "
        "Graph build ms | Host syncs | MLX thread ms | Device ms | Device idle ms (est.) | vs mlx-audio loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_batch in sorted(s["loop"].items()):
        for b, r in per_batch.items():
            lines.append(
                f"| {name} | {b} | {r['frames_per_s']} | {r['aggregate_frames_per_s']} | "
                f"{_x(r.get('batching_gain'))} | {_x(r.get('vs_baseline'))} | {_v(r['kernels_per_frame'])} | "
                f"{_v(r['graph_build_ms_per_frame'])} | "
                f"{_v(r['syncs_per_frame'])} | {_v(r['host_ms_per_frame'])} | {_v(r['device_ms_per_frame'])} | "
                f"{_v(r['device_idle_ms_per_frame'])} | {_x(r.get('vs_mlx_audio_loop'))} |"
            )
    if "reference" in s:
        ref = s["reference"]
        lines += [
            "",
            f"mlx-audio's own loop (`generate_frame` as `Model.generate` drives it, codes only, batch 1): "
            f"{ref['frames_per_s']} frames/s, {_v(ref['kernels_per_frame'])} kernels per frame (no Mimi), "
            "1 host sync per frame (its end-of-speech check).",
        ]
    components = [
        (name, b, r["kernels_by_component"]) for name, per in sorted(s["loop"].items()) for b, r in per.items()
    ]
    components = [(n, b, c) for n, b, c in components if c and "pipeline=off" not in n]
    if components:
        keys = list(components[0][2])
        lines += [
            "",
            "## Kernels per frame by component (each counted on its own; `mx.compile` may fuse across them)",
            "",
            "| Configuration | Batch | " + " | ".join(keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        lines += [f"| {n} | {b} | " + " | ".join(_v(c.get(k)) for k in keys) + " |" for n, b, c in components]
    lines += _dispatch_lines(s)
    lines += [
        "",
        "Kernels: what a GPU launches for one steady frame with Mimi's share (ops/bench/frame_kernels.py); "
        "graph build ms: the loop's median host time to build a frame's graph before its launch. "
        "Host syncs: frame reads, prefill evaluations and Mimi reads per frame. MLX thread ms: time in a "
        "step not blocked on the device (Python, graph building, launching). Device ms: the frame read's "
        "wait in the unpipelined loop, where nothing else is queued. Device idle (est.): wall time per "
        "frame minus device ms.",
        "",
    ]
    return "\n".join(lines)


def _span(r: dict) -> str:
    return f"{r['low']:g}" if r["low"] == r["high"] else f"{r['low']:g}-{r['high']:g}"


def _dispatch_lines(s: dict) -> list[str]:
    """What Metal launches per frame (ops/bench/dispatch.py), where this tree's counter reports it."""
    rows = [
        (name, b, r["count"])
        for name, per in sorted(s["loop"].items())
        for b, r in per.items()
        if (r.get("count") or {}).get("dispatches_per_frame") and "pipeline=off" not in name
    ]
    if not rows:
        return []
    keys = list(rows[0][2]["dispatches_by_component"])
    chips = list(rows[0][2]["dispatches_by_chip"])
    lines = [
        "",
        f"## Metal dispatches per frame ({rows[0][2]['chip']}; a range where an update's copy depends on donation)",
        "",
        "| Configuration | Batch | Kernels | Dispatches | Frame dispatches | Metal graph nodes | CPU graph nodes | "
        "Build ms, Metal-shaped | Build ms, CPU graph |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, b, c in rows:
        build = c.get("graph_build_ms") or {}
        lines.append(
            f"| {n} | {b} | {c['kernels_per_frame']} | {_span(c['dispatches_per_frame'])} | "
            f"{_span(c['frame_dispatches'])} | {c['metal_graph_nodes']} | {c['frame_graph_nodes']} | "
            f"{_v(build.get('metal_shaped'))} | {_v(build.get('cpu_graph'))} |"
        )
    lines += ["", "| Configuration | Batch | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    lines += [
        f"| {n} | {b} | " + " | ".join(_span(c["dispatches_by_component"][k]) for k in keys) + " |" for n, b, c in rows
    ]
    capacities = list(rows[0][2]["dispatches_by_chip"][chips[0]])
    lines += [
        "",
        "| Configuration | Batch | Chip | " + " | ".join(capacities) + " |",
        "|---|---|---|" + "---|" * len(capacities),
    ]
    for n, b, c in rows:
        for chip in chips:
            at = c["dispatches_by_chip"][chip]
            lines.append(f"| {n} | {b} | {chip} | " + " | ".join(_span(at[k]) for k in capacities) + " |")
    extras = "; ".join(f"{n} batch {b}: {c['dispatch_extras'] or 'none'}" for n, b, c in rows)
    lines += ["", f"Dispatches beyond one per kernel, in the frame: {extras}."]
    return lines
