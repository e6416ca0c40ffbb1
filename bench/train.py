"""``python -m lowmem.bench train``: train a small LLaMA on the standard library's source and compare
optimizers and memory techniques side by side.

With no arguments it trains the ``tiny`` preset for 200 steps on 3 paired seeds with the default
rows (``bench/optimizers.py``: AdamW, GaLore and galore-torch, Fira, APOLLO-Mini, 8-bit GaLore
and AdamW on SLTrain layers), then prints one row each: final train loss, validation loss (mean
± std over seeds) and its paired difference to AdamW, validation perplexity and bits per byte,
median step wall and CPU times, optimizer-step time, optimizer-state bytes and peak tensor
memory, with ratios to AdamW. Results (per run, including loss curves) go to
``bench_results/train.json``; loss curves to ``bench_results/train.png`` and memory per row to
``bench_results/train_memory.png`` when matplotlib is installed (the ``bench`` extra).

All optimizers share lr, weight decay, betas, eps, the warm-up + cosine schedule, gradient clipping
and data order; ``--lr-for NAME=LR`` overrides the lr of one row (GaLore papers tune it
separately), and is recorded in the JSON.

A row is an optimizer optionally followed by memory techniques (:mod:`lowmem.bench.techniques`):
``--optimizers adamw,adamw+sltrain,adamw8bit+sltrain+layerwise,galore+layerwise,adamw+ckpt-offload``;
``--list`` prints what exists. ``--results-md bench/RESULTS.md`` also writes the generated
results page (command, machine, commit, table); ``--memory-plot`` a bar chart of memory per row.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from lowmem.bench.corpus import fixed_windows, load_corpus
from lowmem.bench.loop import RunConfig, train_one
from lowmem.bench.model import PRESETS
from lowmem.bench.optimizers import DEFAULT_OPTIMIZERS, REGISTRY, OptimizerSettings
from lowmem.bench.parallel import RunTask, run_in_workers
from lowmem.bench.progress import Progress
from lowmem.bench.report import (
    BASELINE,
    format_table,
    plot_curves,
    plot_memory,
    summarize,
    write_json,
    write_results_markdown,
)
from lowmem.bench.techniques import TECHNIQUES, parse_row, row_default_lr

#: Seed of the fixed validation windows: the same for every optimizer, seed and run.
VAL_WINDOW_SEED = 1234


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` subcommand's argument parser."""
    defaults = OptimizerSettings()
    p = argparse.ArgumentParser(
        prog="python -m lowmem.bench train",
        description="Train a small LLaMA on the Python standard library's source; compare optimizers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--optimizers",
        default=",".join(DEFAULT_OPTIMIZERS),
        help=f"comma list of rows: an optimizer ({', '.join(REGISTRY)}) optionally followed by "
        f"+TECHNIQUE ({', '.join(TECHNIQUES)}), e.g. adamw+sltrain, or 'all' (every optimizer); see --list",
    )
    p.add_argument("--list", action="store_true", help="print the optimizers and techniques, then exit")
    p.add_argument(
        "--model-variant",
        choices=["dense", "sltrain", "lowrank"],
        default="dense",
        help="convert the attention/MLP linears of every row (the same as appending +sltrain / +lowrank)",
    )
    p.add_argument(
        "--linear",
        choices=["fp32", "int8", "fp8"],
        default="fp32",
        help="low-precision attention/MLP linears in every row (the same as appending +int8 / +fp8)",
    )
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--model", choices=sorted(PRESETS), default="tiny", help="model size preset")
    p.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="number of paired seeds first-seed, first-seed+1, ... (same seed: same init and data)",
    )
    p.add_argument("--first-seed", type=int, default=0, help="first seed")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per window (model context)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate for every optimizer (default: each optimizer's tuned lr, "
        + ", ".join(f"{name} {entry.default_lr:g}" for name, entry in REGISTRY.items())
        + ")",
    )
    p.add_argument(
        "--lr-for",
        action="append",
        default=[],
        metavar="NAME=LR",
        help="per-row peak lr override, e.g. --lr-for galore=1e-2 or adamw+sltrain=3e-3 (repeatable)",
    )
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="decoupled weight decay")
    p.add_argument("--rank", type=int, default=defaults.rank, help="GaLore rank")
    p.add_argument(
        "--update-proj-gap",
        type=int,
        default=defaults.update_proj_gap,
        help="GaLore steps between projector refreshes",
    )
    p.add_argument("--scale", type=float, default=defaults.scale, help="GaLore update scale")
    p.add_argument(
        "--projector",
        choices=["svd", "randomized"],
        default=None,
        help="lowmem GaLore projector (default: the optimizer's own)",
    )
    p.add_argument(
        "--on-refresh",
        choices=["keep", "project", "reset"],
        default=None,
        help="lowmem GaLore moment handling at a refresh (default: the optimizer's own)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=int, default=_available_cpus(), help="torch CPU threads in all")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once, each in its own process with threads/jobs torch threads (default: "
        "min(2, threads) on CPU, 1 on CUDA; losses do not depend on it, times are taken side by side)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="validation every N steps for the curve (default steps/4; 0 = only at the end)",
    )
    p.add_argument("--val-windows", type=int, default=64, help="fixed validation windows")
    p.add_argument("--json", type=Path, default=Path("bench_results/train.json"), help="results file")
    p.add_argument(
        "--plot",
        default="bench_results/train.png",
        help="loss-curve PNG (needs matplotlib); empty string to skip",
    )
    p.add_argument(
        "--memory-plot",
        default="bench_results/train_memory.png",
        help="memory-per-row PNG (needs matplotlib); empty string to skip",
    )
    p.add_argument(
        "--results-md",
        type=Path,
        default=None,
        help="also write this generated results page (e.g. bench/RESULTS.md)",
    )
    p.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="progress bar on stderr (auto: only on a terminal)",
    )
    return p


def _list_rows() -> str:
    lines = ["optimizers:"]
    lines += [
        f"  {name:<14} {entry.description} (lr {entry.default_lr:g})" for name, entry in REGISTRY.items()
    ]
    lines.append("techniques (append to an optimizer with +):")
    lines += [f"  {name:<14} {t.description}" for name, t in TECHNIQUES.items()]
    lines.append(f"default rows: {','.join(DEFAULT_OPTIMIZERS)}")
    return "\n".join(lines)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _parse_lr_overrides(items: list[str], known: list[str]) -> dict[str, float]:
    overrides: dict[str, float] = {}
    for item in ",".join(items).split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in known:
            raise ValueError(f"--lr-for expects ROW=LR with ROW one of {', '.join(known)}; got {item!r}")
        overrides[name] = float(value)
    return overrides


def _git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def _environment(device: torch.device, threads: int) -> dict[str, Any]:
    import transformers

    import lowmem

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "lowmem": lowmem.__version__,
        "commit": _git_commit(),
        "device": str(device),
        "torch_threads": threads,
        "cpus_available": _available_cpus(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        from importlib.metadata import version

        env["galore_torch"] = version("galore-torch")
    except Exception:
        env["galore_torch"] = None
    return env


def main(argv: list[str] | None = None) -> int:
    """Run the training benchmark; returns a process exit code (0 on success, 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(_list_rows())
        return 0
    started = time.perf_counter()
    command = "python -m lowmem.bench train" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))

    requested = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if requested == ["all"]:
        requested = list(REGISTRY)
    if not requested:
        parser.error(f"--optimizers is empty; known optimizers: {', '.join(REGISTRY)}")
    suffix = "".join(f"+{v}" for v in (args.model_variant, args.linear) if v not in ("dense", "fp32"))
    requested = [row + suffix for row in requested]
    rows = {}
    for row in requested:
        try:
            rows[row] = parse_row(row, REGISTRY)
        except ValueError as error:
            parser.error(str(error))
    try:
        lr_overrides = _parse_lr_overrides(args.lr_for, list(dict.fromkeys([*REGISTRY, *requested])))
    except ValueError as error:
        parser.error(str(error))
    if min(args.steps, args.seeds, args.batch_size, args.seq_len, args.val_windows) < 1:
        parser.error("--steps, --seeds, --batch-size, --seq-len and --val-windows must be positive")

    skipped: dict[str, str] = {}
    names: list[str] = []
    for name in requested:
        optimizer_name, techniques = rows[name]
        reason = REGISTRY[optimizer_name].unavailable_reason()
        for technique in techniques:
            reason = reason or technique.unavailable_reason()
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
            print(f"note: skipping {name}: {reason}")
    if not names:
        print("error: none of the requested optimizers is available", file=sys.stderr)
        return 1

    device = torch.device(args.device)
    jobs = args.jobs if args.jobs is not None else (min(2, args.threads) if device.type == "cpu" else 1)
    if jobs < 1 or (jobs > 1 and device.type != "cpu"):
        parser.error(f"--jobs must be >= 1, and 1 on a {device.type} device (got {jobs})")
    if device.type == "cpu":
        torch.set_num_threads(args.threads if jobs == 1 else max(1, args.threads // jobs))
    threads = args.threads if device.type == "cpu" else torch.get_num_threads()
    eval_every = max(1, args.steps // 4) if args.eval_every is None else args.eval_every
    config = RunConfig(
        preset=PRESETS[args.model],
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        device=device,
        eval_every=eval_every,
        timing_warmup=min(5, args.steps // 5),
    )
    base_settings = OptimizerSettings(
        lr=args.lr if args.lr is not None else OptimizerSettings.lr,  # set per optimizer below
        weight_decay=args.weight_decay,
        rank=args.rank,
        update_proj_gap=args.update_proj_gap,
        scale=args.scale,
        projector=args.projector,
        on_refresh=args.on_refresh,
    )

    corpus = load_corpus()
    val_windows = fixed_windows(corpus.val, args.val_windows, args.seq_len + 1, seed=VAL_WINDOW_SEED)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    info = corpus.describe()
    print(
        f"corpus: {info['train_files']} train / {info['val_files']} val files of {info['root']} "
        f"({info['train_bytes'] / 1e6:.1f} / {info['val_bytes'] / 1e6:.1f} MB)"
    )
    print(
        f"model {args.model} {config.preset.to_dict()}, "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} bytes, "
        f"device {device} ({threads} threads, {jobs} job{'s' if jobs > 1 else ''}), "
        f"optimizers {', '.join(names)}, seeds {seeds}"
    )

    def default_lr(row: str) -> float:
        optimizer_name, techniques = rows[row]
        return row_default_lr(REGISTRY[optimizer_name].default_lr, techniques)

    peak_lrs = {
        name: lr_overrides.get(name, args.lr if args.lr is not None else default_lr(name)) for name in names
    }
    print("peak lr: " + ", ".join(f"{name} {lr:g}" for name, lr in peak_lrs.items()))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    enabled = {"auto": None, "on": True, "off": False}[args.progress]
    progress = Progress(len(names) * len(seeds), args.steps, enabled=enabled)

    def report(name: str, seed: int, result: dict[str, Any], seconds: float) -> None:
        print(
            f"  {name:>12} seed {seed}: val loss {result['val_loss']:.3f}, "
            f"train loss {result['train_loss']:.3f}, {seconds:.0f}s",
            flush=True,
        )

    # Seeds outer, optimizers inner: slow drifts of the machine hit every optimizer alike.
    order = [(seed, name) for seed in seeds for name in names]
    if jobs > 1:
        tasks = [
            RunTask(
                name,
                rows[name][0],
                tuple(t.name for t in rows[name][1]),
                replace(base_settings, lr=peak_lrs[name], seed=seed),
                config,
                seed,
                measure_peak=seed == seeds[0],
            )
            for seed, name in order
        ]
        finished = run_in_workers(
            tasks,
            jobs=jobs,
            threads_per_job=max(1, threads // jobs),
            val_windows=args.val_windows,
            window=args.seq_len + 1,
            val_seed=VAL_WINDOW_SEED,
            on_done=lambda task, result, seconds: report(task.row, task.seed, result, seconds),
        )
        for task, result in finished:
            runs[task.row].append(result)
    for seed, name in order if jobs == 1 else []:
        settings = replace(base_settings, lr=peak_lrs[name], seed=seed)
        run_started = time.perf_counter()
        optimizer_name, techniques = rows[name]
        progress.start_run(f"{name} seed {seed}")
        result = train_one(
            optimizer_name,
            settings,
            corpus,
            val_windows,
            config,
            seed,
            techniques=techniques,
            progress=progress.step if progress.enabled else None,
            measure_peak=seed == seeds[0],
        )
        progress.end_run(result["steps_run"])
        progress.clear()
        runs[name].append(result)
        report(name, seed, result, time.perf_counter() - run_started)

    baseline = runs.get(BASELINE)
    summaries = {name: summarize(name_runs, baseline) for name, name_runs in runs.items()}
    elapsed = time.perf_counter() - started
    print()
    print(format_table(summaries))
    print(
        f"\nval: {args.val_windows} fixed windows from held-out files; step ms = median wall time after "
        f"warm-up; peak = {summaries[names[0]]['peak_memory_method']}; total {elapsed:.0f}s"
    )

    payload = {
        "command": command,
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": {
                row: {"optimizer": o, "techniques": [t.name for t in ts]} for row, (o, ts) in rows.items()
            },
            "preset": config.preset.to_dict(),
            "eval_every": eval_every,
            "lr_overrides": lr_overrides,
            "peak_lrs": peak_lrs,
            "settings": {k: v for k, v in asdict(base_settings).items() if k != "seed"},
            "schedule": {
                "warmup_fraction": config.warmup_fraction,
                "min_lr_ratio": config.min_lr_ratio,
                "grad_clip": config.grad_clip,
            },
            "seeds": seeds,
        },
        "environment": {**_environment(device, threads), "jobs": jobs},
        "corpus": info,
        "skipped": skipped,
        "results": {name: {"summary": summaries[name], "runs": runs[name]} for name in names},
        "wall_time_s": elapsed,
    }
    write_json(args.json, payload)
    print(f"results: {args.json}")
    if args.plot:
        note = plot_curves(Path(args.plot), payload["results"])
        print(f"note: {note}" if note else f"plot: {args.plot}")
    if args.memory_plot:
        note = plot_memory(Path(args.memory_plot), summaries)
        print(f"note: {note}" if note else f"memory plot: {args.memory_plot}")
    if args.results_md is not None:
        write_results_markdown(args.results_md, payload, command)
        print(f"results page: {args.results_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
