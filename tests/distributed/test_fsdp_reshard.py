"""Resuming an FSDP2 run at another world size: DCP checkpoints of 2 gloo ranks loaded on 1 and of 1
rank loaded on 2 (reshard_worker.py), against the uninterrupted 1-rank run.

``torch.distributed.checkpoint`` reshards DTensors on load, and lowmem's ``state_dict`` holds the
state of sharded parameters as DTensors (moments ``Shard(0)``, the projection basis ``Shard(1)``;
lowmem.optim.sharded), so fp32/fp64 states resume at any world size. 8-bit states are quantized in
blocks of each rank's own rows, so their block scales describe one world size's layout only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gloo_launch import launch
from reshard_worker import CASES

#: fp64: the same arithmetic on row blocks of another size; BLAS sums products of other row counts
#: in another order (measured: <= 7.1e-16 after 6 steps).
ATOL = 1e-12


@pytest.fixture(scope="module")
def reshard_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    worker = Path(__file__).with_name("reshard_worker.py")
    return launch(worker, tmp_path_factory.mktemp("reshard"), timeout=150)


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
@pytest.mark.parametrize("name", list(CASES))
def test_resume_at_another_world_size_continues_the_run(reshard_results, name, direction):
    reference = reshard_results[0]["reference"][name]
    for rank in reshard_results if direction == "1to2" else reshard_results[:1]:
        resumed = rank[direction][name]
        assert "error" not in resumed, resumed.get("error")
        for key, value in reference["params"].items():
            torch.testing.assert_close(resumed["params"][key], value, rtol=0, atol=ATOL, msg=f"{name} {key}")
        torch.testing.assert_close(
            torch.tensor(resumed["losses"]), torch.tensor(reference["losses"][-len(resumed["losses"]) :])
        )


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
def test_8bit_states_at_another_world_size_fail_naming_the_block_scales(reshard_results, direction):
    """The micro LLaMA's 64-wide norm weights have 1 block of scales on 1 rank and 1 per rank on 2:
    DCP refuses the checkpoint, naming the block scales (``exp_avg_absmax``) whose size differs."""
    for rank in reshard_results if direction == "1to2" else reshard_results[:1]:
        error = rank[direction]["galore8bit"].get("error", "")
        assert "Size mismatch" in error and "_absmax" in error, error or "loaded without an error"


def test_8bit_states_with_block_scales_of_equal_size_are_not_loaded_silently(reshard_results):
    """A 400-vector has 2 block scales on 1 rank (blocks 0-255, 256-399) and 2 on 2 ranks (0-199,
    200-399): saved flat, one layout would load into the other without an error and dequantize
    elements 200-255 with the wrong scale (34% off, measured). optim/sharded.py saves the scales as a
    (world size, blocks) DTensor, so DCP refuses it, naming the scales."""
    saved = reshard_results[0]["vector_saved"]["exp_avg"]
    loaded = reshard_results[0]["vector_loaded"]
    if "error" in loaded:
        assert "_absmax" in loaded["error"], loaded["error"]
    else:  # loaded: only an exact reshard of the moments would be acceptable
        torch.testing.assert_close(loaded["exp_avg"], saved, rtol=0, atol=0)


def test_8bit_full_state_dict_of_another_world_size_is_refused(reshard_results):
    """``set_optimizer_state_dict(full_state_dict=True)`` has no size check: it reshards the 2 ranks'
    (2, blocks) scales onto 1 rank, where reading the first scales would dequantize with the wrong
    ones (28% off, measured); ``load_state_dict`` refuses it, naming the scales and both sizes."""
    error = reshard_results[0]["vector_full_loaded"].get("error", "loaded without an error")
    assert error.startswith("ValueError") and "exp_avg_absmax" in error, error
    assert "scales of 2 ranks' rows, but this mesh has 1 ranks" in error, error
