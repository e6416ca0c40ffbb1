"""Tests of ``python -m lowmem.bench train``: the corpus split, the measurements and a micro run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from lowmem.bench import __main__ as bench_cli
from lowmem.bench.corpus import (
    fixed_windows,
    is_validation_file,
    list_source_files,
    sample_windows,
    split_files,
    stdlib_root,
)
from lowmem.bench.loop import lr_multiplier
from lowmem.bench.measure import optimizer_state_bytes, profiled_peak_bytes, tensor_bytes
from lowmem.bench.model import PRESETS, build_model
from lowmem.bench.optimizers import REGISTRY, split_lowrank_params
from lowmem.bench.train import main

MICRO_ARGS = [
    "--model",
    "micro",
    "--steps",
    "6",
    "--seeds",
    "1",
    "--batch-size",
    "2",
    "--seq-len",
    "32",
    "--rank",
    "8",
    "--update-proj-gap",
    "3",
    "--val-windows",
    "4",
    "--eval-every",
    "3",
    "--plot",
    "",
    "--jobs",
    "1",
]


@pytest.fixture(scope="module")
def stdlib_files() -> list[str]:
    return list_source_files(stdlib_root())


def test_corpus_split_is_disjoint_by_file_and_deterministic(stdlib_files: list[str]) -> None:
    assert stdlib_files == sorted(stdlib_files) == list_source_files(stdlib_root())
    assert not any(part in ("site-packages", "dist-packages") for p in stdlib_files for part in p.split("/"))
    train, val = split_files(stdlib_files, 0.05)
    assert (train, val) == split_files(list(stdlib_files), 0.05)
    assert set(train).isdisjoint(val) and sorted(train + val) == stdlib_files
    assert 0.02 < len(val) / len(stdlib_files) < 0.10
    # A file's side depends on its path alone, not on which other files exist.
    assert split_files(stdlib_files[::2], 0.05)[1] == [p for p in stdlib_files[::2] if p in set(val)]
    assert all(is_validation_file(p, 0.05) for p in val)


def test_windows_are_seeded_and_in_range() -> None:
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    a = sample_windows(data, 4, 17, torch.Generator().manual_seed(3))
    b = sample_windows(data, 4, 17, torch.Generator().manual_seed(3))
    assert a.shape == (4, 17) and a.dtype == torch.int64 and torch.equal(a, b)
    assert torch.equal(fixed_windows(data, 4, 17, seed=3), a)
    # Consecutive bytes: each window is a contiguous slice (mod 256 because of uint8).
    assert torch.equal((a[:, 1:] - a[:, :-1]) % 256, torch.ones(4, 16, dtype=torch.int64))


def test_lr_schedule_warms_up_then_decays_to_min_ratio() -> None:
    values = [lr_multiplier(s, 100, 0.1, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in itertools.pairwise(values[9:]))
    assert values[-1] == pytest.approx(0.1, abs=1e-3)


def test_tensor_bytes_walks_objects_and_counts_each_tensor_once() -> None:
    class Projector:  # like galore-torch's, which keeps its basis on a Python object in the state
        def __init__(self) -> None:
            self.ortho_matrix = torch.zeros(3, 5)

    shared = torch.zeros(7)
    state = {"a": shared, "b": [shared, Projector()], "step": 3}
    assert tensor_bytes(state) == 7 * 4 + 15 * 4


def test_profiled_peak_sees_allocations_inside_the_step() -> None:
    def step() -> None:
        x = torch.ones(1 << 18)  # 1 MiB
        y = x * 2
        del x, y

    assert profiled_peak_bytes(step, torch.device("cpu")) >= 2 * (1 << 20)


def test_lowrank_split_targets_llama_linears() -> None:
    model = build_model(PRESETS["micro"], 32, seed=0)
    lowrank, other = split_lowrank_params(model, ("q_proj", "down_proj"))
    assert len(lowrank) == 2 * PRESETS["micro"].num_layers
    assert len(lowrank) + len(other) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in lowrank)


def test_train_main_micro_writes_sane_json(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert main([*MICRO_ARGS, "--optimizers", "adamw,galore", "--json", str(out)]) == 0
    report = json.loads(out.read_text())

    expected = {"adamw"} | ({"galore"} if REGISTRY["galore"].unavailable_reason() is None else set())
    assert set(report["results"]) == expected
    assert report["corpus"]["train_files"] > 0 and report["corpus"]["val_files"] > 0

    model = build_model(PRESETS["micro"], 32, seed=0)
    param_bytes = sum(p.nbytes for p in model.parameters())
    adamw = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    adamw.step()
    step_bytes = sum(s["step"].nbytes for s in adamw.state.values())
    assert optimizer_state_bytes(adamw) == 2 * param_bytes + step_bytes

    for name, entry in report["results"].items():
        (run,) = entry["runs"]
        for key in ("train_loss", "val_loss", "val_ppl"):
            assert run[key] is not None and math.isfinite(run[key]), (name, key)
        assert run["val_loss"] < math.log(256) + 1.0
        assert run["step_time_s"] > 0 and run["optimizer_step_time_s"] > 0
        assert run["optimizer_state_bytes"] > 0 and run["peak_memory_bytes"] > run["param_bytes"]
        assert run["param_bytes"] == param_bytes
        assert len(run["train_curve"]) == 6 and [p[0] for p in run["val_curve"]] == [3, 6]
        assert entry["summary"]["seeds"] == [0]

    assert report["results"]["adamw"]["runs"][0]["optimizer_state_bytes"] == 2 * param_bytes + step_bytes
    if "galore" in report["results"]:
        galore = report["results"]["galore"]["summary"]
        assert (
            galore["optimizer_state_bytes"] < report["results"]["adamw"]["summary"]["optimizer_state_bytes"]
        )
        assert "val_loss_delta_mean" in galore


def test_cli_dispatches_train_and_rejects_unknown_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        bench_cli.main(["train", "--optimizers", "nope"])
    assert excinfo.value.code == 2
    assert "unknown optimizer" in capsys.readouterr().err


AVAILABLE = [name for name, entry in REGISTRY.items() if entry.unavailable_reason() is None]


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_available_registry_entry_trains_two_steps(name: str) -> None:
    """Each optimizer row of the benchmark builds on the LLaMA model and moves every weight."""
    from lowmem.bench.optimizers import OptimizerSettings, build_optimizer

    model = build_model(PRESETS["micro"], 32, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = OptimizerSettings(lr=1e-3, rank=4, update_proj_gap=1)
    opt = build_optimizer(name, model, settings)
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), (name, n)
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p.detach(), before[n]), (name, n)


def test_default_run_includes_the_lowmem_family() -> None:
    from lowmem.bench.optimizers import DEFAULT_OPTIMIZERS

    assert {"adamw", "galore", "fira", "apollo-mini", "galore8bit", "adamw+sltrain"} <= set(
        DEFAULT_OPTIMIZERS
    )


# ------------------------------------------------------------------------------ rows with techniques


def test_parse_row_splits_optimizer_and_techniques_and_rejects_bad_rows() -> None:
    from lowmem.bench.techniques import TECHNIQUES, parse_row

    assert parse_row("adamw", REGISTRY) == ("adamw", ())
    name, techniques = parse_row("adamw8bit+sltrain+layerwise", REGISTRY)
    assert name == "adamw8bit" and [t.name for t in techniques] == ["sltrain", "layerwise"]
    assert techniques[0] is TECHNIQUES["sltrain"]
    for row, message in [
        ("nope+sltrain", "unknown optimizer 'nope'"),
        ("adamw+nope", "unknown technique 'nope'"),
        ("adamw+offload+offload", "appears twice"),
        ("adamw+sltrain+int8", "cannot be combined with 'sltrain'"),
        ("adamw+ckpt+ckpt-offload", "cannot be combined with 'ckpt'"),
        ("galore8bit+sltrain", "leaving it nothing to project"),
        ("adamw+refactor", "'refactor' needs one of sltrain, lowrank"),
        ("adamw+int8+fp8", "cannot be combined with 'int8'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_row(row, REGISTRY)


def test_layerwise_row_updates_inside_backward_and_clips_per_parameter() -> None:
    from lowmem.bench.optimizers import OptimizerSettings, build_optimizer

    model = build_model(PRESETS["micro"], 32, seed=0)
    with pytest.raises(ValueError, match="adamw has no layer-wise mode"):
        build_optimizer("adamw", model, OptimizerSettings(layerwise=True))
    opt = build_optimizer(
        "galore", model, OptimizerSettings(rank=4, layerwise=True, max_grad_norm_per_param=1.0)
    )
    assert opt._layerwise is not None and opt._layerwise_options.max_grad_norm_per_param == 1.0
    before = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert not torch.equal(model.lm_head.weight, before)  # updated in backward, no step() yet
    assert model.lm_head.weight.grad is None  # and its gradient freed


def test_train_main_runs_a_layerwise_row_and_writes_results_page(tmp_path: Path) -> None:
    out, page, memory_png = tmp_path / "train.json", tmp_path / "RESULTS.md", tmp_path / "memory.png"
    args = [*MICRO_ARGS, "--optimizers", "adamw,galore+layerwise", "--json", str(out)]
    args += ["--results-md", str(page), "--memory-plot", str(memory_png)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"adamw", "galore+layerwise"}
    assert report["config"]["rows"]["galore+layerwise"] == {
        "optimizer": "galore",
        "techniques": ["layerwise"],
    }
    summary = report["results"]["galore+layerwise"]["summary"]
    assert summary["val_bpb"] == pytest.approx(summary["val_loss_mean"] / math.log(2))
    assert summary["step_cpu_time_s"] > 0
    env = report["environment"]
    assert env["torch"] == torch.__version__ and "commit" in env and "triton" in env
    text = page.read_text()
    assert "| galore+layerwise |" in text and "--results-md" in text and "commit" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not memory_png.exists()
    else:
        assert memory_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_draws_on_a_terminal_and_stays_silent_elsewhere() -> None:
    import io

    from lowmem.bench.progress import Progress

    quiet = io.StringIO()
    bar = Progress(runs=2, steps=4, stream=quiet)  # StringIO is not a terminal
    for step in range(1, 5):
        bar.step(step)
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    bar = Progress(runs=2, steps=4, stream=shown, enabled=True)
    bar.start_run("galore seed 0")
    for step in range(1, 5):
        bar.step(step)
    assert " 50%  galore seed 0 step 4/4" in shown.getvalue()
    bar.start_run("adamw seed 0")
    bar.step(2)
    assert " 75%  adamw seed 0 step 2/4" in shown.getvalue()
    bar.clear()
    assert shown.getvalue().endswith("\r")


def test_parallel_jobs_give_the_same_losses_as_one_process(tmp_path: Path) -> None:
    """--jobs 2 runs (row, seed) pairs in two spawned worker processes; every run is determined by
    its seed, so the loss curves equal a --jobs 1 run's exactly, and results keep the seed order."""
    reports = {}
    for jobs in (1, 2):
        out = tmp_path / f"train{jobs}.json"
        args = [*MICRO_ARGS, "--seeds", "2", "--optimizers", "adamw,galore", "--jobs", str(jobs)]
        assert main([*args, "--json", str(out), "--memory-plot", ""]) == 0
        reports[jobs] = json.loads(out.read_text())
    assert reports[2]["environment"]["jobs"] == 2
    for name, entry in reports[1]["results"].items():
        parallel = reports[2]["results"][name]["runs"]
        assert [r["seed"] for r in parallel] == [0, 1]
        for one, two in zip(entry["runs"], parallel, strict=True):
            assert one["train_curve"] == two["train_curve"] and one["val_loss"] == two["val_loss"]
        # Peak memory is measured on the first seed only, in both modes.
        assert [r["peak_memory_bytes"] is None for r in parallel] == [False, True]


def test_refactor_technique_refactorizes_and_resets_on_its_schedule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``adamw+sltrain+refactor``: every REFACTOR_EVERY steps refactorize_ and reset_momentum run
    (Glentis et al. 2025), and training goes on with finite losses."""
    import lowmem.nn
    import lowmem.optim
    from lowmem.bench import techniques

    calls: list[str] = []
    real_refactorize, real_reset = lowmem.nn.refactorize_, lowmem.optim.reset_momentum

    def refactorize(model: torch.nn.Module) -> int:
        calls.append("refactorize")
        return real_refactorize(model)

    def reset(optimizer: torch.optim.Optimizer, warmup_steps: int = 10) -> int:
        calls.append(f"reset {warmup_steps}")
        return real_reset(optimizer, warmup_steps=warmup_steps)

    monkeypatch.setattr(techniques, "REFACTOR_EVERY", 2)
    monkeypatch.setattr(lowmem.nn, "refactorize_", refactorize)
    monkeypatch.setattr(lowmem.optim, "reset_momentum", reset)
    path = tmp_path / "train.json"
    assert main([*MICRO_ARGS, "--optimizers", "adamw+sltrain+refactor", "--json", str(path)]) == 0
    run = json.loads(path.read_text())["results"]["adamw+sltrain+refactor"]["runs"][0]
    assert calls == ["refactorize", "reset 10"] * 3  # steps 2, 4, 6 of 6
    assert all(math.isfinite(loss) for loss in run["train_curve"])


def test_model_variant_and_linear_flags_append_techniques_to_every_row(tmp_path: Path) -> None:
    """``--model-variant sltrain`` and ``--linear int8`` (the issues' names for these rows) run
    every requested row with that technique."""
    out = tmp_path / "train.json"
    args = [*MICRO_ARGS, "--optimizers", "adamw", "--linear", "int8", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["adamw+int8"]
    run = report["results"]["adamw+int8"]["runs"][0]
    assert run["techniques"]["int8"]["converted"] == 7 * PRESETS["micro"].num_layers
    with pytest.raises(SystemExit):
        main([*MICRO_ARGS, "--optimizers", "galore", "--model-variant", "sltrain"])  # nothing to project
