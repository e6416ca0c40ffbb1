"""``LowPrecisionLinear``: an ``nn.Linear`` whose training matmuls run in int8 or fp8.

Low-precision training (survey: "Low-precision training of large language models", 2025):
the big matmuls of a linear layer's forward and backward run on quantized operands while the
master weight, the bias, the optimizer and everything numerically sensitive stay in high
precision. The weight is re-quantized from the master copy at every use, so the optimizer
updates it exactly as for ``nn.Linear``, and the state dict is the plain high-precision weight
(same keys as ``nn.Linear``; :meth:`LowPrecisionLinear.to_dense` gives the ``nn.Linear`` back).

With ``x`` (M, K) the flattened tokens, ``W`` (N, K), ``dY`` (M, N)::

    forward   Y  = X Wᵀ + b     X per row (token) scales, W per output channel (row) scales
    backward  dX = dY W         dY per row scales, W per *input* column scales
              dW = dYᵀ X        high precision by default (SwitchBack); quantized if asked:
                                dY and X per column scales (the sum runs over tokens)
              db = sum_m dY     high precision

Each operand is scaled along the axis that is *not* summed, so the scales leave the K-sum and
the product is an exact integer (int8) or fp32-accumulated (fp8) GEMM with a dequantizing
epilogue (see :mod:`lowmem.kernels.int8_matmul`). Keeping dW in 16/32-bit follows SwitchBack
(Wortsman et al. 2023, "Stable and low-precision training for large-scale vision-language
models"): the weight gradient sums over all tokens, where quantization noise hurts most.

``precision="int8"``: row-wise absmax int8 (:mod:`lowmem.kernels.quantize`), Triton kernels on
CUDA. ``precision="fp8"``: e4m3 for the forward operands and W, e5m2 for gradients
(Micikevicius et al. 2022), ``scaling="tensor"`` (one scale per tensor), ``"row"``, or
``"delayed"`` (tensor-wise scales from an amax history, below). On GPUs with fp8 tensor cores
(sm89+) the GEMMs run through ``torch._scaled_mm`` or the Triton fp8 kernel, whichever measured
faster per problem size (:mod:`lowmem.kernels.fp8_matmul_select`); the quantizers are fused
Triton kernels (:mod:`lowmem.kernels.fp8_quantize_triton`).

Delayed scaling (``scaling="delayed"``; Micikevicius et al. 2022, NVIDIA Transformer Engine,
torchao float8): dynamic scaling needs the absmax of a tensor *before* it can cast it, a full
reduction on the critical path of every GEMM. Delayed scaling casts with the scale of the
maximum of the last ``amax_history_len`` absmaxes of that operand (x, W, and dY in backward),
measured on earlier steps, and records the current absmax in the same pass as the cast::

    amax_d = max(history)            (earlier steps only)
    x_fp8  = cast(clamp(x * 448 / amax_d, -448, 448))     scale = amax_d / 448
    history = [absmax(x), history[:-1]]                     (after the cast)

Values above ``amax_d`` (a tensor that grew faster than its history) *saturate* at ±max_fp8
instead of becoming inf/NaN; that clipping is the price of the missing reduction, and is why the
history is a max over several steps. The first use of each operand (empty history) measures
its absmax first, so step 1 equals dynamic tensor-wise scaling. The histories are buffers with
``persistent=False``: they move to another device with ``.to()`` but stay fp32 under
``.half()`` / ``.to(dtype)`` (an fp16 history would hold inf for an absmax above 65504, and
scale inf gives NaN outputs), and are not in the state dict (which stays loadable into
``nn.Linear``); a layer built to resume from a checkpoint re-measures on its first step.
Like torchao's delayed recipe, a forward run twice per step (activation checkpointing) records
x and W twice, and every forward records, eval and ``no_grad`` ones included. Across processes
nothing all-reduces the histories (torchao can). DDP by default
(``broadcast_buffers`` / ``forward_sync_buffers``) broadcasts every buffer, these included,
from rank 0 before each forward, so all ranks scale with rank 0's history and their own updates
are overwritten; a rank whose tensors outgrow rank 0's saturates more often, but the results
stay correct. With buffer syncing off, and under FSDP2 (which does not sync buffers), each rank
keeps and scales with its own history.

CPU: both precisions run the same quantization numerics emulated in fp32 (int8: exact integer
sums; fp8: fp32 GEMM of upcast fp8 values). That is for checking numerics: it is slower than
``nn.Linear`` (quantization passes plus an fp32 GEMM), and int8 on CPU through ``torch._int_mm``
would be ~40x slower still. Nobody should pick these layers on CPU for speed.

Non-finite values: a token (row of X or dY) holding NaN/inf makes its whole output row NaN, and a
weight row/column holding one makes the matching output column NaN (fp32 math would give
inf/NaN there too); see :mod:`lowmem.kernels.quantize`. Loss scalers see them as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lowmem._ops import dispatch

__all__ = ["MAX_K", "PRECISIONS", "LowPrecisionLinear", "to_dense"]

#: ``lowmem.kernels.int8_matmul.MAX_K``, the longest int8 sum the int32 accumulator holds; copied
#: so that ``import lowmem.nn`` does not import Triton (tests check the two agree).
MAX_K = 2**17

PRECISIONS = ("int8", "fp8")
_SCALINGS = {"int8": ("row",), "fp8": ("tensor", "row", "delayed")}
_OPERANDS = ("x", "w", "grad")  # the operands with an amax history under delayed scaling
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_E4M3, _E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _quantize_int8(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    return dispatch("quantize_int8", x.device, x.dtype)(x, dim)


def _int8_mm(
    a: Tensor, b: Tensor, sa: Tensor, sb: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    return dispatch("int8_matmul", a.device)(a, b, sa, sb, bias, out_dtype)


def _quantize_fp8(x: Tensor, fp8_dtype: torch.dtype, dim: int | None) -> tuple[Tensor, Tensor]:
    return dispatch("quantize_fp8", x.device, x.dtype)(x, fp8_dtype, dim)


def _fp8_mm(
    a: Tensor, b: Tensor, sa: Tensor, sb: Tensor, bias: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    return dispatch("fp8_matmul", a.device)(a, b, sa, sb, bias, out_dtype)


def _high_precision_weight_grad(g: Tensor, x: Tensor, compute_dtype: torch.dtype, weight: Tensor) -> Tensor:
    # The compute dtype nn.Linear would use (autocast's, else the input's), then the weight's.
    return (g.t().to(compute_dtype) @ x.to(compute_dtype)).to(weight.dtype)


def _shaped(out: Tensor, out_shape: tuple[int, ...]) -> Tensor:
    # (M, N) -> (..., N) without handing autograd a view: FSDP2 (and in-place ops on the output)
    # treat a view output specially; detach() of the view is a fresh tensor on the same storage.
    return out.view(out_shape).detach()


class _Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        out_dtype: torch.dtype,
        quantize_wgrad: bool,
        out_shape: tuple[int, ...],
    ) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            xq, xs = _quantize_int8(x, 1)  # one scale per token
            wq, ws = _quantize_int8(weight, 1)  # one scale per output channel
            out = _int8_mm(xq, wq.t(), xs, ws, bias, out_dtype)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.out_dtype = out_dtype
        ctx.quantize_wgrad = quantize_wgrad
        return _shaped(out, out_shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_out = grad_out.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_b = None
        with torch.autocast(grad_out.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                gq, gs = _quantize_int8(grad_out, 1)  # per token: the sum runs over N
                wq, ws = _quantize_int8(weight, 0)  # per input column k: the sum runs over N
                grad_x = _int8_mm(gq, wq, gs, ws, None, x.dtype)
            if ctx.needs_input_grad[1]:
                if ctx.quantize_wgrad:
                    grad_w = _int8_weight_grad(grad_out, x, weight.dtype)
                else:
                    grad_w = _high_precision_weight_grad(grad_out, x, ctx.out_dtype, weight)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_out.sum(0, dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None


def _int8_weight_grad(g: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """dW = gᵀ x in int8 with per-column scales of g and x (the sum runs over tokens), in
    token chunks of at most MAX_K so the int32 accumulator cannot overflow."""
    m = g.shape[0]
    if m <= MAX_K:
        gq, gs = _quantize_int8(g, 0)
        xq, xs = _quantize_int8(x, 0)
        return _int8_mm(gq.t(), xq, gs, xs, None, dtype)
    total = torch.zeros((g.shape[1], x.shape[1]), dtype=torch.float32, device=g.device)
    for m0 in range(0, m, MAX_K):
        gq, gs = _quantize_int8(g[m0 : m0 + MAX_K], 0)
        xq, xs = _quantize_int8(x[m0 : m0 + MAX_K], 0)
        total += _int8_mm(gq.t(), xq, gs, xs, None, torch.float32)
    return total.to(dtype)


class _Fp8LinearFunction(torch.autograd.Function):
    """fp8 forward / backward; ``scaling`` "tensor", "row" (dynamic) or "delayed" (``state``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        out_dtype: torch.dtype,
        quantize_wgrad: bool,
        scaling: str,
        state: _DelayedScaling | None,
        out_shape: tuple[int, ...],
    ) -> Tensor:
        row = scaling == "row"
        amax_x = amax_w = None
        with torch.autocast(x.device.type, enabled=False):
            if state is not None:
                amax_x, amax_w = state.delayed_amax("x", x), state.delayed_amax("w", weight)
                xq, xs = state.cast("x", x, _E4M3, amax_x)
                wq, ws = state.cast("w", weight, _E4M3, amax_w)
            else:
                xq, xs = _quantize_fp8(x, _E4M3, 1 if row else None)  # xs: (M, 1) or ()
                wq, ws = _quantize_fp8(weight, _E4M3, 1 if row else None)  # ws: (N, 1) or ()
            out = _fp8_mm(xq, wq.t(), xs, ws.t(), bias, out_dtype)
        ctx.save_for_backward(x, weight, amax_x, amax_w)
        ctx.has_bias = bias is not None
        ctx.out_dtype = out_dtype
        ctx.quantize_wgrad = quantize_wgrad
        ctx.row = row
        ctx.state = state
        return _shaped(out, out_shape)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, amax_x, amax_w = ctx.saved_tensors
        grad_out = grad_out.reshape(-1, weight.shape[0])
        row, state = ctx.row, ctx.state
        grad_x = grad_w = grad_b = None
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.quantize_wgrad
        with torch.autocast(grad_out.device.type, enabled=False):
            if state is not None and (need_x or need_w):
                # One e5m2 cast of dY (one history update) serves both gradient GEMMs.
                gq, gs = state.cast("grad", grad_out, _E5M2, state.delayed_amax("grad", grad_out))
            if need_x:
                if state is not None:  # W with the forward's delayed scale: the forward's codes
                    wq, ws = _quantize_delayed(weight, _E4M3, amax_w)[:2]
                else:
                    gq, gs = _quantize_fp8(grad_out, _E5M2, 1 if row else None)  # (M, 1): per token
                    wq, ws = _quantize_fp8(weight, _E4M3, 0 if row else None)  # (1, K): per input column
                grad_x = _fp8_mm(gq, wq, gs, ws, None, x.dtype)
            if ctx.needs_input_grad[1]:
                if need_w:
                    if state is not None:
                        xq, xs = _quantize_delayed(x, _E4M3, amax_x)[:2]
                        grad_w = _fp8_mm(gq.t(), xq, gs, xs, None, weight.dtype)
                    else:
                        gq, gs = _quantize_fp8(grad_out, _E5M2, 0 if row else None)  # (1, N): per channel
                        xq, xs = _quantize_fp8(x, _E4M3, 0 if row else None)  # (1, K)
                        grad_w = _fp8_mm(gq.t(), xq, gs.t(), xs, None, weight.dtype)
                else:
                    grad_w = _high_precision_weight_grad(grad_out, x, ctx.out_dtype, weight)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = grad_out.sum(0, dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _quantize_delayed(x: Tensor, fp8_dtype: torch.dtype, amax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return dispatch("quantize_fp8_delayed", x.device, x.dtype)(x, fp8_dtype, amax)


class _DelayedScaling:
    """The amax histories of one layer (its buffers) and which operands have been seen.

    ``delayed_amax(op, t)``: the max of the history; on the operand's first use (empty history)
    the absmax of ``t`` itself, so step 1 is dynamic scaling. ``cast(op, t, dtype, amax)``:
    the delayed cast, then ``history = [absmax(t), history[:-1]]`` (device ops only, no sync);
    on the first use the older entries are zeroed, whatever the buffer held.
    """

    def __init__(self, module: LowPrecisionLinear) -> None:
        self.module = module
        self.seen = dict.fromkeys(_OPERANDS, False)

    def history(self, op: str) -> Tensor:
        return getattr(self.module, f"amax_history_{op}")

    def delayed_amax(self, op: str, t: Tensor) -> Tensor:
        if self.seen[op]:
            return self.history(op).amax()
        a = t.detach().abs().float()
        return torch.where(a < float("inf"), a, 0.0).amax() if t.numel() else a.new_zeros(())

    @torch.no_grad()
    def cast(self, op: str, t: Tensor, fp8_dtype: torch.dtype, amax: Tensor) -> tuple[Tensor, Tensor]:
        q, scale, amax_now = _quantize_delayed(t, fp8_dtype, amax)
        history = self.history(op)
        if not self.seen[op]:
            # Nothing older counts on the first use: after to_empty() (FSDP2's meta-device
            # init) the buffer holds uninitialized memory that reset_parameters() leaves alone.
            history.zero_()
        history.copy_(torch.cat([amax_now.view(1).to(history), history[:-1]]))
        self.seen[op] = True
        return q, scale


class LowPrecisionLinear(nn.Linear):
    """``nn.Linear`` with int8 or fp8 matmuls in forward and backward (module docstring).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear`` (the master weight's
            dtype: fp32, bf16 or fp16).
        precision: ``"int8"`` (row-wise absmax int8, int32 accumulation) or ``"fp8"`` (e4m3
            forward, e5m2 gradients).
        scaling: ``"row"`` (int8's only choice and its default) or ``"tensor"`` (fp8's default;
            torchao's tensor-wise recipe); fp8 also takes ``"row"`` and ``"delayed"``
            (tensor-wise scales from an amax history; module docstring).
        quantize_weight_grad: also compute dW in low precision (default False: dW in the
            compute dtype, SwitchBack's choice).
        amax_history_len: steps of absmax history per operand for ``scaling="delayed"``
            (default 16, Transformer Engine's and torchao's; >= 1; ignored otherwise).

    Buffers (``scaling="delayed"`` only, ``persistent=False`` so the state dict keys stay
    ``nn.Linear``'s): ``amax_history_x``, ``amax_history_w``, ``amax_history_grad``, fp32
    ``(amax_history_len,)``, newest first; they follow device moves but keep fp32 under
    ``.half()`` / ``.to(dtype)``.

    Input (..., in_features) in fp32/bf16/fp16; output (..., out_features) in the input's dtype,
    or autocast's dtype inside ``torch.autocast`` (like ``nn.Linear``). Parameters ``weight``
    (out, in) and ``bias`` (out,) are ordinary high-precision parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        precision: str = "int8",
        scaling: str | None = None,
        quantize_weight_grad: bool = False,
        amax_history_len: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_options(precision, scaling, in_features, out_features, amax_history_len)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.precision = precision
        self.scaling = scaling or _SCALINGS[precision][0]
        self.quantize_weight_grad = bool(quantize_weight_grad)
        self.amax_history_len = int(amax_history_len)
        self._delayed: _DelayedScaling | None = None
        if self.scaling == "delayed":
            self._init_delayed(device)

    def _init_delayed(self, device: torch.device | str | None) -> None:
        for op in _OPERANDS:
            history = torch.zeros(self.amax_history_len, dtype=torch.float32, device=device)
            self.register_buffer(f"amax_history_{op}", history, persistent=False)
        self._delayed = _DelayedScaling(self)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LowPrecisionLinear:
        # The amax histories follow every conversion (device moves, to_empty, share_memory_) except
        # a change of dtype: they stay fp32. Under .half() an absmax above 65504 would be stored
        # as inf, and the next amax_history_len steps would cast with scale inf: NaN outputs.
        histories = {
            name: buf
            for name, buf in self._buffers.items()
            if name.startswith("amax_history_") and buf is not None
        }
        super()._apply(fn, recurse)
        for name, old in histories.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        precision: str = "int8",
        scaling: str | None = None,
        quantize_weight_grad: bool = False,
        amax_history_len: int = 16,
    ) -> LowPrecisionLinear:
        """A LowPrecisionLinear that shares ``linear``'s weight and bias Parameters (so an
        optimizer built before the swap keeps updating them)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            precision=precision,
            scaling=scaling,
            quantize_weight_grad=quantize_weight_grad,
            amax_history_len=amax_history_len,
            device="meta",  # no allocation: the parameters are replaced right below
        )
        new.weight = linear.weight
        new.bias = linear.bias
        if new.scaling == "delayed":  # the histories live where the weight does
            new._init_delayed(linear.weight.device)
        return new

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear``, sharing this layer's weight and bias Parameters."""
        return to_dense(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"LowPrecisionLinear: input has {x.shape[-1]} features in its last dimension, "
                f"expected in_features={self.in_features}"
            )
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            out_dtype = torch.get_autocast_dtype(device_type)
        else:
            out_dtype = x.dtype
        if x.dtype not in _FLOAT_DTYPES or out_dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"LowPrecisionLinear: input dtype {x.dtype} (compute dtype {out_dtype}) is not supported; "
                "use float32, bfloat16 or float16"
            )
        x2 = x.reshape(-1, self.in_features)
        out_shape = (*x.shape[:-1], self.out_features)
        if self.precision == "int8":
            return _Int8LinearFunction.apply(
                x2, self.weight, self.bias, out_dtype, self.quantize_weight_grad, out_shape
            )
        return _Fp8LinearFunction.apply(
            x2,
            self.weight,
            self.bias,
            out_dtype,
            self.quantize_weight_grad,
            self.scaling,
            self._delayed,
            out_shape,
        )

    def extra_repr(self) -> str:
        delayed = f", amax_history_len={self.amax_history_len}" if self.scaling == "delayed" else ""
        return (
            f"{super().extra_repr()}, precision={self.precision}, scaling={self.scaling}, "
            f"quantize_weight_grad={self.quantize_weight_grad}{delayed}"
        )


def _check_options(
    precision: str, scaling: str | None, in_features: int, out_features: int, amax_history_len: int = 16
) -> None:
    if isinstance(amax_history_len, bool) or not isinstance(amax_history_len, int) or amax_history_len < 1:
        raise ValueError(f"amax_history_len must be an integer >= 1, got {amax_history_len!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if scaling is not None and scaling not in _SCALINGS[precision]:
        raise ValueError(
            f"scaling={scaling!r} is not available for precision={precision!r}; "
            f"choose one of {_SCALINGS[precision]}"
        )
    if precision == "int8" and max(in_features, out_features) > MAX_K:
        raise ValueError(
            f"int8 LowPrecisionLinear needs in_features and out_features <= {MAX_K} (the int32 accumulator "
            f"of the forward / input-gradient sums could overflow); got {in_features} x {out_features}"
        )


def to_dense(module: LowPrecisionLinear) -> nn.Linear:
    """The ``nn.Linear`` equivalent of ``module``, sharing its weight and bias Parameters."""
    if not isinstance(module, LowPrecisionLinear):
        raise TypeError(f"to_dense expects a LowPrecisionLinear, got {type(module).__name__}")
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = module.weight
    linear.bias = module.bias
    linear.train(module.training)
    return linear
