"""``convert_to_low_precision``: swap a model's ``nn.Linear`` layers for int8 / fp8 training
linears in place, and :func:`convert_from_low_precision` to swap them back.

Which linears are candidates is decided by :func:`lowmem.nn.convert.iter_target_linears` (the
rules every ``convert_*`` shares: ``target_modules`` like transformers' ``optim_target_modules``,
``module_filter_fn(module, name)`` like torchao's; by default every linear except ``lm_head``).
A candidate the low-precision kernels cannot serve is left as it is and listed with the reason.
The swap shares the weight and bias Parameters (no copy), so an optimizer built before the
conversion keeps working, and the state dict keys and values are unchanged: a converted model's
``state_dict()`` loads into the original model and vice versa.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lowmem.nn.convert import ModuleFilter, iter_target_linears, replace_module
from lowmem.nn.low_precision import MAX_K, LowPrecisionLinear, _check_options, to_dense

__all__ = ["LowPrecisionReport", "convert_from_low_precision", "convert_to_low_precision"]

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class LowPrecisionReport:
    """What :func:`convert_to_low_precision` did.

    Attributes:
        converted: qualified names of the linears now ``LowPrecisionLinear``.
        skipped: ``{qualified name: reason}`` for every other ``nn.Linear`` in the model (not
            selected by ``target_modules`` / ``module_filter_fn``, or not servable).
    """

    precision: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.precision}: converted {len(self.converted)} linear(s), skipped {len(self.skipped)}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _unservable_reason(linear: nn.Linear, precision: str) -> str | None:
    if linear.weight.dtype not in _WEIGHT_DTYPES:
        return f"weight dtype {linear.weight.dtype} is not float32 / bfloat16 / float16"
    if linear.weight.is_sparse or linear.weight.device.type == "meta":
        return f"weight is {'sparse' if linear.weight.is_sparse else 'on the meta device'}"
    if linear.in_features == 0 or linear.out_features == 0:
        return "empty weight"
    if precision == "int8" and max(linear.in_features, linear.out_features) > MAX_K:
        return (
            f"{linear.in_features} x {linear.out_features}: a side longer than {MAX_K} can overflow the "
            "int8 kernels' int32 accumulator"
        )
    return None


def convert_to_low_precision(
    model: nn.Module,
    precision: str = "int8",
    *,
    module_filter_fn: ModuleFilter | None = None,
    target_modules: str | Sequence[str] | None = None,
    scaling: str | None = None,
    quantize_weight_grad: bool = False,
    amax_history_len: int = 16,
) -> LowPrecisionReport:
    """Replace the matching ``nn.Linear`` layers of ``model`` by :class:`LowPrecisionLinear`.

    Args:
        model: modified in place (children are replaced on their parents; no class is patched).
        precision: ``"int8"`` or ``"fp8"``.
        module_filter_fn: ``fn(module, qualified_name) -> bool`` narrowing the candidates.
        target_modules: ``None`` / ``"all-linear"`` (all but ``lm_head``), a name pattern or a
            list of them (see :mod:`lowmem.nn.convert`).
        scaling, quantize_weight_grad, amax_history_len: passed to :class:`LowPrecisionLinear`
            (``scaling="delayed"``: fp8 tensor-wise scales from an amax history per layer).

    Returns:
        A :class:`LowPrecisionReport` of converted and skipped linears with reasons.

    Raises:
        ValueError: bad ``precision`` / ``scaling``, or no linear matched and none was converted
            before (a typo in ``target_modules`` must not silently train in full precision).
    """
    _check_options(precision, scaling, 1, 1, amax_history_len)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_to_low_precision: model must be an nn.Module, got {type(model).__name__}")
    report = LowPrecisionReport(precision)
    targets = iter_target_linears(model, target_modules=target_modules, module_filter_fn=module_filter_fn)
    chosen = {id(m) for _, m in targets}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and id(module) not in chosen:
            report.skipped[name] = (
                "not selected by target_modules / module_filter_fn (lm_head is left dense by default)"
            )
    already = any(isinstance(m, LowPrecisionLinear) for m in model.modules())
    if not targets and not already:  # converting twice is a no-op, a typo is an error
        raise ValueError(
            f"convert_to_low_precision: no nn.Linear matched target_modules={target_modules!r} "
            f"(with module_filter_fn={module_filter_fn!r}); nothing would run in {precision}"
        )
    for name, linear in targets:
        reason = _unservable_reason(linear, precision)
        if reason is not None:
            report.skipped[name] = reason
            continue
        new = LowPrecisionLinear.from_linear(
            linear,
            precision=precision,
            scaling=scaling,
            quantize_weight_grad=quantize_weight_grad,
            amax_history_len=amax_history_len,
        )
        new.train(linear.training)
        replace_module(model, name, new)
        report.converted.append(name)
    return report


def convert_from_low_precision(model: nn.Module) -> list[str]:
    """Replace every :class:`LowPrecisionLinear` in ``model`` by the equivalent ``nn.Linear``
    (sharing its Parameters); returns the qualified names swapped back."""
    if isinstance(model, LowPrecisionLinear):
        raise ValueError(
            "convert_from_low_precision: model itself is a LowPrecisionLinear; call model.to_dense()"
        )
    names = [name for name, m in model.named_modules() if isinstance(m, LowPrecisionLinear)]
    for name in names:
        replace_module(model, name, to_dense(model.get_submodule(name)))  # type: ignore[arg-type]
    return names
