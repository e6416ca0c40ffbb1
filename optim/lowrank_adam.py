"""The Adam half shared by GaLoreAdamW, FiraAdamW and ApolloAdamW: hyperparameters, moments, plain groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lowmem._ops import dispatch
from lowmem.kernels.blockwise_quant import blockwise_zeros, dequantize_blockwise, quantize_blockwise
from lowmem.optim._checks import check_adam_hyperparameters, check_choice
from lowmem.optim.functional.adamw import adamw_update
from lowmem.optim.lowrank_base import LowRankOptimizer
from lowmem.optim.projector import Side, transport_moments
from lowmem.optim.sharded import local_tensor

#: ``state_dtype`` values: None keeps each parameter's dtype (torch.optim's behaviour); "int8"
#: stores block-wise quantized moments (fp32 for tensors under ``min_8bit_size`` elements).
STATE_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int8": torch.float32,
}
#: Moments with fewer elements stay fp32 under ``state_dtype="int8"`` (bitsandbytes' default):
#: their quantization would save little and their absmax blocks would be mostly padding.
MIN_8BIT_SIZE = 4096


class AdamLowRankOptimizer(LowRankOptimizer):
    """A :class:`LowRankOptimizer` whose state is Adam's two moments (full or low-rank shaped).

    Groups without ``rank`` are ``torch.optim.AdamW`` exactly (bitwise on CPU in the param's
    dtype). ``state_dtype`` stores the moments in another precision than the parameters
    (``"float32"`` moments for bf16 weights, or ``"bfloat16"`` moments to halve the state);
    the update is always computed in fp32.

    Layer-wise stepping and clipping (keyword-only; see :mod:`lowmem.optim.layerwise`):

    - ``layerwise`` (False): update each parameter inside backward, from a post-accumulate-grad
      hook, as soon as its gradient is ready, and free that gradient; ``step()`` then updates
      nothing (call it anyway: closures, step hooks and LR schedulers keep working).
    - ``accumulation_steps`` (1; > 1 needs ``layerwise``): update on every k-th backward pass
      from the SUM of the k micro-batch gradients (scale the loss by 1/k for the mean);
      projected parameters keep that sum in the low-rank space between refreshes when the
      optimizer supports it (GaLore).
    - ``max_grad_norm_per_param`` (None): clip each parameter's gradient to this L2 norm before
      its update, as ``torch.nn.utils.clip_grad_norm_([p], max_norm)`` for each p (with or
      without ``layerwise``). Global-norm clipping needs every gradient at once, which
      layer-wise stepping never holds.
    - ``state_dtype="int8"``: both moments block-wise quantized (blocks of 256, dynamic
      quantization maps with a per-block absmax, Dettmers et al. 2022, arXiv:2110.02861),
      2 bytes per element plus 8 bytes per 256. State keys: ``exp_avg`` / ``exp_avg_sq`` hold
      uint8 codes in the moment's shape, ``exp_avg_absmax`` / ``exp_avg_sq_absmax`` fp32 scales.
      Plain groups use one fused pass (dequantize, AdamW in fp32, requantize; C++ on CPU,
      Triton on CUDA); low-rank moments are dequantized, updated and requantized around the
      low-rank step. Moments under ``min_8bit_size`` elements (4096) stay fp32: visible as
      ``exp_avg.dtype == torch.float32`` and no ``*_absmax`` keys.
    - ``process_group`` (None; needs ``layerwise``): average each gradient over this group
      (all-reduce, then / world size) right before its update; use it instead of wrapping the
      model in DistributedDataParallel.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        state_dtype: str | None = None,
        min_8bit_size: int = MIN_8BIT_SIZE,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        max_grad_norm_per_param: float | None = None,
        process_group: Any = None,
    ) -> None:
        check_adam_hyperparameters(lr, betas, eps, weight_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "state_dtype": state_dtype,
            "min_8bit_size": min_8bit_size,
        }
        super().__init__(params, defaults)
        self._init_layerwise(
            layerwise=layerwise,
            accumulation_steps=accumulation_steps,
            max_grad_norm_per_param=max_grad_norm_per_param,
            process_group=process_group,
        )

    def _check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_adam_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        check_choice("state_dtype", group.get("state_dtype"), tuple(STATE_DTYPES))
        size = group.get("min_8bit_size", MIN_8BIT_SIZE)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"Invalid min_8bit_size: {size!r}; it must be an integer >= 0")

    @staticmethod
    def _moment_dtype(param: Tensor, group: dict[str, Any]) -> torch.dtype:
        return STATE_DTYPES[group.get("state_dtype")] or param.dtype

    def _init_state(
        self, state: dict[str, Any], param: Tensor, group: dict[str, Any], side: Side | None, shape: tuple
    ) -> None:
        numel = 1
        for size in shape:
            numel *= size
        if group.get("state_dtype") == "int8" and numel >= group.get("min_8bit_size", MIN_8BIT_SIZE):
            state["exp_avg"], state["exp_avg_absmax"] = blockwise_zeros(shape, True, param.device)
            state["exp_avg_sq"], state["exp_avg_sq_absmax"] = blockwise_zeros(shape, False, param.device)
            return
        dtype = self._moment_dtype(param, group)
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=param.device)

    # ----------------------------------------------------------------- moments in any precision
    @staticmethod
    def _is_quantized(state: dict[str, Any]) -> bool:
        return "exp_avg_absmax" in state

    def _absmax(self, state: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """The moments' block scales when they are 8-bit codes, for the functional cores."""
        if not self._is_quantized(state):
            return None
        return state["exp_avg_absmax"], state["exp_avg_sq_absmax"]

    def _moments(self, state: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(M, V) to update in place: the state tensors, or fp32 dequantized copies for int8 states
        (write those back with :meth:`_store_moments`)."""
        if not self._is_quantized(state):
            return state["exp_avg"], state["exp_avg_sq"]
        return (
            dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], signed=True),
            dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], signed=False),
        )

    def _store_moments(self, state: dict[str, Any], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
        """Requantize moments returned by :meth:`_moments` (nothing to do for unquantized states)."""
        if not self._is_quantized(state):
            return
        for key, value, signed in (("exp_avg", exp_avg, True), ("exp_avg_sq", exp_avg_sq, False)):
            codes, absmax = quantize_blockwise(value, signed)
            state[key].copy_(codes)
            state[f"{key}_absmax"].copy_(absmax)

    def _keeps_state_dtype(self, key: str, value: Tensor, group: dict[str, Any]) -> bool:
        return super()._keeps_state_dtype(key, value, group) or group.get("state_dtype") is not None

    @staticmethod
    def _adam_hyper(group: dict[str, Any], step: float) -> dict[str, Any]:
        """The Adam keywords every functional core takes, from ``group`` at bias-correction ``step``."""
        beta1, beta2 = group["betas"]
        return {
            "lr": float(group["lr"]),
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "step": float(step),
            "maximize": group["maximize"],
        }

    def _step_params(self, work: list[tuple[dict[str, Any], Tensor, Side | None]]) -> None:
        """Full-rank 8-bit parameters go to one ``adamw8bit_multi`` op per (group, step, device,
        dtype); everything else is updated one parameter at a time.

        Same results as one ``adamw8bit`` per parameter, bit for bit (tested): on CPU the C++ op
        runs them all in one parallel region, which is what brings AdamW8bit's step near torch's
        fused AdamW on models of many tensors. Clipped parameters (``max_grad_norm_per_param``)
        and states without the 8-bit codes take the per-parameter path.
        """
        batches: dict[tuple[int, float, torch.device, torch.dtype], list[Tensor]] = {}
        rest: list[tuple[dict[str, Any], Tensor, Side | None]] = []
        batchable = self._layerwise_options.max_grad_norm_per_param is None
        for group, param, side in work:
            state = self.state.get(param)
            if batchable and side is None and state and self._is_quantized(state):
                key = (id(group), float(state["step"].item()) + 1, param.device, param.dtype)
                batches.setdefault(key, []).append(param)
            else:
                rest.append((group, param, side))
        groups = {id(group): group for group, _, _ in work}
        for (group_id, step, device, dtype), params in batches.items():
            states = [self.state[p] for p in params]
            for state in states:
                state["step"] += 1
            dispatch("adamw8bit_multi", device, dtype)(
                [local_tensor(p) for p in params],  # FSDP2: the local rows (optim/sharded.py)
                [local_tensor(p.grad).to(dtype) for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_absmax"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["exp_avg_sq_absmax"] for s in states],
                **self._adam_hyper(groups[group_id], step),
            )
        super()._step_params(rest)

    def _full_rank_step(self, param: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] += 1
        hyper = self._adam_hyper(group, state["step"].item())
        if self._is_quantized(state):
            dispatch("adamw8bit", param.device, param.dtype)(
                param,
                param.grad.to(param.dtype),
                state["exp_avg"],
                state["exp_avg_absmax"],
                state["exp_avg_sq"],
                state["exp_avg_sq_absmax"],
                **hyper,
            )
            return
        adamw_update(param, param.grad, state["exp_avg"], state["exp_avg_sq"], **hyper)

    def _carry_moments(
        self,
        state: dict[str, Any],
        old: tuple[Tensor | None, Tensor | None],
        new: tuple[Tensor | None, Tensor | None],
    ) -> None:
        exp_avg, exp_avg_sq = self._moments(state)
        transport_moments(exp_avg, exp_avg_sq, old, new)
        self._store_moments(state, exp_avg, exp_avg_sq)

    def _reset_moments(self, state: dict[str, Any]) -> None:
        exp_avg, exp_avg_sq = self._moments(state)
        exp_avg.zero_()
        exp_avg_sq.zero_()
        self._store_moments(state, exp_avg, exp_avg_sq)
