"""DistributedDataParallel with every lowmem optimizer and layer: 2 gloo ranks on CPU.

One launch (:mod:`ddp_worker`) trains every case; each rank must end with exactly the other's
parameters, and with exactly what one process computes from the same gradients (DDP's
(g₀/2) + (g₁/2), formed in one process), and within rounding of one process on the whole
global batch. Refreshes of the projector fall at updates 1 and 3, so they are covered.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import CASES, train
from gloo_launch import launch

#: Tolerance against the global-batch run: the two halves' gradients are summed in another
#: order than the whole batch's, a difference of a few ulps of the gradient that Adam's
#: normalization carries into the update at most at the same relative size. fp64 cases: 1e-12;
#: fp32 cases: 1e-5. 8-bit states round the moments to 256 levels per block, so a gradient
#: differing by an ulp can move a moment across a code boundary: the bound is then lr times the
#: relative code spacing (≈ 2e-2 near the top of the map) → 2e-4 (lr = 1e-2).
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}
ATOL_8BIT = 2e-4


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    return launch(Path(__file__).with_name("ddp_worker.py"), tmp, timeout=120)


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_matches_one_process(ddp_results: list[dict], name: str) -> None:
    rank0, rank1 = ddp_results[0][name], ddp_results[1][name]
    same_arithmetic = train(name, "shards")
    whole_batch = train(name, "global")
    dtype = CASES[name][1]
    atol = ATOL_8BIT if "8bit" in name else ATOL[dtype]
    initial = dict(train.__globals__["build"](name)[0].named_parameters())
    for key, value in rank0.items():
        assert value.dtype == dtype
        assert torch.equal(value, rank1[key]), f"{name} {key}: the ranks differ"
        assert torch.equal(value, same_arithmetic[key]), f"{name} {key}: DDP differs from one process"
        torch.testing.assert_close(value, whole_batch[key], rtol=0, atol=atol, msg=f"{name} {key}")
        assert not torch.equal(value, initial[key].detach()), f"{name} {key} never moved"
