"""The HF Trainer with lowmem optimizers under FSDP2: 2 gloo processes on CPU, launched like torchrun
would (hf_fsdp_worker.py), the model sharded at load time by transformers
(``from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))``), against one process on
the global batch.

Every case ends with parameters equal to the single-process run up to float32 round-off of a
differently ordered reduction (the gathered parameters hold each rank's own rows, so this checks
every rank's update), with the same logged losses, the same gradient norm logged on both ranks,
and half the optimizer state per rank. The layer-wise cases (updates inside backward, from the shards FSDP2
reduce-scattered) reproduce the step() run of the same arguments on the same ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: gloo_launch
from gloo_launch import launch
from hf_fsdp_worker import CASES, LAYERWISE, SYNC_EACH_BATCH, run_case

WORKER = Path(__file__).with_name("hf_fsdp_worker.py")
#: fp32 states: the same update on row blocks; the gradients are reduce-scattered instead of
#: computed on the whole batch, so they differ in the last bits (measured: params 3.5e-7, losses
#: 9e-8 relative).
PARAM_TOL = {"rtol": 1e-5, "atol": 2e-6}
#: 8-bit states: the 128x32 shards hold 16 whole blocks each, so the block scales are one process's;
#: a last-bit difference of the gradient can still round a moment to the next code (≈1/127 of its
#: block's absmax), moving that element's update by ≈ lr/127 ≈ 8e-5 a step, 4 steps → 3.2e-4
#: (measured: 5.4e-6).
PARAM_TOL_8BIT = {"rtol": 0.0, "atol": 5e-4}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(WORKER, tmp_path_factory.mktemp("hf_fsdp"), timeout=150)


@pytest.mark.parametrize("case", [case for case in CASES if case not in LAYERWISE])
def test_trainer_fsdp_matches_one_process_on_the_global_batch(ranks, tmp_path, case):
    rank0, rank1 = ranks[0][case], ranks[1][case]
    assert rank0["wrapped"] == rank1["wrapped"] == "FSDPLlamaForCausalLM"
    # Built after fully_shard, on the DTensors the model trains (the Trainer swapped nothing).
    assert rank0["built_on_dtensors"] and rank0["steps_model_params"]
    # Each rank logs the norm of the whole gradient (its rows' share all-reduced), so both agree.
    assert torch.equal(torch.as_tensor(rank0["grad_norm"]), torch.as_tensor(rank1["grad_norm"]))

    single = run_case(case, tmp_path, world_size=1)
    assert single["wrapped"] == "LlamaForCausalLM" and not single["built_on_dtensors"]
    # target_modules matched the same weights by name in the sharded model.
    assert rank0["lowrank"] == single["lowrank"]
    assert bool(single["lowrank"]) == (CASES[case][0] != "adamw8bit")
    # The losses are each rank's mean, averaged by the Trainer's logging over the ranks.
    torch.testing.assert_close(rank0["loss"], single["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rank0["grad_norm"], single["grad_norm"], rtol=1e-5, atol=0)
    tolerance = PARAM_TOL_8BIT if "8bit" in case else PARAM_TOL
    for name, param in single["params"].items():
        torch.testing.assert_close(rank0["params"][name], param, **tolerance, msg=f"{case}: {name}")
    assert rank0["params"].keys() == single["params"].keys()
    # Each rank keeps the states of its rows (and its columns of the basis): half, plus counters.
    for rank in (rank0, rank1):
        assert 0.45 * single["state_bytes"] <= rank["state_bytes"] <= 0.51 * single["state_bytes"]


def test_lowmem_state_survives_transformers_dcp_helpers(ranks):
    """The Trainer refuses to checkpoint the optimizer of a model sharded at load time; the state of a
    trained GaLoreAdamW goes through transformers' DCP save/load helpers into a fresh optimizer."""
    for rank in ranks:
        checkpoint = rank["checkpoint"]
        assert "save_only_model=True" in checkpoint["refusal"]
        assert checkpoint["compared"] > 0 and checkpoint["state_equal"]


@pytest.mark.parametrize("case", list(LAYERWISE))
def test_trainer_fsdp_layerwise_matches_step_and_updates_in_backward(ranks, case):
    """Layer-wise GaLore on the model sharded at load time: FSDP2 runs the update hooks after its
    reduce-scatter. The Trainer defers that to the last micro-batch of an update, so the optimizer
    takes accumulation_steps=1; with sync_each_batch it reduce-scatters every micro-batch and the
    optimizer counts them (gradient_accumulation_steps). Either must reproduce the step() run of
    the same arguments, and update inside the last backward."""
    reference = LAYERWISE[case]
    accumulation = CASES[case][1]
    each_batch = case in SYNC_EACH_BATCH
    for rank in ranks:
        run, step_run = rank[case], rank[reference]
        assert run["wrapped"] == "FSDPLlamaForCausalLM" and run["built_on_dtensors"]
        assert run["accumulation_steps"] == (accumulation if each_batch else 1) and not run["ddp_hook"]
        # Updated inside the last backward of each update: what moved in the update had moved before
        # optimizer.step(), with every gradient consumed; nothing moved after an earlier micro-batch
        # (without gradient sync: no gradient either). The first update moves nothing: its learning
        # rate is 0 (warmup_steps=1).
        events = {e: [r[1:] for r in run["timing"] if r[0] == e] for e in ("substep", "pre_step", "end")}
        assert [moved for moved, _ in events["end"]] == [0] + [run["parameters"]] * 3
        assert events["pre_step"] == [(moved, 0) for moved, _ in events["end"]]
        assert [moved for moved, _ in events["substep"]] == [0] * (4 * (accumulation - 1))
        if not each_batch:
            assert [grads for _, grads in events["substep"]] == [0] * (4 * (accumulation - 1))
        # step() on the same run: the gradients exist and nothing has moved before optimizer.step().
        step_events = {e: [r[1:] for r in step_run["timing"] if r[0] == e] for e in ("pre_step", "end")}
        assert step_events["pre_step"] == [(0, step_run["parameters"])] * 4
        assert step_events["end"] == events["end"]
        torch.testing.assert_close(run["loss"], step_run["loss"], rtol=1e-5, atol=1e-6)
        # The norm of the whole gradient (the ranks' sums of squares all-reduced), as step() logs.
        # Accumulating in the optimizer, GaLore sums a projected weight's micro-batches in its basis
        # between refreshes (updates 1 and 3, update_proj_gap=2): the norm of the projected sum then
        # stands in for that weight's (hf.py, "Gradient norm"), a lower bound.
        if each_batch:
            torch.testing.assert_close(run["grad_norm"][::2], step_run["grad_norm"][::2], rtol=1e-5, atol=0)
            assert (run["grad_norm"][1::2] < step_run["grad_norm"][1::2]).all()
        else:
            torch.testing.assert_close(run["grad_norm"], step_run["grad_norm"], rtol=1e-5, atol=0)
        for name, param in step_run["params"].items():
            torch.testing.assert_close(run["params"][name], param, **PARAM_TOL, msg=f"{case}: {name}")
        assert run["state_bytes"] == step_run["state_bytes"]
    # Each rank logs the norm of the whole gradient (its rows' share all-reduced), so both agree.
    assert torch.equal(
        torch.as_tensor(ranks[0][case]["grad_norm"]), torch.as_tensor(ranks[1][case]["grad_norm"])
    )


def test_layerwise_on_a_model_sharded_by_hand_is_refused(ranks):
    for rank in ranks:
        message = rank["hand_sharded_layerwise_error"]
        assert "sharded at load time" in message and "DistributedConfig(fsdp_size=world_size)" in message


def test_accelerate_fsdp_on_cpu_is_refused_not_silently_ddp(ranks):
    for rank in ranks:
        message = rank["accelerate_fsdp_error"]
        assert "fsdp=True" in message and "DistributedConfig(fsdp_size=world_size)" in message
