"""Two-process gloo launches for the data-parallel tests (tests/optim, tests/distributed).

A test calls :func:`launch` with a worker script; the worker, run as
``python WORKER RANK WORLD_SIZE INIT_FILE OUT_DIR``, joins the group with :func:`gloo_group`
(a file store: no port to pick, nothing to collide with) and saves its results to
``OUT_DIR/rank{RANK}.pt``. The launch is bounded in time and kills the workers on any failure.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch


def launch(worker: Path, tmp_path: Path, timeout: float, world_size: int = 2) -> list[Any]:
    """Run ``world_size`` ranks of ``worker``, kill them on failure, load their results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    if sys.platform == "linux":  # loopback: no dependence on how the host name resolves
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), str(world_size), str(tmp_path / "store"), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    outputs: list[str] = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out.decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank] if rank < len(outputs) else ''}"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, init_file: str, timeout_s: float = 60) -> Iterator[None]:
    """A gloo process group joined through a file store, destroyed on exit (one thread per rank)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
