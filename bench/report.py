"""Summaries of the training benchmark: per-optimizer statistics over seeds, the printed table,
the JSON file and the loss-curve plot.

Quality is compared paired: for each seed, an optimizer's validation loss minus AdamW's on the same
seed (same initial weights and batches), then the mean and sample standard deviation of those
differences. Costs are reported as ratios to AdamW measured in the same run.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
from pathlib import Path
from typing import Any

BASELINE = "adamw"
MIB = 2**20


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], baseline_runs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Aggregate one optimizer's runs (one per seed).

    Losses: mean and sample std over seeds. Times: median over seeds of each run's median.
    Bytes: the first run's (they do not depend on the seed). ``val_loss_delta_*``: paired
    difference to the baseline on the seeds both ran; absent without a baseline.
    """
    val_mean, val_std = _mean_std([r["val_loss"] for r in runs])
    train_mean, train_std = _mean_std([r["train_loss"] for r in runs])
    summary: dict[str, Any] = {
        "seeds": [r["seed"] for r in runs],
        "train_loss_mean": train_mean,
        "train_loss_std": train_std,
        "val_loss_mean": val_mean,
        "val_loss_std": val_std,
        "val_loss_min": min(r["val_loss"] for r in runs),
        "val_loss_max": max(r["val_loss"] for r in runs),
        "val_ppl": math.exp(val_mean) if val_mean < 700 else float("inf"),
        # Byte-level model: nats per byte / ln 2 = bits per byte.
        "val_bpb": val_mean / math.log(2),
        "step_time_s": statistics.median(r["step_time_s"] for r in runs),
        "step_cpu_time_s": statistics.median(r.get("step_cpu_time_s", float("nan")) for r in runs),
        "optimizer_step_time_s": statistics.median(r["optimizer_step_time_s"] for r in runs),
        "param_bytes": runs[0]["param_bytes"],
        "optimizer_state_bytes": runs[0]["optimizer_state_bytes"],
        "target_state_bytes": runs[0].get("target_state_bytes", 0),
        # Measured on the first seed only on CPU (it does not depend on the seed).
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"] is not None),
        "peak_memory_method": runs[0]["peak_memory_method"],
        "techniques": runs[0].get("techniques", {}),
    }
    if baseline_runs:
        base_by_seed = {r["seed"]: r for r in baseline_runs}
        deltas = [
            r["val_loss"] - base_by_seed[r["seed"]]["val_loss"] for r in runs if r["seed"] in base_by_seed
        ]
        summary["val_loss_delta_mean"], summary["val_loss_delta_std"] = _mean_std(deltas)
        base = summarize(baseline_runs, None)
        for key in (
            "step_time_s",
            "optimizer_step_time_s",
            "optimizer_state_bytes",
            "target_state_bytes",
            "peak_memory_bytes",
        ):
            summary[f"{key}_ratio"] = summary[key] / base[key] if base[key] else float("nan")
    return summary


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """A fixed-width table, one row per optimizer, ratios to AdamW in parentheses."""
    headers = [
        "optimizer",
        "train loss",
        "val loss (mean ± std)",
        "Δval vs adamw",
        "val ppl",
        "bpb",
        "step ms",
        "cpu ms",
        "opt.step ms",
        "opt state MiB",
        "of which projected weights",
        "peak MiB",
    ]
    rows = [headers]
    for name, s in summaries.items():
        ratio = functools.partial(_ratio_suffix, s) if name != BASELINE else lambda key: ""
        delta = (
            f"{s['val_loss_delta_mean']:+.3f} ± {s['val_loss_delta_std']:.3f}"
            if "val_loss_delta_mean" in s and name != BASELINE
            else "-"
        )
        rows.append(
            [
                name,
                f"{s['train_loss_mean']:.3f}",
                f"{s['val_loss_mean']:.3f} ± {s['val_loss_std']:.3f}",
                delta,
                f"{s['val_ppl']:.2f}",
                f"{s['val_bpb']:.3f}",
                f"{s['step_time_s'] * 1e3:.1f}{ratio('step_time_s')}",
                f"{s['step_cpu_time_s'] * 1e3:.0f}",
                f"{s['optimizer_step_time_s'] * 1e3:.2f}{ratio('optimizer_step_time_s')}",
                f"{s['optimizer_state_bytes'] / MIB:.2f}{ratio('optimizer_state_bytes')}",
                f"{s['target_state_bytes'] / MIB:.3f}{ratio('target_state_bytes')}",
                f"{s['peak_memory_bytes'] / MIB:.1f}{ratio('peak_memory_bytes')}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """The results as a GitHub-markdown table (for ``bench/RESULTS.md`` and notes)."""
    lines = [
        "| row | val loss (mean ± std) | Δ vs adamw (paired) | val ppl | bpb | step ms | cpu ms "
        "| opt.step ms | opt state MiB | of which projected weights MiB | params MiB | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        ratio = functools.partial(_ratio_suffix, s) if name != BASELINE else lambda key: ""
        delta = (
            f"{s['val_loss_delta_mean']:+.3f} ± {s['val_loss_delta_std']:.3f}"
            if "val_loss_delta_mean" in s and name != BASELINE
            else "–"
        )
        lines.append(
            f"| {name} | {s['val_loss_mean']:.3f} ± {s['val_loss_std']:.3f} | {delta} | {s['val_ppl']:.2f} "
            f"| {s['val_bpb']:.3f} | {s['step_time_s'] * 1e3:.1f}{ratio('step_time_s')} "
            f"| {s['step_cpu_time_s'] * 1e3:.0f} | {s['optimizer_step_time_s'] * 1e3:.2f} "
            f"| {s['optimizer_state_bytes'] / MIB:.2f}{ratio('optimizer_state_bytes')} "
            f"| {s['target_state_bytes'] / MIB:.3f}{ratio('target_state_bytes')} "
            f"| {s['param_bytes'] / MIB:.2f} "
            f"| {s['peak_memory_bytes'] / MIB:.1f}{ratio('peak_memory_bytes')} |"
        )
    return "\n".join(lines)


def write_results_markdown(path: Path, payload: dict[str, Any], command: str) -> None:
    """Write ``bench/RESULTS.md``: the table with the command, machine and commit that produced it.

    The file is generated, never edited by hand: rerun the command to refresh it.
    """
    env = payload["environment"]
    summaries = {name: entry["summary"] for name, entry in payload["results"].items()}
    machine = env.get("gpu") or env.get("cpu_model") or env.get("platform")
    config = payload["config"]
    text = "\n".join(
        [
            "# lowmem benchmark results",
            "",
            "Generated by `python -m lowmem.bench train --results-md ...`; "
            "do not edit by hand, rerun instead.",
            "",
            f"- command: `{command}`",
            f"- commit: `{env.get('commit') or 'unknown'}`",
            f"- machine: {machine}, device `{env.get('device')}`, {env.get('cpus_available')} CPUs "
            f"available, {env.get('torch_threads')} torch threads in all, split over "
            f"{env.get('jobs', 1)} run(s) at once",
            f"- software: python {env.get('python')}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"transformers {env.get('transformers')}",
            f"- run: model `{config.get('model')}` {config.get('preset')}, {config.get('steps')} steps x "
            f"{config.get('batch_size')} x {config.get('seq_len')} bytes, seeds {config.get('seeds')}, "
            f"peak lrs {config.get('peak_lrs')}",
            f"- wall time: {payload.get('wall_time_s', float('nan')):.0f} s",
            "",
            markdown_table(summaries),
            "",
            "Δ: paired difference to adamw on the same seeds (mean ± std); times are medians after warm-up; "
            "ratios in parentheses are to adamw in the same run; cpu ms is process CPU time per step (all "
            "threads); peak: " + str(next(iter(summaries.values()))["peak_memory_method"]) + ".",
            "",
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ratio_suffix(summary: dict[str, Any], key: str) -> str:
    r = summary.get(f"{key}_ratio")
    if r is None or not math.isfinite(r):
        return ""
    return f" ({r:.2f}x)" if r >= 0.1 else f" ({r:.4f}x)"  # small ratios (APOLLO-Mini) keep digits


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating parent directories (NaN/inf become null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite_or_none(payload), indent=1) + "\n")


def _finite_or_none(obj: Any) -> Any:
    # Strict JSON has no NaN/inf; a diverged run reports null instead of an unparseable file.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    fig.clf()
    _pyplot().close(fig)


def plot_curves(path: Path, results: dict[str, dict[str, Any]]) -> str | None:
    """Save train/validation loss curves (seed-mean per optimizer) as a PNG.

    Returns None on success, else a one-line reason (matplotlib missing) and writes nothing.
    """
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed; skipping the loss-curve plot (pip install matplotlib)"

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, entry in results.items():
        curves = [r["train_curve"] for r in entry["runs"]]
        length = min(len(c) for c in curves)
        mean_curve = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        (line,) = ax_train.plot(range(1, length + 1), _smooth(mean_curve, 10), label=name)
        # A diverged run stops early: average only the evaluation points every run reached.
        points = min(len(r["val_curve"]) for r in entry["runs"])
        steps = [entry["runs"][0]["val_curve"][i][0] for i in range(points)]
        val_mean = [statistics.fmean(r["val_curve"][i][1] for r in entry["runs"]) for i in range(points)]
        ax_val.plot(steps, val_mean, marker="o", color=line.get_color(), label=name)
    ax_train.set(title="train loss (seed mean, smoothed)", xlabel="step", ylabel="loss (nats/byte)")
    ax_val.set(title="validation loss (seed mean)", xlabel="step", ylabel="loss (nats/byte)")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return None


def plot_memory(path: Path, summaries: dict[str, dict[str, Any]]) -> str | None:
    """Save a bar chart of memory per row (parameters, optimizer state, peak) as a PNG.

    Returns None on success, else a one-line reason (matplotlib missing) and writes nothing.
    """
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed; skipping the memory plot (pip install matplotlib)"

    names = list(summaries)
    series = {
        "parameters": [summaries[n]["param_bytes"] / MIB for n in names],
        "optimizer state": [summaries[n]["optimizer_state_bytes"] / MIB for n in names],
        "peak": [summaries[n]["peak_memory_bytes"] / MIB for n in names],
    }
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + (i - 1) * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    method = next(iter(summaries.values()))["peak_memory_method"]
    ax.set(title=f"memory per row (peak: {method})", ylabel="MiB")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return None


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
