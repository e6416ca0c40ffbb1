"""Run the training benchmark's (row, seed) runs in worker processes: ``train --jobs N``.

The default model is small enough that one process cannot keep two CPU cores busy (its GEMMs
are a few hundred KB; a second torch thread mostly waits at barriers), so on a CPU the harness
runs ``jobs`` runs at once, each in its own process with ``threads // jobs`` torch threads.
Every run is still fully determined by its seed (initial weights, batches, projector RNG), so
losses are identical to a sequential run; the time columns are measured with the other job
running beside it (both jobs see the same machine, so ratios within one run stay comparable;
use ``--jobs 1`` for undisturbed absolute times).

Workers are started with ``spawn`` (forking a process that already ran OpenMP regions can hang
in the child) and load the corpus once each.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lowmem.bench.loop import RunConfig, train_one
from lowmem.bench.optimizers import OptimizerSettings


@dataclass(frozen=True)
class RunTask:
    """One run: a row (optimizer + technique names) at one seed. Picklable."""

    row: str
    optimizer: str
    techniques: tuple[str, ...]
    settings: OptimizerSettings
    config: RunConfig
    seed: int
    measure_peak: bool


@dataclass(frozen=True)
class _WorkerSetup:
    threads: int
    val_windows: int
    window: int
    val_seed: int


_STATE: dict[str, Any] = {}


def _init_worker(setup: _WorkerSetup) -> None:
    from lowmem.bench.corpus import fixed_windows, load_corpus

    torch.set_num_threads(setup.threads)
    corpus = load_corpus()
    _STATE["corpus"] = corpus
    _STATE["val"] = fixed_windows(corpus.val, setup.val_windows, setup.window, seed=setup.val_seed)


def _run(task: RunTask) -> tuple[dict[str, Any], float]:
    from lowmem.bench.techniques import TECHNIQUES

    started = time.perf_counter()
    result = train_one(
        task.optimizer,
        task.settings,
        _STATE["corpus"],
        _STATE["val"],
        task.config,
        task.seed,
        log=lambda line: None,
        techniques=tuple(TECHNIQUES[name] for name in task.techniques),
        measure_peak=task.measure_peak,
    )
    return result, time.perf_counter() - started


def run_in_workers(
    tasks: list[RunTask],
    *,
    jobs: int,
    threads_per_job: int,
    val_windows: int,
    window: int,
    val_seed: int,
    on_done: Callable[[RunTask, dict[str, Any], float], None],
) -> list[tuple[RunTask, dict[str, Any]]]:
    """Run ``tasks`` on ``jobs`` worker processes; return ``(task, result)`` in submission order.

    ``on_done(task, result, seconds)`` is called as each run finishes (in completion order; the
    seconds are the run's own), for the harness's one line per run. A failing run raises here.
    """
    setup = _WorkerSetup(threads_per_job, val_windows, window, val_seed)
    context = multiprocessing.get_context("spawn")
    results: dict[int, dict[str, Any]] = {}
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(setup,)
    ) as pool:
        futures = {pool.submit(_run, task): index for index, task in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            results[index], seconds = future.result()
            on_done(tasks[index], results[index], seconds)
    return [(task, results[index]) for index, task in enumerate(tasks)]
