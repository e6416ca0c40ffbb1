"""FSDP2 (``fully_shard``) with lowmem optimizers and layers: 2 gloo ranks on CPU, one launch.

See :mod:`lowmem.optim.sharded` for the semantics under test: each rank updates its own rows,
projected weights are projected on the unsharded side with one basis computed from the gathered
gradient at a refresh, 8-bit blocks are per shard, DCP checkpoints resume bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import HIDDEN, IN, STEPS
from fsdp_worker import EXACT_CASES, apollo_nan_refresh, train_exact_reference
from gloo_launch import launch

from lowmem.bench.fsdp_example import Config
from lowmem.kernels.blockwise_quant import num_blocks

#: Against one process on the same gradients: the same math on row blocks, but BLAS may sum a
#: product of another row count in another order (measured: <= 1.4e-16 in fp64, 0 in fp32).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6}
#: 8-bit states: blocks are per shard (a rank's 8×2 moment is one block, one process's 16×2 is
#: another), so the block scales, hence the rounding of every moment, differ from one process's
#: by design: up to one code step (≈ 1/127 of a block's absmax) per moment, which moves an
#: update by ≈ lr·1e-2 per step; 4 steps at lr 1e-2 → 2e-3 (measured: 1.1e-3).
ATOL_8BIT = 2e-3


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("fsdp")
    return launch(Path(__file__).with_name("fsdp_worker.py"), tmp, timeout=180)


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_fsdp_matches_one_process(fsdp_results: list[dict], name: str) -> None:
    rank0, rank1 = (r["exact"][name] for r in fsdp_results)
    expected = train_exact_reference(name)
    dtype = EXACT_CASES[name][1]
    atol = ATOL_8BIT if "8bit" in name else ATOL[dtype]
    # A gathered parameter holds each rank's own rows, so it cannot show the ranks disagreeing;
    # the state they all hold whole can (checked first: the more specific diagnosis).
    assert rank0["replicated"].keys() == rank1["replicated"].keys()
    for key, value in rank0["replicated"].items():
        assert torch.equal(value, rank1["replicated"][key]), (
            f"{name} {key}: the ranks' column statistics differ"
        )
    if "adafactor" in name and "conv" not in name:
        assert rank0["replicated"], f"{name}: no column statistics recorded"
    # Comparing the gathered parameters with one process checks every rank's own update.
    for key, value in rank0["params"].items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=atol, msg=f"{name} {key}")
    assert rank0["windows"] == rank1["windows"], f"{name}: the ranks' updates ran at different moments"
    if EXACT_CASES[name][4].get("layerwise"):
        assert len(rank0["windows"]) == STEPS
        for step, window in enumerate(rank0["windows"]):
            assert not window["moved_early"], f"{name} update {step + 1}: a parameter moved mid-window"
            assert window["in_backward"], (
                f"{name} update {step + 1}: not updated (or .grad kept) before step()"
            )
    if "8bit" in name:
        assert rank0["blocks"], "no 8-bit state was created"
        for key, (codes, scales) in {**rank0["blocks"], **rank1["blocks"]}.items():
            assert scales == num_blocks(codes), f"{key}: {scales} block scales for {codes} local codes"


def test_fsdp_llama_memory_and_loss_against_ddp(fsdp_results: list[dict]) -> None:
    """GaLoreAdamW on the micro LLaMA, 50 steps: state per rank <= 55% of DDP's (= one process's),
    held-out and final training loss within 1% of the DDP run on the same global batches."""
    for result in fsdp_results:
        fsdp, ddp = result["llama_fsdp"], result["llama_ddp"]
        assert len(fsdp["losses"]) == Config.steps
        assert fsdp["state_bytes"] <= 0.55 * ddp["state_bytes"], (fsdp["state_bytes"], ddp["state_bytes"])
        assert fsdp["losses"][-1] < 0.8 * fsdp["losses"][0], "the model did not train"
        assert abs(fsdp["heldout"] - ddp["heldout"]) <= 0.01 * ddp["heldout"]
        assert abs(fsdp["losses"][-1] - ddp["losses"][-1]) <= 0.01 * ddp["losses"][-1]
    assert fsdp_results[0]["llama_fsdp"]["losses"] == fsdp_results[1]["llama_fsdp"]["losses"]


def test_fsdp_dcp_checkpoint_resumes_bit_for_bit(fsdp_results: list[dict]) -> None:
    """Saved with torch.distributed.checkpoint midway, loaded into a model and optimizer built
    from other weights, the run ends exactly where the uninterrupted one does (a refresh lies
    after the checkpoint), parameters and every optimizer-state tensor."""
    for result in fsdp_results:
        uninterrupted, resumed = result["resume"]["uninterrupted"], result["resume"]["resumed"]
        assert uninterrupted.keys() == resumed.keys()
        assert any(key.endswith("/proj_right") for key in resumed), "no projected weight in the run"
        for key, value in uninterrupted.items():
            assert torch.equal(value, resumed[key]), key


def test_fsdp_layerwise_holds_one_layers_gradient(fsdp_results: list[dict]) -> None:
    """Layer-wise under FSDP2 frees each layer's sharded gradient in its hook: the peak is the
    largest layer's reduce-scatter output, where step() holds every layer's until step()."""
    for result in fsdp_results:
        step, layerwise = result["grad_memory"]["step"], result["grad_memory"]["layerwise"]
        storages = step["after_backward"][0]
        assert len(storages) == 4, storages  # one reduce-scatter output per sharded layer
        assert step["peak"] == sum(storages)
        assert layerwise["peak"] == max(storages)
        assert layerwise["after_backward"] == [[], []], "layer-wise left gradients behind"


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("proj_left", "proj_type"),
        ("layerwise_process_group", "process_group"),
        ("layerwise_plain_param", "local gradient"),
    ],
)
def test_fsdp_unsupported_combinations_raise_clearly(
    fsdp_results: list[dict], case: str, needle: str
) -> None:
    message = fsdp_results[0]["refusals"][case]
    assert message != "no error", case
    assert needle in message and "use" in message, message


def test_fsdp_layerwise_refusal_mid_backward_leaves_no_open_backward(fsdp_results: list[dict]) -> None:
    """A plain parameter's local gradient refused after FSDP2 ran a sharded layer's hooks in the same
    backward: that backward counts as micro-batch 1 of 2 and is closed (not open for the next one)."""
    for result in fsdp_results:
        case = result["refusal_closes_the_backward"]
        assert "local gradient" in case["error"], case["error"]
        assert (case["position"], case["open"]) == (0, False), case


#: APOLLO with random projections: a refresh reads the gradient only for its finiteness (one
#: all-reduced scalar), so nothing is gathered whole. The others gather the m×n gradient at a refresh.
GATHER_FREE = ("apollo", "apollo_mini", "layerwise_apollo")
GATHERING = ("galore", "apollo_svd", "fira", "layerwise_galore_k2_sched")


@pytest.mark.parametrize("name", GATHER_FREE + GATHERING)
def test_fsdp_apollo_random_refresh_gathers_no_gradient(fsdp_results: list[dict], name: str) -> None:
    for result in fsdp_results:
        gathers = result["exact"][name]["gathers"]
        if name in GATHER_FREE:
            assert gathers == [], f"{name} gathered {gathers}"
        else:  # the recording sees the m×n gradient gather of layer1's weight at a refresh
            assert (HIDDEN, IN) in gathers, f"{name} gathered {gathers}"


def test_fsdp_apollo_nan_in_one_ranks_rows_postpones_every_ranks_refresh(fsdp_results: list[dict]) -> None:
    """A NaN in rank 0's rows of layer1's gradient at a refresh: both ranks postpone layer1's refresh
    (the all-reduced finiteness), layer2 refreshes, exactly as one process decides; nothing gathered."""
    expected = apollo_nan_refresh()
    assert expected["last_refresh"] == {"layer1.weight": 1, "layer2.weight": 3}, expected
    for result in fsdp_results:
        sharded = result["apollo_nan_refresh"]
        assert sharded["last_refresh"] == expected["last_refresh"]
        assert sharded["proj_seed"] == expected["proj_seed"]
        assert sharded["gathers"] == []
