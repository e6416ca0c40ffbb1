"""The torchrun recipe (``lowmem.bench.fsdp_example``) runs as documented: 2 processes, gloo, DCP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_torchrun_recipe_trains_and_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform == "linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "lowmem.bench.fsdp_example", "--steps", "4", "--checkpoint", str(tmp_path / "ckpt")]
    # subprocess.run kills the launcher on timeout; torchrun's own handler then stops its workers.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    state = {
        int(rank): int(size) for rank, size in re.findall(r"rank (\d): optimizer state (\d+) bytes", output)
    }
    assert set(state) == {0, 1} and state[0] == state[1] > 0, output[-4000:]
    losses = re.search(r"fsdp: loss ([\d.]+) -> ([\d.]+)", output)
    assert losses and float(losses[2]) < float(losses[1]), output[-4000:]
    assert output.count("resumed run identical to uninterrupted: True") == 2, output[-4000:]
