"""`python -m lowmem.bench.offload_optim --quick`: every row, ratios in the same run, state bytes, overlap."""

import json
import math

from lowmem.bench.offload_optim import ROWS, TRAIN_ROWS, main
from lowmem.bench.step8bit import llama_shapes
from lowmem.kernels.blockwise_quant import num_blocks


def test_offload_optim_quick_rows_ratios_and_state_bytes(tmp_path, capsys):
    out = tmp_path / "offload.json"
    assert main(["--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == set(ROWS)
    assert result["threads"] == 2
    assert rows["torch-fused"]["ratio_to_torch_fused"] == 1.0
    for row in rows.values():
        assert row["median_ms"] > 0 and row["repeats"] == 2
        assert math.isclose(row["ratio_to_torch_fused"] * rows["torch-fused"]["median_ms"], row["median_ms"])
    # The targets are reported, whatever the quick run measured (timings at this size mean little).
    assert rows["offload-fp32 host"]["target"] == 1.1 and rows["offload-8bit host"]["target"] == 1.5
    assert isinstance(rows["offload-8bit host"]["meets_target"], bool)
    sizes = [math.prod(s) for s in llama_shapes(300, 16, 40, 1)]
    params = result["params"]
    # fp32 host states: two moments + a step per tensor, as torch's AdamW keeps them.
    assert rows["offload-fp32 host"]["host_state_bytes_per_param"] * params == 8 * sum(sizes) + 4 * len(sizes)
    # 8-bit: codes + absmax for tensors of 4096+ elements, fp32 moments for smaller ones, a step each.
    eight = sum(2 * n + 8 * num_blocks(n) if n >= 4096 else 8 * n for n in sizes) + 4 * len(sizes)
    assert round(rows["offload-8bit host"]["host_state_bytes_per_param"] * params) == eight
    out = capsys.readouterr().out
    assert "offload-8bit host" in out and "offload-8bit overlap train" in out

    # The train table: whole steps with and without update_in_backward, same weights either way.
    train = {r["row"]: r for r in result["train_rows"]}
    assert set(train) == set(TRAIN_ROWS)
    for name, row in train.items():
        twin = train[name.replace(" overlap", "")]
        assert row["median_ms"] > 0 and row["repeats"] == 2
        assert math.isclose(row["ratio_to_no_overlap"] * twin["median_ms"], row["median_ms"])
        assert row["weights_equal_no_overlap"] is True
