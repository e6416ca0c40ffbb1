"""bench/hf_example.py, the newcomer's script, runs end to end and trains: in one process, and as
the FSDP2 recipe under torchrun (2 gloo processes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from lowmem.bench import hf_example

#: A short run: 4 updates of 2 micro-batches of 2 windows of 32 bytes (per rank under --fsdp).
SHORT = ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--rank", "8"]


def test_example_trains_and_saves_state_memory(capsys):
    result = hf_example.main(["--steps", "8", "--batch-size", "4", "--seq-len", "32", "--rank", "8"])
    losses = result["losses"]
    assert losses[max(losses)] < losses[min(losses)] - 0.5  # bytes are far from uniform: fast early drop
    # GaLore keeps rank-8 moments for the projected 64-wide weights: less state than AdamW's
    assert 0 < result["state_bytes"] < result["adamw_bytes"]
    out = capsys.readouterr().out
    assert "galore_adamw (layer-wise)" in out and "optimizer state" in out


def test_example_fsdp_under_torchrun_shards_the_optimizer_state():
    """``torchrun --nproc_per_node 2 -m lowmem.bench.hf_example --fsdp``: rank 0 saves the model, both
    ranks load it sharded (DistributedConfig(fsdp_size=2)) and train it with layer-wise GaLore; each
    keeps half of the optimizer state one process keeps for the same model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform == "linux":  # loopback: no dependence on how the host name resolves
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "lowmem.bench.hf_example", "--fsdp", *SHORT]
    # subprocess.run kills the launcher on timeout; torchrun's own handler then stops its workers.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "galore_adamw (layer-wise)" in output and "2 ranks x 2 x 2 x 32 bytes (FSDP2, gloo)" in output

    state = {int(r): int(b) for r, b in re.findall(r"rank (\d): optimizer state (\d+) bytes", output)}
    assert set(state) == {0, 1} and state[0] == state[1], output[-4000:]
    single = hf_example.main(SHORT)["state_bytes"]  # the same model and optimizer in one process
    assert 0.45 * single <= state[0] <= 0.51 * single, (state, single)

    losses = re.search(r"loss ([\d.]+) -> ([\d.]+)", output)
    assert losses and float(losses[2]) < float(losses[1]) - 0.3, output[-4000:]
