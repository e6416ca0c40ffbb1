"""The micro-benchmark runs end to end on CPU and reports consistent cost models."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

import lowmem._ops
from lowmem.bench import micro
from lowmem.kernels.adamw8bit import adamw8bit_flops


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    path = tmp_path_factory.mktemp("micro") / "micro.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = micro.main(["--device", "cpu", "--sizes", "small", "--iters", "3", "--json", str(path)])
    assert rc == 0
    return json.loads(Path(path).read_text()), buf.getvalue()


def test_rows_cover_every_op_with_baseline(report: tuple[dict, str]) -> None:
    data, _ = report
    ops = [r["op"] for r in data["rows"]]
    expected = ["adamw", "adam_direction", "adamw8bit", *(f"lowrank_update/{o}" for o in micro.ORIENTATIONS)]
    assert sorted(set(ops)) == sorted(expected)
    for op in expected:
        backends = [r["backend"] for r in data["rows"] if r["op"] == op]
        assert backends[0] == "unfused" and len(backends) == 2
        # CPU without an override: what dispatch chooses (torch's fused kernel for adam_direction).
        assert backends[1] == lowmem._ops.choose_backend(op.split("/")[0], "cpu", torch.float32)
    assert data["meta"]["device"] == "cpu"


def test_timings_and_rates_are_positive_and_consistent(report: tuple[dict, str]) -> None:
    data, _ = report
    by_op: dict[str, list[dict]] = {}
    for row in data["rows"]:
        by_op.setdefault(row["op"], []).append(row)
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
        assert row["gbs"] == pytest.approx(row["bytes"] / (row["median_ms"] * 1e-3) / 1e9)
        assert row["tflops"] == pytest.approx(row["flops"] / (row["median_ms"] * 1e-3) / 1e12)
        assert row["peak_gbs"] is None and row["peak_tflops"] is None  # no peaks known for a CPU
    for base, fused in by_op.values():
        assert base["speedup"] == 1.0
        assert fused["speedup"] == pytest.approx(base["median_ms"] / fused["median_ms"])


def test_cost_models_follow_the_formulas(report: tuple[dict, str]) -> None:
    data, _ = report
    numel, (m, n, r) = micro.SIZES["small"]["cpu"]
    item = 4  # float32
    for row in data["rows"]:
        if row["op"] == "adamw":
            assert row["shape"] == f"N={numel}"
            assert row["bytes"] == 7 * numel * item  # read p, g, m, v; write p, m, v
            assert row["flops"] == 15 * numel
        elif row["op"] == "adamw8bit":
            # read+write p and both uint8 codes, read g; read+write two fp32 absmax per block
            assert row["bytes"] == numel * (3 * item + 4) + math.ceil(numel / 256) * 16
            assert row["flops"] == adamw8bit_flops(numel)
        elif row["op"] == "adam_direction":
            assert row["bytes"] == 6 * numel * item  # read g, m, v; write m, v, out
            assert row["flops"] == 12 * numel
        else:
            assert row["shape"] == f"{m}x{n} r={r}"
            assert row["bytes"] == (2 * m * n + m * r + r * n) * item  # read+write W, read a, b
            assert row["flops"] == 2 * m * n * r + 3 * m * n


def test_table_is_printed(report: tuple[dict, str]) -> None:
    _, out = report
    header = out.splitlines()[1]
    for column in (
        "op",
        "shape",
        "dtype",
        "backend",
        "median ms",
        "bytes",
        "FLOPs",
        "GB/s",
        "TFLOP/s",
        "peak GB/s",
        "speedup",
    ):
        assert column in header
    assert "lowrank_update/full" in out


def test_hardware_peaks_lookup() -> None:
    assert micro.hardware_peaks(torch.device("cpu"), torch.float32) == (None, None)
    names = [key for key, _ in micro.HARDWARE_PEAKS]
    assert names.index("H100 PCIe") < names.index("H100")  # first match wins
    assert dict(micro.HARDWARE_PEAKS)["H100"]["gbs"] == 3350.0
    assert dict(micro.HARDWARE_PEAKS)["H200"]["bfloat16"] == 989.0


def test_vs_best_other_is_the_ratio_to_the_fastest_other_row(report: tuple[dict, str]) -> None:
    data, text = report
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in data["rows"]:
        groups.setdefault((row["op"], row["shape"]), []).append(row)
    for rows in groups.values():
        for row in rows:
            fastest_other = min(o["median_ms"] for o in rows if o is not row)
            assert row["vs_best_other"] == pytest.approx(row["median_ms"] / fastest_other)
    assert "vs best other" in text
