"""The low-precision linear benchmark runs end to end on CPU at a tiny shape: every row is
timed, ratios refer to the dense row of the same run, the SQNR column reports the numerics, and
the bench-model conversion helper swaps the linears it should."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowmem
from lowmem.bench import lowp_linear
from lowmem.nn import LowPrecisionLinear


def test_cpu_run_prints_every_row_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lowp.json"
    argv = ["--device", "cpu", "--tokens", "40", "--in-features", "48", "--out-features", "24"]
    assert lowp_linear.main([*argv, "--budget-s", "0.05", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "emulated" in text  # the CPU run says its int8/fp8 are emulations
    rows = json.loads(out.read_text())["rows"]
    layer_rows = [(r["name"], r["what"]) for r in rows if r["what"].startswith("layer")]
    whats = ("layer fwd", "layer fwd+bwd")
    assert layer_rows == [(name, what) for name in lowp_linear.LAYERS for what in whats]
    assert {r["name"] for r in rows if r["what"] == "gemm"} == {"mm", "int8_matmul"}  # no fp8 GEMM row on CPU
    quantizers = {r["name"]: r for r in rows if r["what"] == "quantize"}
    assert set(quantizers) == {
        "quantize_int8 (x, per row)",
        "quantize_fp8 (x, tensor)",
        "quantize_fp8 (x, per row)",
    }
    assert all(r["gbs"] > 0 for r in quantizers.values())
    for r in rows:
        assert r["median_ms"] > 0
        if r["name"] == "dense":
            assert r["speedup"] == 1.0
        if r["name"].startswith("int8") and r["what"].startswith("layer"):
            assert r["sqnr_db"] >= 30.0
        if r["name"].startswith("fp8"):
            assert 20.0 <= r["sqnr_db"] < 40.0
    assert all(r["peak_tops"] is None for r in rows)  # no peaks on CPU


def test_mixed_peak_of_a_gemm_mix() -> None:
    peaks = {"bf16": 1000.0, "int8": 2000.0}
    # Two GEMMs at 2000 and one at 1000 TOPS: 3 units of work in 0.5 + 0.5 + 1 time units.
    assert lowp_linear.mixed_peak(10**12, ("int8", "int8", "bf16"), peaks) == pytest.approx(1500.0)
    assert lowp_linear.mixed_peak(10**12, ("fp8",), peaks) is None


def test_convert_bench_model() -> None:
    model = nn.ModuleDict({"mlp": nn.Linear(8, 8), "lm_head": nn.Linear(8, 16)})
    assert lowp_linear.convert_bench_model(model, "dense") is None
    assert type(model["mlp"]) is nn.Linear
    report = lowp_linear.convert_bench_model(model, "int8")
    assert report is not None and report.converted == ["mlp"]
    assert isinstance(model["mlp"], LowPrecisionLinear) and type(model["lm_head"]) is nn.Linear
    assert model["mlp"](torch.randn(2, 8)).shape == (2, 8)


def test_fp8_layer_backend_label_names_a_forced_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an fp8 GPU the layer rows name the GEMM backend that runs; a forced ``ref`` must say
    so (the emulation), not claim the Triton kernel."""
    monkeypatch.setattr(lowp_linear, "fp8_supported", lambda device: True)
    with lowmem.backend("ref"):
        assert lowp_linear._layer_backend("fp8-tensor", torch.device("cuda")) == "ref"


def test_a_rejected_gemm_is_reported_and_the_run_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """cuBLASLt may reject a shape or scale layout (RuntimeError): the row says so, the rest run."""
    timed = lowp_linear.median_ms

    def median_ms(fn, device, **timing):  # the first GEMM row timed (the dense "mm") is rejected
        if not calls and sys._getframe(1).f_code.co_name == "_gemm_rows":
            calls.append(fn)
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul\nmore")
        return timed(fn, device, **timing)

    calls: list = []
    monkeypatch.setattr(lowp_linear, "median_ms", median_ms)
    argv = ["--device", "cpu", "--tokens", "8", "--in-features", "16", "--out-features", "8"]
    assert lowp_linear.main([*argv, "--budget-s", "0.02"]) == 0
    text = capsys.readouterr().out
    assert "mm: rejected (CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul)" in text
    assert "int8_matmul" in text  # the next GEMM row still ran
