"""The layer benchmark runs end to end (--quick) and its rows are self-consistent."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from lowmem.bench import layers


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("layers") / "layers.json"
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            # One thread: tiny matmuls on a shared 2-core machine otherwise wait on OpenMP barriers.
            rc = layers.main(
                ["--quick", "--threads", "1", "--iters", "3", "--warmup", "1", "--json", str(path)]
            )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads(Path(path).read_text()), buf.getvalue()


def test_time_rows(report: tuple[dict, str]) -> None:
    data, text = report
    by_layer = {r["layer"]: r for r in data["time"]}
    # On CPU the layer's dispatched path is the compiled one when it builds (h4b), timed next to ref.
    compiled = {"SparseLowRankLinear[cpp factorized]", "SparseLowRankLinear[cpp: rebuild W]"}
    assert set(by_layer) - compiled == {"nn.Linear", "SparseLowRankLinear[ref]", "build W[ref]"}
    assert len(set(by_layer) & compiled) <= 1
    base = by_layer["nn.Linear"]["median_ms"]
    for name in ("nn.Linear", "SparseLowRankLinear[ref]", *(set(by_layer) & compiled)):
        row = by_layer[name]
        assert row["median_ms"] > 0 and row["ratio"] == pytest.approx(row["median_ms"] / base)
    build = by_layer["build W[ref]"]
    assert build["gbs"] > 0 and build["tflops"] > 0
    assert "SparseLowRankLinear[ref]" in text


def test_saved_rows_within_budget(report: tuple[dict, str]) -> None:
    data, _ = report
    rows = {r["layer"]: r for r in data["saved"]}
    sparse = rows["SparseLowRankLinear"]
    assert sparse["within_budget"] and sparse["saved_bytes"] <= sparse["input_bytes"] + sparse["param_bytes"]
    assert sparse["saved_bytes"] >= sparse["input_bytes"]  # the input itself is saved: the count is real


def test_param_row(report: tuple[dict, str]) -> None:
    data, _ = report
    (row,) = data["params"]
    assert row["converted_params"] < row["dense_params"]
    assert row["ratio"] == pytest.approx(row["converted_params"] / row["dense_params"])
    assert row["converted_layers"] == 7  # q, k, v, o, gate, up, down of the one micro layer


def test_saved_bytes_counts_each_storage_once() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 8, bias=False)
    # F.linear saves x and W (as a transposed view of W): two storages.
    assert layers.saved_bytes(lin, x) == (4 * 8 + 8 * 8) * 4
