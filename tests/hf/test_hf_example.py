"""bench/hf_example.py, the newcomer's script, runs end to end and trains."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from lowmem.bench import hf_example


def test_example_trains_and_saves_state_memory(capsys):
    result = hf_example.main(["--steps", "8", "--batch-size", "4", "--seq-len", "32", "--rank", "8"])
    losses = result["losses"]
    assert losses[max(losses)] < losses[min(losses)] - 0.5  # bytes are far from uniform: fast early drop
    # GaLore keeps rank-8 moments for the projected 64-wide weights: less state than AdamW's
    assert 0 < result["state_bytes"] < result["adamw_bytes"]
    out = capsys.readouterr().out
    assert "galore_adamw (layer-wise)" in out and "optimizer state" in out
