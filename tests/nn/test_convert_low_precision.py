"""convert_to_low_precision / convert_from_low_precision: which linears are swapped (defaults,
target_modules, module_filter_fn), the report's reasons for the others, shared parameters and
state dicts interchangeable with the original model, idempotence and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmem.kernels.int8_matmul import MAX_K
from lowmem.nn import LowPrecisionLinear, convert_from_low_precision, convert_to_low_precision


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return h + self.down(torch.relu(self.up(h)))


class Toy(nn.Module):
    def __init__(self, d: int = 24, vocab: int = 40) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def _toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


IDS = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(1))


def test_default_converts_every_linear_but_the_head() -> None:
    model = _toy()
    before = model(IDS).detach()
    report = convert_to_low_precision(model, "int8")
    names = [f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj", "up", "down")]
    assert report.converted == names
    assert list(report.skipped) == ["lm_head"] and "not selected" in report.skipped["lm_head"]
    assert all(type(model.get_submodule(n)) is LowPrecisionLinear for n in names)
    assert type(model.lm_head) is nn.Linear
    after = model(IDS).detach()
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < 0.05, f"int8 model output differs from fp32 by {rel:.3f} (relative)"
    assert "converted 8" in str(report) and "lm_head" in str(report)


def test_target_modules_and_filter_fn() -> None:
    model = _toy()
    report = convert_to_low_precision(model, "fp8", target_modules=["q_proj", "down"])
    assert report.converted == ["layers.0.q_proj", "layers.0.down", "layers.1.q_proj", "layers.1.down"]
    assert model.layers[0].q_proj.precision == "fp8" and model.layers[0].q_proj.scaling == "tensor"
    model = _toy()
    report = convert_to_low_precision(
        model,
        "int8",
        module_filter_fn=lambda module, name: name.startswith("layers.1.") and module.bias is not None,
    )
    assert report.converted == ["layers.1.q_proj", "layers.1.up", "layers.1.down"]
    assert "layers.1.v_proj" in report.skipped and "layers.0.up" in report.skipped
    model = _toy()
    report = convert_to_low_precision(
        model, "fp8", target_modules=r"layers\.0\..*", scaling="row", quantize_weight_grad=True
    )
    assert len(report.converted) == 4 and model.layers[0].up.scaling == "row"
    assert model.layers[0].up.quantize_weight_grad


def test_state_dict_is_interchangeable_and_parameters_are_shared() -> None:
    model = _toy()
    original = _toy()
    keys = list(model.state_dict())
    params = [p for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    convert_to_low_precision(model, "int8")
    assert list(model.state_dict()) == keys
    assert [p for p in model.parameters()] == params  # the very same Parameter objects
    model(IDS).square().mean().backward()
    before = model.layers[0].up.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.layers[0].up.weight, before)  # the old optimizer updates the new layer
    original.load_state_dict(model.state_dict())  # converted -> original
    model.load_state_dict(_toy(seed=3).state_dict())  # original -> converted
    assert torch.equal(model.layers[1].down.weight, _toy(seed=3).layers[1].down.weight)


def test_unconvert_gives_back_the_dense_model() -> None:
    model = _toy()
    want = model(IDS).detach()
    convert_to_low_precision(model, "fp8", scaling="row")
    names = convert_from_low_precision(model)
    assert len(names) == 8
    assert not any(isinstance(m, LowPrecisionLinear) for m in model.modules())
    assert torch.equal(model(IDS).detach(), want)


def test_delayed_scaling_conversion() -> None:
    """scaling="delayed": every converted layer gets its own amax histories on the weight's
    device, the state dict keeps nn.Linear's keys, and training steps fill the histories."""
    model = _toy()
    keys = list(model.state_dict())
    report = convert_to_low_precision(model, "fp8", scaling="delayed", amax_history_len=4)
    assert len(report.converted) == 8
    layers = [model.get_submodule(name) for name in report.converted]
    assert all(layer.scaling == "delayed" and layer.amax_history_x.shape == (4,) for layer in layers)
    assert len({id(layer.amax_history_x) for layer in layers}) == 8  # one history per layer
    assert list(model.state_dict()) == keys
    _toy(seed=2).load_state_dict(model.state_dict())
    for _ in range(2):
        model(IDS).square().mean().backward()
    for layer in layers:
        for op in ("x", "w", "grad"):
            history = getattr(layer, f"amax_history_{op}")
            assert bool((history[:2] > 0).all()) and not bool(history[2:].any()), (op, history)
    with pytest.raises(ValueError, match="amax_history_len"):
        convert_to_low_precision(_toy(), "fp8", scaling="delayed", amax_history_len=-1)


def test_unservable_layers_are_skipped_with_reasons() -> None:
    model = nn.Sequential(nn.Linear(MAX_K + 1, 1), nn.Linear(4, 4, dtype=torch.float64), nn.Linear(4, 4))
    report = convert_to_low_precision(model, "int8")
    assert report.converted == ["2"]
    assert "int32 accumulator" in report.skipped["0"] and "float64" in report.skipped["1"]
    fp8_model = nn.Sequential(nn.Linear(MAX_K + 1, 1))  # fp8 accumulates in fp32: no K limit
    assert convert_to_low_precision(fp8_model, "fp8").converted == ["0"]


def test_twice_is_a_no_op_and_typos_raise() -> None:
    model = _toy()
    convert_to_low_precision(model, "int8")
    again = convert_to_low_precision(model, "int8")
    assert again.converted == [] and list(again.skipped) == ["lm_head"]
    with pytest.raises(ValueError, match=r"no nn\.Linear matched"):
        convert_to_low_precision(_toy(), "int8", target_modules="qproj")
    with pytest.raises(ValueError, match="precision"):
        convert_to_low_precision(_toy(), "int4")
    with pytest.raises(ValueError, match="scaling"):
        convert_to_low_precision(_toy(), "int8", scaling="tensor")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        convert_to_low_precision("model", "int8")  # type: ignore[arg-type]
