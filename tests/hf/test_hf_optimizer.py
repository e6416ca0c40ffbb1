"""lowmem.hf.optimizer_cls_and_kwargs: every name trains under the Trainer, the TrainingArguments'
hyperparameters reach the optimizer, target modules follow transformers' rules, bad input is named."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch
from tiny_llama import TARGETS, ByteWindows, logged, lowrank_options, make_trainer, tiny_llama, training_args
from transformers import Trainer

import lowmem.hf
from lowmem.optim import AdamW8bit, ApolloAdamW, FiraAdamW, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit

CLASSES = {
    "galore_adamw": GaLoreAdamW,
    "galore_adamw8bit": GaLoreAdamW8bit,
    "fira_adamw": FiraAdamW,
    "apollo_adamw": ApolloAdamW,
    "apollo_mini": ApolloAdamW,
    "adamw8bit": AdamW8bit,
    "galore_adafactor": GaLoreAdafactor,
}


def _inner(trainer):
    return lowmem.hf.unwrap_optimizer(trainer.optimizer)


def _named_groups(kwargs):
    """{param name: group} of the kwargs' named param groups."""
    return {name: group for group in kwargs["params"] for name, _ in group["params"]}


def test_names_are_the_catalogue():
    assert set(lowmem.hf.OPTIMIZER_NAMES) == set(CLASSES)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_name_trains_under_the_trainer(tmp_path, name):
    trainer = make_trainer(name, training_args(tmp_path, max_steps=3), **lowrank_options(name))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    optimizer = _inner(trainer)
    assert isinstance(optimizer, CLASSES[name])
    losses = logged(trainer, "loss")
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for n, p in trainer.model.named_parameters():
        assert not torch.equal(p, before[n]), f"{name} did not update {n}"
    q_proj = trainer.model.model.layers[0].self_attn.q_proj.weight  # 32x32
    embed = trainer.model.model.embed_tokens.weight  # 256x32
    state = optimizer.state[q_proj]
    if name == "adamw8bit":
        assert state["exp_avg"].shape == q_proj.shape
    elif name == "galore_adafactor":
        assert state["exp_avg_sq_row"].shape == (32,) and state["exp_avg_sq_col"].shape == (4,)
    else:
        rank = 1 if name == "apollo_mini" else 4
        assert state["exp_avg"].shape == (32, rank)  # projected: moments in the rank-r subspace
    if name in ("adamw8bit", "galore_adamw8bit"):
        assert optimizer.state[embed]["exp_avg"].dtype == torch.uint8  # 8192 elements: quantized


def test_hyperparameters_come_from_the_arguments(tmp_path):
    args = training_args(tmp_path, learning_rate=3e-3, weight_decay=0.05, adam_beta1=0.8, adam_beta2=0.95)
    args.adam_epsilon = 1e-7
    model = tiny_llama()
    cls, kwargs = lowmem.hf.optimizer_cls_and_kwargs("galore_adamw", args, model, target_modules=TARGETS)
    optimizer = cls(**kwargs)  # the value also builds the optimizer outside the Trainer
    for group in optimizer.param_groups:
        assert group["lr"] == 3e-3 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7
    # Weight decay on exactly the parameters the Trainer's own optimizers decay.
    decayed = set(Trainer(model=model, args=args).get_decay_parameter_names(model))
    assert decayed and any("norm" in n for n, _ in model.named_parameters() if n not in decayed)
    named = {name: group for group in optimizer.param_groups for name in group["param_names"]}
    assert set(named) == {n for n, _ in model.named_parameters()}
    for name, group in named.items():
        assert group["weight_decay"] == (0.05 if name in decayed else 0.0), name
        assert ("rank" in group) == (name.endswith("proj.weight")), name


def test_adamw8bit_groups_equal_the_trainers_own(tmp_path):
    args = training_args(tmp_path)
    model = tiny_llama()
    _, kwargs = lowmem.hf.optimizer_cls_and_kwargs("adamw8bit", args, model)
    ours = {id(p): group["weight_decay"] for group in kwargs["params"] for _, p in group["params"]}
    reference = Trainer(model=model, args=args).create_optimizer()  # optim="adamw_torch"
    theirs = {id(p): group["weight_decay"] for group in reference.param_groups for p in group["params"]}
    assert ours == theirs


def test_adafactor_follows_the_trainers_schedule(tmp_path):
    model = tiny_llama()
    cls, kwargs = lowmem.hf.optimizer_cls_and_kwargs(
        "galore_adafactor", training_args(tmp_path), model, target_modules=TARGETS, rank=4, beta1=0.9
    )
    optimizer = cls(**kwargs)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-2 and not group["relative_step"] and not group["scale_parameter"]
    assert group["beta1"] == 0.9


def test_apollo_mini_preset_and_overrides(tmp_path):
    model = tiny_llama()
    _, kwargs = lowmem.hf.optimizer_cls_and_kwargs(
        "apollo_mini", training_args(tmp_path), model, target_modules=TARGETS, update_proj_gap=7
    )
    group = kwargs["params"][0]
    keys = (group["rank"], group["scale_type"], group["scale"], group["update_proj_gap"])
    assert keys == (1, "tensor", 128.0, 7)


def _projected(model, args, **options):
    _, kwargs = lowmem.hf.optimizer_cls_and_kwargs("galore_adamw", args, model, rank=4, **options)
    return {name for name, group in _named_groups(kwargs).items() if "rank" in group}


def test_target_modules_follow_transformers_rules(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    # a list: substring, exact name, or a regex matching the whole name
    assert _projected(model, args, target_modules=["q_proj"]) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
    }
    assert _projected(model, args, target_modules=["model.layers.1.mlp.up_proj"]) == {
        "model.layers.1.mlp.up_proj.weight"
    }
    assert _projected(model, args, target_modules=[r"model\.layers\.0\.mlp\..*"]) == {
        f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
    }
    # a single string is a regex on the whole name: "q_proj" alone matches nothing
    assert _projected(model, args, target_modules=r".*\.(k|v)_proj") == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("k_proj", "v_proj")
    }
    with pytest.raises(ValueError, match=r"matched no nn\.Linear"):
        _projected(model, args, target_modules="q_proj")
    # "all-linear": every nn.Linear, the output head included (transformers' rule)
    assert _projected(model, args, target_modules="all-linear") == linears
    assert "lm_head.weight" in linears
    # the arguments' optim_target_modules when the option is absent
    args.optim_target_modules = ["o_proj"]
    assert _projected(model, args) == {f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)}


def test_layerwise_suffix_and_option(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path, max_grad_norm=0.0, gradient_accumulation_steps=3)
    for name, extra in (("galore_adamw_layerwise", {}), ("galore_adamw", {"layerwise": True})):
        _, kwargs = lowmem.hf.optimizer_cls_and_kwargs(name, args, model, target_modules=TARGETS, **extra)
        assert kwargs["layerwise"] is True and kwargs["accumulation_steps"] == 3
    _, kwargs = lowmem.hf.optimizer_cls_and_kwargs("galore_adamw", args, model, target_modules=TARGETS)
    assert "layerwise" not in kwargs and "accumulation_steps" not in kwargs


def test_bad_input_is_named(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match=r"unknown option 'rnak'.*valid options: .*rank.*target_modules"):
        lowmem.hf.optimizer_cls_and_kwargs("galore_adamw", args, model, target_modules=TARGETS, rnak=4)
    with pytest.raises(ValueError, match=r"unknown option 'rank'.*valid options"):
        lowmem.hf.optimizer_cls_and_kwargs("adamw8bit", args, model, rank=4)
    with pytest.raises(ValueError, match=r"'lr' comes from the TrainingArguments \(learning_rate\)"):
        lowmem.hf.optimizer_cls_and_kwargs("fira_adamw", args, model, target_modules=TARGETS, lr=1.0)
    with pytest.raises(ValueError, match=r"unknown optimizer 'galore'.*galore_adamw"):
        lowmem.hf.optimizer_cls_and_kwargs("galore", args, model)
    with pytest.raises(ValueError, match="optim_target_modules"):
        lowmem.hf.optimizer_cls_and_kwargs("galore_adamw", args, model)
    with pytest.raises(ValueError, match="layerwise=False"):
        lowmem.hf.optimizer_cls_and_kwargs("galore_adamw_layerwise", args, model, layerwise=False)
    with pytest.raises(TypeError, match="TrainingArguments"):
        lowmem.hf.optimizer_cls_and_kwargs("adamw8bit", {"learning_rate": 1e-3}, model)
    # the optimizer's own validation still applies to the options
    cls, kwargs = lowmem.hf.optimizer_cls_and_kwargs(
        "galore_adamw", args, model, target_modules=TARGETS, rank=0
    )
    with pytest.raises(ValueError, match="rank"):
        cls(**kwargs)


def test_dataset_is_bytes():
    windows = ByteWindows(count=3, length=5)
    assert len(windows) == 3 and windows[0]["input_ids"].dtype == torch.int64
    assert int(windows.windows.max()) < 256
