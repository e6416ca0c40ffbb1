"""`python -m lowmem.bench step8bit` at a tiny size: rows, ratios and state bytes per parameter."""

import json
import math

from lowmem.bench.__main__ import main as bench_main
from lowmem.bench.step8bit import llama_shapes
from lowmem.kernels.blockwise_quant import num_blocks


def test_step8bit_rows_ratios_and_state_bytes(tmp_path):
    out = tmp_path / "step8bit.json"
    size = ["--vocab", "300", "--hidden", "16", "--intermediate", "40", "--layers", "1"]
    timing = ["--warmup", "1", "--repeats", "2"]
    optimizers = ["--optimizers", "lowmem,torch-fused,torch-foreach"]
    assert bench_main(["step8bit", *size, *timing, *optimizers, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["optimizer"]: r for r in result["rows"]}
    assert set(rows) == {"lowmem", "torch-fused", "torch-foreach"}
    assert result["lowmem_backend"] == "cpp"
    shapes = llama_shapes(300, 16, 40, 1)
    sizes = [math.prod(s) for s in shapes]
    assert (
        result["params"] == sum(sizes) and result["tensors"] == len(shapes) == 12
    )  # embedding, 7 matrices + 2 norms, final norm, head
    for row in rows.values():
        assert row["median_ms"] > 0 and row["repeats"] == 2 and row["interleaved"]
    assert rows["torch-fused"]["ratio_to_torch_fused"] == 1.0
    # 8-bit: one uint8 code per moment and element, one fp32 absmax per moment and block of 256,
    # one fp32 step per tensor.
    assert rows["lowmem"]["state_bytes"] == sum(2 * n + 2 * 4 * num_blocks(n) + 4 for n in sizes)
    # torch: two fp32 moments per element and one fp32 step per tensor.
    assert rows["torch-fused"]["state_bytes"] == 8 * sum(sizes) + 4 * len(sizes)
    assert rows["lowmem"]["state_bytes_per_param"] < 2.1
