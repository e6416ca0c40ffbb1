"""Hyperparameter and gradient checks shared by lowmem optimizers.

Messages follow torch.optim's wording ("Invalid learning rate: -1.0") and name the fix, and
every check runs before any state is touched, so a bad call never leaves a half-updated model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_adam_hyperparameters(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Raise ValueError for AdamW hyperparameters that torch.optim.AdamW would also reject."""
    lr_value = float(lr.item()) if isinstance(lr, Tensor) else lr
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not isinstance(lr_value, (int, float)) or not 0.0 <= lr_value or math.isnan(lr_value):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; pass a pair like (0.9, 0.999)")
    for index, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if not isinstance(eps, (int, float)) or not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not isinstance(weight_decay, (int, float)) or not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; it must be a positive integer")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_positive_float(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number > 0")


def check_gradient(optimizer_name: str, param_name: str, param: Tensor, grad: Tensor) -> None:
    """Reject gradients the update cannot handle, naming the parameter."""
    if grad.is_sparse:
        raise RuntimeError(
            f"{optimizer_name} does not support sparse gradients ({param_name}); "
            "use torch.optim.SparseAdam for sparse embeddings, or pass sparse=False to nn.Embedding"
        )
    if param.is_complex() or grad.is_complex():
        raise RuntimeError(
            f"{optimizer_name} does not support complex parameters or gradients ({param_name}); "
            "optimize torch.view_as_real(param) instead, or use torch.optim.AdamW for it"
        )
    if grad.shape != param.shape:
        raise RuntimeError(
            f"{optimizer_name}: gradient of {param_name} has shape {tuple(grad.shape)} but the "
            f"parameter has shape {tuple(param.shape)}"
        )
