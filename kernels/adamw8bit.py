"""Fused AdamW step with 8-bit block-wise quantized moments (Dettmers et al. 2022).

"8-bit Optimizers via Block-wise Quantization" (Dettmers, Lewis, Shleifer & Zettlemoyer, ICLR
2022) keeps Adam's two moments as uint8 codes into a dynamic map plus one fp32 absmax per block
of 256 elements (:mod:`lowmem.kernels.blockwise_quant`): 2 bytes + 8/256 bytes per parameter
instead of 8. Each step dequantizes the moments, does the 32-bit update, and re-quantizes them
with each block's *new* absmax.

State layout (per parameter tensor of ``numel`` elements)::

    exp_avg_codes       uint8, numel elements (param's shape), into the signed map
    exp_avg_absmax      fp32, [ceil(numel / 256)]
    exp_avg_sq_codes    uint8, numel elements (param's shape), into the unsigned map
    exp_avg_sq_absmax   fp32, [ceil(numel / 256)]

Blocks run over the parameter in flattened row-major order. ``torch.zeros`` codes with zero
absmax are a valid initial (all-zero) state.

Math, per element, all in fp32, exactly ``torch.optim.AdamW`` (decoupled decay first, eps after
bias correction); ``g = -grad`` if ``maximize``; hyperparameters enter as fp32 scalars::

    m, v   = qmap_s[m_code] * m_absmax, qmap_u[v_code] * v_absmax      (dequantize)
    p      = p * (1 - lr * weight_decay)
    m      = beta1 * m + (1 - beta1) * g
    v      = beta2 * v + (1 - beta2) * g * g
    p      = p - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
    m_absmax, m_code = quantize(m)  (per block of 256: absmax of the new m, nearest code)
    v_absmax, v_code = quantize(v)

Every fp32 operation is rounded once, in this order (no fused multiply-add), and the square root
and divisions are IEEE (correctly rounded), so the backends agree with the reference
:func:`adamw8bit_ref` bit for bit except where a platform's math differs (GPU code uses
``div_rn``/``sqrt_rn`` and disables FMA contraction for this reason); p is rounded once to its
dtype (fp32, bf16 or fp16) at the end.

NaN/inf gradients: an element whose gradient is not finite gets a non-finite moment, which the
quantizer stores as the code of 0 and leaves out of its block's absmax (so its moments restart
from 0 next step and the block's other 255 elements are quantized exactly as without it); the
element's own parameter receives the non-finite update, as with ``torch.optim.AdamW``, so the
problem stays visible.

Backends: :func:`adamw8bit` (Triton, one program per block of 256 holding the block in
registers: update, reduce the absmax, quantize), ``lowmem.kernels.adamw8bit_cpu.adamw8bit_cpu``
(C++/OpenMP, ``csrc/adamw8bit.cpp``) and :func:`adamw8bit_ref` (pure PyTorch). Call it through
``lowmem._ops.dispatch("adamw8bit", device)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lowmem.kernels._triton import HAS_TRITON, _rounded_for, interpreting, on_device, tl, triton
from lowmem.kernels.blockwise_quant import (
    BLOCK,
    dequantize_blockwise,
    num_blocks,
    quantization_tables,
    quantize_blockwise,
)

__all__ = [
    "adamw8bit",
    "adamw8bit_bytes",
    "adamw8bit_flops",
    "adamw8bit_multi",
    "adamw8bit_multi_ref",
    "adamw8bit_ref",
    "adamw8bit_scalars",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLT_MAX = 3.4028234663852886e38

if HAS_TRITON:

    @triton.jit
    def _quantize_block(x, mask, mid_ptr, BLOCK: tl.constexpr):
        """(codes int32 [BLOCK], absmax fp32 scalar) of one block of fp32 ``x``.

        absmax over the finite, unmasked elements; non-finite elements and all-zero blocks give
        the code of 0. The code is the number of midpoints below ``y = x / absmax``, found by a
        branchless binary search over the 256 padded midpoints (``midpoints[255] = inf``): 8
        probes, each one gather from a 1 KiB table that stays in L1.
        """
        finite = (tl.abs(x) <= 3.4028234663852886e38) & mask  # False for NaN and +-inf
        absmax = tl.max(tl.where(finite, tl.abs(x), 0.0), axis=0)
        # absmax == 0 means every finite x is +-0, which divided by 1 stays +-0: the code of 0.
        safe = tl.where(absmax > 0.0, absmax, 1.0)
        y = tl.where(finite, tl.div_rn(x, safe), 0.0)
        code = tl.zeros([BLOCK], dtype=tl.int32)
        for k in tl.static_range(8):
            probe = tl.load(mid_ptr + code + ((128 >> k) - 1))
            code += tl.where(probe < y, 128 >> k, 0)
        return code, absmax

    @triton.jit
    def _adamw8bit_kernel(
        p_ptr,
        g_ptr,
        m_code_ptr,
        m_absmax_ptr,
        v_code_ptr,
        v_absmax_ptr,
        m_map_ptr,  # signed map, fp32 [256]
        m_mid_ptr,  # its padded midpoints, fp32 [256]
        v_map_ptr,  # unsigned map
        v_mid_ptr,
        n_elements,
        grad_sign,  # -1.0 to maximize, else 1.0
        decay_factor,  # 1 - lr * weight_decay
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        step_size,  # lr / (1 - beta1**step)
        bc2_sqrt,  # sqrt(1 - beta2**step)
        eps,
        EMULATE_RTNE: tl.constexpr,  # only under the interpreter: see _rounded_for
        BLOCK: tl.constexpr,  # = the quantization block: one program owns one absmax
    ):
        block = tl.program_id(0).to(tl.int64)
        offsets = block * BLOCK + tl.arange(0, BLOCK)  # int64: past 2**31 elements
        mask = offsets < n_elements
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * grad_sign
        p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m_code = tl.load(m_code_ptr + offsets, mask=mask, other=0).to(tl.int32)
        v_code = tl.load(v_code_ptr + offsets, mask=mask, other=0).to(tl.int32)
        # Lanes past the end read code 0, the signed map's -0.993, not 0: zero them so they
        # cannot overflow the param's dtype on the masked store's conversion.
        m = tl.where(mask, tl.load(m_map_ptr + m_code) * tl.load(m_absmax_ptr + block), 0.0)
        v = tl.load(v_map_ptr + v_code) * tl.load(v_absmax_ptr + block)

        p = p * decay_factor
        m = m * beta1 + g * one_minus_beta1
        v = v * beta2 + (g * g) * one_minus_beta2
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(m, denom) * step_size
        tl.store(p_ptr + offsets, _rounded_for(p, p_ptr, EMULATE_RTNE), mask=mask)

        # The block's new absmax needs every updated value first; they are still in registers.
        m_code, m_absmax = _quantize_block(m, mask, m_mid_ptr, BLOCK)
        v_code, v_absmax = _quantize_block(v, mask, v_mid_ptr, BLOCK)
        tl.store(m_code_ptr + offsets, m_code.to(tl.uint8), mask=mask)
        tl.store(v_code_ptr + offsets, v_code.to(tl.uint8), mask=mask)
        tl.store(m_absmax_ptr + block, m_absmax)
        tl.store(v_absmax_ptr + block, v_absmax)

else:  # pragma: no cover - exercised only where triton is missing
    _adamw8bit_kernel = None


# ---------------------------------------------------------------------------------------------
# validation and hyperparameters (shared by every backend)
# ---------------------------------------------------------------------------------------------


def check_adamw8bit_args(
    op: str,
    param: Tensor,
    grad: Tensor,
    exp_avg_codes: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq_codes: Tensor,
    exp_avg_sq_absmax: Tensor,
    step: float,
    dtypes: tuple[torch.dtype, ...] | None = _FLOAT_DTYPES,
) -> None:
    """Raise ValueError naming the argument if the tensors do not form one valid 8-bit AdamW state."""
    if grad.shape != param.shape:
        raise ValueError(f"{op}: grad has shape {tuple(grad.shape)} but param has {tuple(param.shape)}")
    if grad.dtype != param.dtype:
        raise ValueError(f"{op}: grad has dtype {grad.dtype} but param has dtype {param.dtype}")
    if dtypes is not None and param.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{op}: param has dtype {param.dtype}; supported: {names}")
    if not param.dtype.is_floating_point:
        raise ValueError(f"{op}: param must be a floating-point tensor, got {param.dtype}")
    blocks = num_blocks(param.numel())
    for name, codes, absmax in (
        ("exp_avg", exp_avg_codes, exp_avg_absmax),
        ("exp_avg_sq", exp_avg_sq_codes, exp_avg_sq_absmax),
    ):
        if codes.dtype != torch.uint8 or codes.numel() != param.numel():
            raise ValueError(
                f"{op}: {name}_codes must be uint8 with param's {param.numel()} elements, got "
                f"{codes.dtype} with {codes.numel()}"
            )
        if absmax.dtype != torch.float32 or absmax.shape != (blocks,):
            raise ValueError(
                f"{op}: {name}_absmax must be float32 of shape ({blocks},) (one per block of "
                f"{BLOCK}), got {absmax.dtype} of shape {tuple(absmax.shape)}"
            )
    for name, t in (
        ("grad", grad),
        ("exp_avg_codes", exp_avg_codes),
        ("exp_avg_absmax", exp_avg_absmax),
        ("exp_avg_sq_codes", exp_avg_sq_codes),
        ("exp_avg_sq_absmax", exp_avg_sq_absmax),
    ):
        if t.device != param.device:
            raise ValueError(f"{op}: {name} is on {t.device} but param is on {param.device}")
    if step < 1:
        raise ValueError(f"{op}: step must be >= 1 (the count after incrementing), got {step}")


def adamw8bit_scalars(
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float, maximize: bool
) -> dict[str, float]:
    """The per-step scalars every backend uses, computed in float64 (each backend rounds them to
    fp32 once): the kernels' runtime arguments, so a new ``step`` or ``lr`` never recompiles.
    The order is the compiled op's schema order (csrc/adamw8bit.cpp)."""
    return {
        "grad_sign": -1.0 if maximize else 1.0,
        "decay_factor": 1.0 - lr * weight_decay,
        "beta1": float(beta1),
        "one_minus_beta1": 1.0 - beta1,
        "beta2": float(beta2),
        "one_minus_beta2": 1.0 - beta2,
        "step_size": lr / (1.0 - beta1**step),
        "bc2_sqrt": (1.0 - beta2**step) ** 0.5,
        "eps": float(eps),
    }


def contiguous_views(tensors: list[Tensor]) -> list[Tensor]:
    """Contiguous 1-D views of ``tensors`` (copies for the non-contiguous ones)."""
    return [t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1) for t in tensors]


def copy_back(originals: list[Tensor], flats: list[Tensor]) -> None:
    """Write results computed on contiguous copies back into the non-contiguous originals."""
    for dst, src in zip(originals, flats, strict=True):
        if src.data_ptr() != dst.data_ptr():
            dst.copy_(src.view(dst.shape))


# ---------------------------------------------------------------------------------------------
# the Triton launcher
# ---------------------------------------------------------------------------------------------


def adamw8bit(
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
    """One in-place AdamW step with 8-bit block-wise moments (fused Triton kernel).

    Args:
        param, grad: any shape, same dtype (fp32 / bf16 / fp16) and device.
        exp_avg_codes, exp_avg_sq_codes: uint8 with param's numel (its shape, by convention);
            codes into the signed / unsigned dynamic map. Updated in place.
        exp_avg_absmax, exp_avg_sq_absmax: fp32 ``[ceil(numel / 256)]``. Updated in place.
        step: the step count *after* incrementing (``>= 1``), as torch.optim uses.

    See the module docstring for the math and the NaN rule. One program per block of 256; the
    launcher runs on contiguous copies (and copies back) for non-contiguous tensors. Empty tensors
    return without a launch.
    """
    if not HAS_TRITON:
        raise RuntimeError("adamw8bit: triton is not importable; use the reference adamw8bit_ref")
    originals = [param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax]
    check_adamw8bit_args("adamw8bit", *originals, step=step)
    n = param.numel()
    if n == 0:
        return
    flat = contiguous_views(originals)
    signed = quantization_tables(True, param.device)
    unsigned = quantization_tables(False, param.device)
    scalars = adamw8bit_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, maximize=maximize
    )
    with on_device(flat[0]):
        _adamw8bit_kernel[(num_blocks(n),)](
            *flat,
            signed.qmap,
            signed.midpoints,
            unsigned.qmap,
            unsigned.midpoints,
            n,
            **scalars,
            EMULATE_RTNE=interpreting(),
            BLOCK=BLOCK,
            # The reference rounds every product and sum; an FMA would round once and move codes
            # that sit on a midpoint.
            enable_fp_fusion=False,
        )
    copy_back([originals[0], *originals[2:]], [flat[0], *flat[2:]])


# ---------------------------------------------------------------------------------------------
# the reference
# ---------------------------------------------------------------------------------------------


def adamw8bit_ref(
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
    """Pure-PyTorch :func:`adamw8bit`: dequantize_blockwise, the fp32 AdamW math, quantize_blockwise.

    Same signature and in-place contract as :func:`adamw8bit`; runs on any device and any
    floating param dtype (the math is fp32 for all of them). Each fp32 op below is one rounding,
    in the order the kernels use: tensor-by-scalar products round the scalar to fp32 first, as
    the kernels receive them; the square root goes through float64 because torch's vectorized
    fp32 ``sqrt`` on CPU is not always correctly rounded (off by an ulp for ~0.6% of inputs).
    """
    originals = [param, grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax]
    check_adamw8bit_args("adamw8bit_ref", *originals, step=step, dtypes=None)
    s = adamw8bit_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, maximize=maximize
    )
    m = dequantize_blockwise(exp_avg_codes.reshape(-1), exp_avg_absmax, signed=True)
    v = dequantize_blockwise(exp_avg_sq_codes.reshape(-1), exp_avg_sq_absmax, signed=False)
    g = grad.reshape(-1).float() * s["grad_sign"]
    p = param.reshape(-1).float() * s["decay_factor"]
    m = m * s["beta1"] + g * s["one_minus_beta1"]
    v = v * s["beta2"] + (g * g) * s["one_minus_beta2"]
    denom = v.double().sqrt().float() / s["bc2_sqrt"] + s["eps"]
    p = p - (m / denom) * s["step_size"]
    param.copy_(p.view(param.shape))
    for codes, absmax, value, signed in (
        (exp_avg_codes, exp_avg_absmax, m, True),
        (exp_avg_sq_codes, exp_avg_sq_absmax, v, False),
    ):
        new_codes, new_absmax = quantize_blockwise(value, signed)
        codes.copy_(new_codes.view(codes.shape))
        absmax.copy_(new_absmax)


# ---------------------------------------------------------------------------------------------
# lists of tensors (the ``adamw8bit_multi`` op: one optimizer step over many parameters)
# ---------------------------------------------------------------------------------------------


def check_equal_lengths(op: str, lists: list[list[Tensor]]) -> None:
    """The six per-parameter lists of a multi-tensor 8-bit step must have one length."""
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"{op}: the lists have lengths {[len(x) for x in lists]}; they must be equal")


def _for_each(
    fn: Callable[..., None],
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg_codes: list[Tensor],
    exp_avg_absmax: list[Tensor],
    exp_avg_sq_codes: list[Tensor],
    exp_avg_sq_absmax: list[Tensor],
    **hyper: Any,
) -> None:
    lists = [params, grads, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax]
    check_equal_lengths("adamw8bit_multi", lists)
    for tensors in zip(*lists, strict=True):
        fn(*tensors, **hyper)


def adamw8bit_multi(*lists: list[Tensor], **hyper: Any) -> None:
    """``adamw8bit_multi`` on CUDA: one :func:`adamw8bit` launch per tensor of the lists.

    Same arguments as :func:`lowmem.kernels.adamw8bit_cpu.adamw8bit_cpu_multi` (six lists, element
    ``i`` of each is one parameter's tensors, and the shared hyperparameters). Not a fused
    multi-tensor kernel: it exists so that the optimizer can hand every 8-bit parameter of a step
    to one op, which the C++ CPU backend does run as one parallel region.
    """
    _for_each(adamw8bit, *lists, **hyper)


def adamw8bit_multi_ref(*lists: list[Tensor], **hyper: Any) -> None:
    """Reference of ``adamw8bit_multi``: :func:`adamw8bit_ref` on each parameter of the lists."""
    _for_each(adamw8bit_ref, *lists, **hyper)


# ---------------------------------------------------------------------------------------------
# cost models (for benchmark rows: achieved GB/s and FLOP/s)
# ---------------------------------------------------------------------------------------------

#: fp32 operations per element: sign, decay, 3 + 4 for the moments, sqrt, /bc2, +eps, m/denom,
#: *step_size, the subtraction, two dequantizing products and, per moment, |x|, the max and the
#: division by absmax (the 8 midpoint compares of the code search are not counted).
ADAMW8BIT_FLOPS_PER_ELEMENT = 23


def adamw8bit_bytes(numel: int, param_itemsize: int) -> int:
    """Bytes moved by one step: read and write param and both uint8 codes, read grad, and read and
    write both fp32 absmax per block of 256 (the 1 KiB maps are cache-resident and not counted)."""
    return numel * (3 * param_itemsize + 4) + num_blocks(numel) * 4 * 4


def adamw8bit_flops(numel: int) -> int:
    """FLOPs of one step (see ``ADAMW8BIT_FLOPS_PER_ELEMENT``)."""
    return ADAMW8BIT_FLOPS_PER_ELEMENT * numel
