"""``adamw8bit`` on CPU: the compiled C++ kernel of ``csrc/adamw8bit.cpp`` (OpenMP + SIMD).

Importing this module builds the kernel (first time on a machine: 15-30 s; later: a cached
load), so ``lowmem._ops`` imports it only when the ``cpp`` backend of ``adamw8bit`` is
first considered; a machine without a compiler gets the reason recorded there and the reference
instead. Semantics, state layout and the NaN rule: :mod:`lowmem.kernels.adamw8bit`.
"""

from __future__ import annotations

from torch import Tensor

from lowmem.kernels._cpp import load_cpp_op
from lowmem.kernels.adamw8bit import adamw8bit_scalars, check_adamw8bit_args, contiguous_views, copy_back
from lowmem.kernels.blockwise_quant import quantization_tables

__all__ = ["adamw8bit_cpu"]

_op = load_cpp_op("adamw8bit").default


def adamw8bit_cpu(
    param: Tensor,
    grad: Tensor,
    exp_avg_codes: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq_codes: Tensor,
    exp_avg_sq_absmax: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool = False,
) -> None:
    """:func:`lowmem.kernels.adamw8bit.adamw8bit` for CPU tensors, with the compiled kernel.

    Same signature and in-place contract: param and grad fp32 / bf16 / fp16 (same dtype), uint8
    codes with param's numel, fp32 absmax ``[ceil(numel / 256)]``. Non-contiguous tensors run on
    contiguous copies that are copied back.
    """
    originals = [param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax]
    check_adamw8bit_args("adamw8bit_cpu", *originals, step=step)
    if param.device.type != "cpu":
        raise ValueError(f"adamw8bit_cpu: tensors must be on the CPU, not {param.device}")
    if param.numel() == 0:
        return
    # The kernel reads numel and the data pointer only, so contiguous tensors of any shape go in
    # as they are (an optimizer calls this once per parameter: every microsecond here counts).
    contiguous = all(t.is_contiguous() for t in originals)
    tensors = originals if contiguous else contiguous_views(originals)
    signed = quantization_tables(True, "cpu")
    unsigned = quantization_tables(False, "cpu")
    scalars = adamw8bit_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, maximize=maximize
    )
    # Positional, in the schema's order (csrc/adamw8bit.cpp): keyword arguments cost the op
    # call a third more.
    _op(*tensors, signed.qmap, signed.lut, unsigned.qmap, unsigned.lut, *scalars.values())
    if not contiguous:
        copy_back([originals[0], *originals[2:]], [tensors[0], *tensors[2:]])
