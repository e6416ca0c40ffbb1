"""The HF Trainer with lowmem optimizers under data parallel: 2 gloo processes on CPU, launched like
torchrun would (hf_ddp_worker.py), against one process on the global batch.

Every case ends with identical parameters on both ranks, equal (to float32 round-off of a
differently ordered reduction) to the single-process run, with the same logged losses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gloo_launch
from gloo_launch import launch
from hf_ddp_worker import CASES, run_case

WORKER = Path(__file__).with_name("hf_ddp_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(WORKER, tmp_path_factory.mktemp("hf_ddp"), timeout=120)


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_ddp_matches_one_process_on_the_global_batch(ranks, tmp_path, case):
    rank0, rank1 = ranks[0][case], ranks[1][case]
    assert rank0["wrapped"] == rank1["wrapped"] == "DistributedDataParallel"
    layerwise = CASES[case][0].endswith("_layerwise")
    assert rank0["comm_hook"] == rank1["comm_hook"] == layerwise
    for name, param in rank0["params"].items():
        assert torch.equal(param, rank1["params"][name]), f"{case}: {name} differs between the ranks"

    single = run_case(case, tmp_path, world_size=1)
    assert single["wrapped"] != "DistributedDataParallel"
    # The losses are each rank's mean, averaged by the Trainer's logging over the ranks.
    torch.testing.assert_close(rank0["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    if layerwise and CASES[case][1] == 1:
        # The norm of the averaged gradients the comm hook consumed: the single process's norm.
        # (With accumulation, one process sums GaLore's gradients in the low-rank basis and logs a
        # lower bound, while DDP's no_sync sums full ones; see lowmem.hf.)
        torch.testing.assert_close(rank0["grad_norm"], single["grad_norm"], rtol=1e-5, atol=0)
        assert bool((rank0["grad_norm"] > 0).all())
    moved = 0
    for name, param in single["params"].items():
        torch.testing.assert_close(rank0["params"][name], param, rtol=1e-5, atol=2e-6, msg=f"{case}: {name}")
        moved += 1
    assert moved == len(rank0["params"])


def test_layerwise_ddp_needs_find_unused_parameters_false(ranks):
    for rank in ranks:
        assert "ddp_find_unused_parameters=False" in rank["unused_parameters_error"]


def test_layerwise_ddp_refuses_sync_each_batch(ranks):
    """sync_each_batch would run DDP's comm hook, and so an update, after every micro-batch."""
    for rank in ranks:
        assert "sync_each_batch" in rank["sync_each_batch_error"]
