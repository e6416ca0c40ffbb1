"""Fused elementwise Adam(W): one pass over param, grad and both moments.

Two ops share one Triton kernel (``_adamw_kernel``), selected by a ``constexpr`` flag:

``adamw``
    The full in-place ``torch.optim.AdamW`` step (decoupled decay, eps after bias correction,
    Loshchilov & Hutter 2019). Memory traffic per element: read param, grad, exp_avg,
    exp_avg_sq; write param, exp_avg, exp_avg_sq (7 tensors' worth of bytes, 0 temporaries).
``adam_direction``
    The moment update plus the bias-corrected normalized direction
    ``N = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``, without touching a parameter. This is the
    low-rank half of a GaLore step (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by
    Gradient Low-Rank Projection"): Adam runs on the r-dim projected gradient and the direction
    is projected back and applied by :mod:`lowmem.kernels.lowrank_update`. Traffic: read grad,
    exp_avg, exp_avg_sq; write exp_avg, exp_avg_sq, out (``out`` may alias ``grad``).

The references :func:`adamw_ref` / :func:`adam_direction_ref` are pure PyTorch; ``adamw_ref``
uses exactly ``torch.optim.AdamW``'s single-tensor op sequence and is bitwise identical to it.

Dtypes: param and grad share a dtype (fp32, bf16 or fp16); exp_avg and exp_avg_sq share a dtype,
either the param's or fp32 (fp32 states for low-precision params). The kernel computes in fp32 and
rounds once per stored tensor; hyperparameters, bias corrections included, are runtime scalars so
a new ``step`` or ``lr`` never recompiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowmem.kernels._triton import HAS_TRITON, _rounded_for, interpreting, on_device, tl, triton

__all__ = [
    "adam_direction",
    "adam_direction_bytes",
    "adam_direction_flops",
    "adam_direction_ref",
    "adamw",
    "adamw_bytes",
    "adamw_flops",
    "adamw_ref",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK = 1024

if HAS_TRITON:

    @triton.jit
    def _adamw_kernel(
        p_ptr,  # param (UPDATE_PARAM) or the direction output (else)
        g_ptr,
        m_ptr,
        v_ptr,
        n_elements,
        grad_sign,  # -1.0 to maximize, else 1.0
        decay_factor,  # 1 - lr * weight_decay
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        step_size,  # lr / bc1 for the param update, 1 / bc1 for the direction
        bc2_sqrt,
        eps,
        UPDATE_PARAM: tl.constexpr,
        EMULATE_RTNE: tl.constexpr,  # only under the interpreter: see _rounded_for
        BLOCK: tl.constexpr,
    ):
        # int64 so that tensors past 2**31 elements index correctly.
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * grad_sign
        m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        m = m + one_minus_beta1 * (g - m)  # lerp(m, g, 1 - beta1)
        v = v * beta2 + one_minus_beta2 * (g * g)
        denom = tl.sqrt(v) / bc2_sqrt + eps
        tl.store(m_ptr + offsets, _rounded_for(m, m_ptr, EMULATE_RTNE), mask=mask)
        tl.store(v_ptr + offsets, _rounded_for(v, v_ptr, EMULATE_RTNE), mask=mask)
        if UPDATE_PARAM:
            p = tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            p = p * decay_factor - step_size * (m / denom)
            tl.store(p_ptr + offsets, _rounded_for(p, p_ptr, EMULATE_RTNE), mask=mask)
        else:
            direction = (m * step_size) / denom
            tl.store(p_ptr + offsets, _rounded_for(direction, p_ptr, EMULATE_RTNE), mask=mask)

else:  # pragma: no cover - exercised only where triton is missing
    _adamw_kernel = None


# ---------------------------------------------------------------------------------------------
# validation and layout helpers
# ---------------------------------------------------------------------------------------------


def _check(op: str, named: dict[str, Tensor], *, state_names: tuple[str, ...]) -> None:
    """Same shape and device everywhere; data tensors share a dtype; states share one (or fp32)."""
    items = list(named.items())
    first_name, first = items[0]
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != first.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(t.shape)} but {first_name} has shape "
                f"{tuple(first.shape)}; all tensors must have the same shape"
            )
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    data = [(n, t) for n, t in items if n not in state_names]
    states = [(n, t) for n, t in items if n in state_names]
    for name, t in data[1:]:
        if t.dtype != data[0][1].dtype:
            raise ValueError(
                f"{op}: {name} has dtype {t.dtype} but {data[0][0]} has dtype {data[0][1].dtype}"
            )
    (s0_name, s0), (s1_name, s1) = states
    if s0.dtype != s1.dtype:
        raise ValueError(f"{op}: {s0_name} has dtype {s0.dtype} but {s1_name} has dtype {s1.dtype}")
    if s0.dtype not in (data[0][1].dtype, torch.float32):
        raise ValueError(
            f"{op}: optimizer states have dtype {s0.dtype} but {data[0][0]} has dtype "
            f"{data[0][1].dtype}; states must match it or be float32"
        )


def _is_dense(t: Tensor) -> bool:
    """True if ``t`` covers exactly ``numel`` consecutive elements of its storage (any dim order)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _flat(tensors: list[Tensor]) -> tuple[list[Tensor], bool]:
    """1-D views the kernel can walk linearly, and whether they alias the originals.

    Contiguous tensors, or dense tensors that all share one memory layout (e.g. a transposed
    parameter and its identically strided gradient and states), are viewed in place: an
    elementwise op does not care about the order it visits elements in, only that element ``i``
    of every tensor is the same logical element. Anything else (slices, mixed layouts) is
    copied to contiguous buffers; the caller copies the results back.
    """
    first = tensors[0]
    if all(t.stride() == first.stride() and _is_dense(t) for t in tensors):
        return [t.as_strided((t.numel(),), (1,), t.storage_offset()) for t in tensors], True
    return [t.contiguous().view(-1) for t in tensors], False


def _copy_back(pairs: list[tuple[Tensor, Tensor]]) -> None:
    for dst, src in pairs:
        if src.data_ptr() != dst.data_ptr():  # contiguous() handed back the tensor itself
            dst.copy_(src.view(dst.shape))


def _launch(p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, update_param: bool, **scalars: float) -> None:
    n = g.numel()
    grid = (triton.cdiv(n, _BLOCK),)
    emulate_rtne = interpreting()
    with on_device(p):
        _adamw_kernel[grid](
            p, g, m, v, n, **scalars, UPDATE_PARAM=update_param, EMULATE_RTNE=emulate_rtne, BLOCK=_BLOCK
        )


def _require_triton(op: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: triton is not importable; use the reference {op}_ref")


# ---------------------------------------------------------------------------------------------
# AdamW step
# ---------------------------------------------------------------------------------------------


def adamw(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool = False,
) -> None:
    """One in-place AdamW step on a single tensor with the fused Triton kernel.

    Math (``torch.optim.AdamW``; ``g = -grad`` if ``maximize``)::

        param      *= 1 - lr * weight_decay
        exp_avg     = lerp(exp_avg, g, 1 - beta1)
        exp_avg_sq  = beta2 * exp_avg_sq + (1 - beta2) * g * g
        param      -= lr / (1 - beta1**step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)

    Args:
        param, grad: any shape, same dtype (fp32 / bf16 / fp16) and device.
        exp_avg, exp_avg_sq: same shape; param's dtype or fp32. Updated in place.
        step: the step count *after* incrementing (``>= 1``), as torch.optim uses.

    Computes in fp32 and rounds once per stored tensor. Layout: contiguous tensors, or dense
    tensors that share one stride order, are updated in place directly; otherwise (e.g. a sliced
    view) the launcher runs on contiguous copies and copies param and the moments back.
    Empty tensors return without a launch.
    """
    _require_triton("adamw")
    _check(
        "adamw",
        {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
        state_names=("exp_avg", "exp_avg_sq"),
    )
    if step < 1:
        raise ValueError(f"adamw: step must be >= 1 (the count after incrementing), got {step}")
    if param.numel() == 0:
        return
    originals = [param, grad, exp_avg, exp_avg_sq]
    flat, in_place = _flat(originals)
    _launch(
        *flat,
        update_param=True,
        grad_sign=-1.0 if maximize else 1.0,
        decay_factor=1.0 - lr * weight_decay,
        one_minus_beta1=1.0 - beta1,
        beta2=float(beta2),
        one_minus_beta2=1.0 - beta2,
        step_size=lr / (1.0 - beta1**step),
        bc2_sqrt=(1.0 - beta2**step) ** 0.5,
        eps=float(eps),
    )
    if not in_place:
        _copy_back([(param, flat[0]), (exp_avg, flat[2]), (exp_avg_sq, flat[3])])


def adamw_ref(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool = False,
) -> None:
    """Pure-PyTorch AdamW step; same signature and math as :func:`adamw`.

    Uses exactly the op sequence of ``torch.optim.AdamW(foreach=False, fused=False)``, so for
    states in the param's dtype it is bitwise identical to it. With fp32 states and a
    low-precision param, the gradient is upcast to fp32 first.
    """
    if maximize:
        grad = -grad
    grad = grad.to(exp_avg.dtype)  # no-op (same tensor) when dtypes match
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


# ---------------------------------------------------------------------------------------------
# Adam direction (moments + normalized direction, no parameter)
# ---------------------------------------------------------------------------------------------


def adam_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    out: Tensor | None = None,
) -> Tensor:
    """Update the Adam moments in place and return the normalized direction (fused Triton kernel).

    Math::

        exp_avg    = lerp(exp_avg, grad, 1 - beta1)
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        N          = (exp_avg / (1 - beta1**step)) / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)

    Args:
        grad: any shape; fp32 / bf16 / fp16.
        exp_avg, exp_avg_sq: same shape; grad's dtype or fp32. Updated in place.
        out: where N goes (grad's shape and dtype). May be ``grad`` itself, to reuse its memory;
            must not otherwise overlap the inputs. ``None`` allocates ``torch.empty_like(grad)``.

    Returns:
        ``out`` holding N, in grad's dtype. Used by GaLore (Zhao et al. 2024) on the projected
        r-dim gradient; the caller scales N and projects it back.
    """
    _require_triton("adam_direction")
    if out is None:
        out = torch.empty_like(grad)
    _check(
        "adam_direction",
        {"grad": grad, "out": out, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
        state_names=("exp_avg", "exp_avg_sq"),
    )
    if step < 1:
        raise ValueError(f"adam_direction: step must be >= 1 (the count after incrementing), got {step}")
    if grad.numel() == 0:
        return out
    originals = [out, grad, exp_avg, exp_avg_sq]
    flat, in_place = _flat(originals)
    if not in_place and out is grad:
        # grad's contiguous copy is both read and written: the kernel loads each element before
        # storing it, so this is safe, and it saves a buffer.
        flat[0] = flat[1]
    _launch(
        *flat,
        update_param=False,
        grad_sign=1.0,
        decay_factor=1.0,
        one_minus_beta1=1.0 - beta1,
        beta2=float(beta2),
        one_minus_beta2=1.0 - beta2,
        step_size=1.0 / (1.0 - beta1**step),
        bc2_sqrt=(1.0 - beta2**step) ** 0.5,
        eps=float(eps),
    )
    if not in_place:
        _copy_back([(out, flat[0]), (exp_avg, flat[2]), (exp_avg_sq, flat[3])])
    return out


def adam_direction_ref(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: float,
    out: Tensor | None = None,
) -> Tensor:
    """Pure-PyTorch :func:`adam_direction`: the moment updates in torch.optim.AdamW's op order."""
    g = grad.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    direction = torch.div(exp_avg, bias_correction1).div_(denom)
    if out is None:
        return direction.to(grad.dtype)
    out.copy_(direction)
    return out


# ---------------------------------------------------------------------------------------------
# cost models (for the micro benchmark's achieved GB/s and FLOP/s)
# ---------------------------------------------------------------------------------------------

#: fp32 operations per element in the kernel: sign, 3 for the lerp, 4 for the second moment,
#: sqrt, /bc2, +eps, decay, m/denom, *step_size, and the subtraction from param.
ADAMW_FLOPS_PER_ELEMENT = 15
#: The same without sign, decay and the param subtraction.
ADAM_DIRECTION_FLOPS_PER_ELEMENT = 12


def adamw_bytes(numel: int, param_itemsize: int, state_itemsize: int | None = None) -> int:
    """Bytes moved by :func:`adamw`: read param, grad, both moments; write param, both moments."""
    state = param_itemsize if state_itemsize is None else state_itemsize
    return numel * (3 * param_itemsize + 4 * state)


def adamw_flops(numel: int) -> int:
    """FLOPs of :func:`adamw` (see ``ADAMW_FLOPS_PER_ELEMENT``)."""
    return ADAMW_FLOPS_PER_ELEMENT * numel


def adam_direction_bytes(numel: int, grad_itemsize: int, state_itemsize: int | None = None) -> int:
    """Bytes moved by :func:`adam_direction`: read grad and both moments; write both moments and out."""
    state = grad_itemsize if state_itemsize is None else state_itemsize
    return numel * (2 * grad_itemsize + 4 * state)


def adam_direction_flops(numel: int) -> int:
    """FLOPs of :func:`adam_direction` (see ``ADAM_DIRECTION_FLOPS_PER_ELEMENT``)."""
    return ADAM_DIRECTION_FLOPS_PER_ELEMENT * numel
