"""`python -m lowmem.bench step` at a tiny size: rows, state bytes and ratios are consistent."""

import importlib.util
import json

from lowmem.bench.__main__ import main as bench_main


def test_step_benchmark_rows_and_state_bytes(tmp_path):
    out = tmp_path / "step.json"
    rc = bench_main(
        [
            "step",
            "--size",
            "48",
            "--rank",
            "8",
            "--weights",
            "2",
            "--repeats",
            "2",
            "--refresh-repeats",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["optimizer"], r["mode"]): r for r in result["rows"]}
    for key in [
        ("lowmem-randomized", "steady"),
        ("lowmem-randomized", "refresh"),
        ("lowmem-svd", "refresh"),
        ("adamw", "steady"),
    ]:
        assert key in rows and rows[key]["median_ms"] > 0
    # GaLore state for an m×m weight: 2·m·r moments + r·m basis (fp32), plus one fp32 step and
    # one int64 refresh counter per weight; AdamW: 2·m·m + a step per weight.
    m, r, w = 48, 8, 2
    assert rows[("lowmem-svd", "steady")]["state_bytes"] == w * (4 * (2 * m * r + r * m) + 4 + 8)
    assert rows[("adamw", "steady")]["state_bytes"] == w * (4 * 2 * m * m + 4)
    if importlib.util.find_spec("galore_torch") is not None:
        assert ("galore-torch", "refresh") in rows
        assert any("lowmem-randomized  / galore-torch" in line for line in result["ratios"])
