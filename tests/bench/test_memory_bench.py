"""`python -m lowmem.bench.memory`: the headline table and a custom run, with JSON output."""

import json

from lowmem.bench.memory import main


def test_memory_bench_headline_and_custom(tmp_path, capsys):
    out = tmp_path / "headline.json"
    assert main(["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llama-7b" in text and "Assumptions" in text
    reports = json.loads(out.read_text())
    assert [r["optimizer"] for r in reports] == ["adamw", "adamw8bit", "galore_adamw8bit", "galore_adamw8bit"]
    totals = [r["total_per_device"] for r in reports]
    assert totals == sorted(totals, reverse=True)  # each saving shows
    assert reports[-1]["settings"]["layerwise"] and totals[-1] < 24e9 < totals[0]

    out = tmp_path / "custom.json"
    args = ["--model", "llama-130m", "--optimizer", "adamw,apollo_mini", "--seq-len", "512"]
    assert main([*args, "--activation", "offload", "--offload-optimizer", "--json", str(out)]) == 0
    reports = json.loads(out.read_text())
    assert [r["model"] for r in reports] == ["llama-130m", "llama-130m"]
    assert all(r["optimizer_states"] == 0 and r["host"]["optimizer states"] > 0 for r in reports)
    # APOLLO-Mini: rank-1 states for the blocks; embedding and LM head (most of 130M) keep AdamW states.
    assert reports[1]["host"]["optimizer states"] < reports[0]["host"]["optimizer states"] / 2
    assert "host activations" in capsys.readouterr().out


def test_memory_bench_adafactor_columns(tmp_path, capsys):
    """galore_adafactor and adafactor are optimizer names; --beta1 reaches only the Adafactor columns."""
    out = tmp_path / "adafactor.json"
    names = "galore_adamw8bit,galore_adafactor,adafactor"
    assert main(["--model", "llama-60m", "--optimizer", names, "--beta1", "0.9", "--json", str(out)]) == 0
    reports = json.loads(out.read_text())
    assert [r["optimizer"] for r in reports] == names.split(",")
    assert [r["settings"]["beta1"] for r in reports] == [None, 0.9, 0.9]
    assert "galore_adafactor (rank=128, beta1=0.9)" in capsys.readouterr().out
    assert main(["--model", "llama-60m", "--optimizer", "galore_adafactor", "--json", str(out)]) == 0
    without = json.loads(out.read_text())[0]
    assert without["settings"]["beta1"] is None
    assert without["optimizer_states"] < reports[1]["optimizer_states"]  # no first moment
