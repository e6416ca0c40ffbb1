"""Momentum reset with a short LR re-warm-up (Glentis et al. 2025).

Glentis et al. ("Scalable Parameter and Memory Efficient Pretraining for LLM: Recent Algorithmic
Advances and Benchmarking", 2025) periodically zero the optimizer's momentum when pretraining
low-rank (and sparse + low-rank) models, typically right after a weight refactorization
(:func:`lowmem.nn.refactorize_`), whose new factors the old momentum no longer describes.
ReLoRA (Lialin et al. 2023) showed that restarting from zeroed optimizer state wants a short
learning-rate re-warm-up; :func:`reset_momentum` does both.

How the re-warm-up composes with LR schedulers: it wraps the next ``warmup_steps`` calls of
``optimizer.step()`` with a step pre-hook that multiplies every group's ``lr`` by ``k /
warmup_steps`` (k = 1, 2, ... warmup_steps) and a step post-hook that puts the exact original
value back. The scheduler therefore never sees the factor: LambdaLR, chainable schedulers
(ExponentialLR multiplies the *current* lr), warm restarts and checkpointed scheduler state all
behave as without the reset, and every optimizer that reads ``group["lr"]`` in ``step()`` (every
``torch.optim`` optimizer and every lowmem optimizer) gets the ramp. A scale key in the param
group would need every optimizer to honour it (torch.optim's do not); a LambdaLR wrapper would
take over the user's scheduler. The hooks hold no state in ``optimizer.state`` (tensors only
there), so checkpoints are unaffected; a checkpoint taken mid-ramp does not resume the ramp.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["reset_momentum"]

#: First-moment keys: Adam-family ``exp_avg`` (torch and lowmem), SGD's ``momentum_buffer``.
FIRST_MOMENT_KEYS = ("exp_avg", "momentum_buffer")
#: Second-moment keys: Adam's ``exp_avg_sq``, Adafactor's factored row / column statistics.
SECOND_MOMENT_KEYS = ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")

# One active re-warm-up per optimizer: a reset during a ramp restarts the ramp.
_ACTIVE: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Rewarmup] = weakref.WeakKeyDictionary()


class _Rewarmup:
    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.done = 0
        self.saved: list[Any] = []
        self.pre = optimizer.register_step_pre_hook(self._before)
        self.post = optimizer.register_step_post_hook(self._after)

    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        factor = (self.done + 1) / self.warmup_steps
        self.saved = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, self.saved, strict=True):
            group["lr"] = lr * factor  # a new object (float or tensor): the original is restored as is

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in zip(optimizer.param_groups, self.saved, strict=True):
            group["lr"] = lr
        self.done += 1
        if self.done >= self.warmup_steps:
            self.remove()
            if _ACTIVE.get(optimizer) is self:
                del _ACTIVE[optimizer]

    def remove(self) -> None:
        self.pre.remove()
        self.post.remove()


def _zero_moment_(state: dict[str, Any], key: str, signed: bool) -> bool:
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        return False
    absmax = state.get(f"{key}_absmax")
    if isinstance(absmax, torch.Tensor) and value.dtype == torch.uint8:
        # 8-bit block-wise state (lowmem's AdamW8bit / GaLoreAdamW8bit): the all-zero tensor is
        # the zero code with zero scales (lowmem.kernels.blockwise_quant.blockwise_zeros).
        from lowmem.kernels.blockwise_quant import zero_code

        value.fill_(zero_code(signed))
        absmax.zero_()
    else:
        value.zero_()
    return True


@torch.no_grad()
def reset_momentum(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = 10,
    *,
    second_moment: bool = False,
    params: Iterable[torch.Tensor] | None = None,
) -> int:
    """Zero the optimizer's momentum and re-warm the learning rate over ``warmup_steps`` steps.

    Args:
        optimizer: ``torch.optim.AdamW`` / ``Adam`` / ``SGD`` or any lowmem optimizer (fp32,
            bf16 or 8-bit block-wise states; GaLore-family moments live in the low-rank space and
            are zeroed there). Parameters without state yet are skipped.
        warmup_steps: the next ``warmup_steps`` steps use ``lr * k / warmup_steps`` (k = 1..);
            0 resets without a re-warm-up. See the module docstring for how this composes
            with LR schedulers.
        second_moment: also zero the second moment (``exp_avg_sq``, Adafactor's row / column
            statistics). The step counters are never touched (they drive bias correction and
            lowmem's projector-refresh schedule), so Adam's bias-corrected second moment
            restarts tiny and the first updates after such a reset are large: keep a re-warm-up.
        params: only reset the state of these parameters (default: all).

    Returns:
        The number of state tensors zeroed. Raises ValueError if none was found (the optimizer
        has not stepped yet, or keeps its momentum under other names), and for ``warmup_steps``
        > 0 on a lowmem optimizer with ``layerwise=True``, whose updates run inside backward
        where ``step()`` hooks cannot reach them.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"reset_momentum: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ValueError(f"reset_momentum: warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if warmup_steps > 0 and getattr(optimizer, "_layerwise", None) is not None:
        raise ValueError(
            "reset_momentum: the LR re-warm-up wraps optimizer.step(), but this optimizer steps "
            "layer-wise inside backward; pass warmup_steps=0 (and ramp the lr with your scheduler)"
        )
    wanted = None if params is None else {id(p) for p in params}
    count = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if wanted is not None and id(param) not in wanted:
                continue
            state = optimizer.state.get(param)
            if not state:
                continue
            for key in FIRST_MOMENT_KEYS:
                count += _zero_moment_(state, key, signed=True)
            if second_moment:
                for key in SECOND_MOMENT_KEYS:
                    count += _zero_moment_(state, key, signed=False)
    if count == 0:
        keys = FIRST_MOMENT_KEYS + (SECOND_MOMENT_KEYS if second_moment else ())
        raise ValueError(
            f"reset_momentum: no momentum state ({', '.join(keys)}) found in {type(optimizer).__name__}; "
            "call it after the optimizer has stepped at least once"
        )
    previous = _ACTIVE.pop(optimizer, None)
    if previous is not None:
        previous.remove()
    if warmup_steps > 0:
        _ACTIVE[optimizer] = _Rewarmup(optimizer, warmup_steps)
    return count
