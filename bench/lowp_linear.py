"""Benchmark of the int8 / fp8 training linears against ``nn.Linear``.

``python -m lowmem.bench.lowp_linear --device cuda`` times forward and forward+backward of one
linear layer (default 4096 x 4096 at 8192 tokens on CUDA) for:

- ``dense``: ``nn.Linear`` in the baseline dtype (bf16 on CUDA, fp32 on CPU), the reference row;
- ``int8``: :class:`lowmem.nn.LowPrecisionLinear` int8 (forward and dX in int8, dW in the
  baseline dtype, SwitchBack's split), and ``int8+dW`` (dW in int8 too);
- ``fp8-tensor`` / ``fp8-row``: e4m3 forward, e5m2 gradients, tensor-wise or row-wise scales;
- ``fp8-delayed``: tensor-wise scales from an amax history (no absmax pass before each cast);

plus GEMM-only rows (``torch.mm`` in the baseline dtype, the Triton int8 GEMM, and on fp8 GPUs
``torch._scaled_mm`` next to the Triton fp8 GEMM, tensor-wise and row-wise e4m3, the ``speedup``
column relative to the ``mm`` row) and the int8 / fp8 quantizers (GB/s), so a GPU run shows where
the layer's time goes. The fp8 layers use whichever of ``torch._scaled_mm`` and the Triton GEMM
measured faster per problem size (:mod:`lowmem.kernels.fp8_matmul_select`); the run prints the
measurements behind that choice.

Columns: median ms (after warm-up, CUDA events around back-to-back calls), achieved TOPS
(``2*M*N*K`` per GEMM, three GEMMs for forward+backward), the peak the row's GEMM mix could reach
on this GPU (time at peak summed over its GEMMs, each at its precision's dense peak), the
fraction of it achieved, the speedup of forward+backward over ``dense`` in the same run, and the
SQNR (dB) of the layer's output against an fp32 computation. The target of issue 6 is >= 1.4x for
int8 over bf16 ``nn.Linear`` on an H100/H200.

CPU: int8 and fp8 are *emulated* in fp32 there (see :mod:`lowmem.nn.low_precision`), so on CPU
they are slower than ``nn.Linear`` by design; the CPU run uses a small shape and only shows the
harness works and the numerics (SQNR).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lowmem._ops import choose_backend, dispatch
from lowmem.bench.micro import median_ms
from lowmem.kernels.fp8_matmul import fp8_supported, scaled_mm_fallbacks
from lowmem.kernels.fp8_matmul_select import fp8_matmul_choices
from lowmem.kernels.fp8_quantize_triton import quantize_fp8_bytes
from lowmem.kernels.int8_matmul import int8_matmul_ops
from lowmem.kernels.quantize import quantize_bytes
from lowmem.nn.convert_low_precision import LowPrecisionReport, convert_to_low_precision
from lowmem.nn.low_precision import LowPrecisionLinear

# Dense tensor-core peaks in TOPS per operand precision (no sparsity); first match wins, so the
# PCIe entry precedes "H100". A100 has no fp8 tensor cores. Memory bandwidth in GB/s.
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "int8": 1513.0, "fp8": 1513.0, "gbs": 2000.0}),
    ("H100", {"bf16": 989.0, "int8": 1979.0, "fp8": 1979.0, "gbs": 3350.0}),
    ("H200", {"bf16": 989.0, "int8": 1979.0, "fp8": 1979.0, "gbs": 4800.0}),
    ("A100", {"bf16": 312.0, "int8": 624.0, "gbs": 2039.0}),
]
SHAPES = {"cuda": (8192, 4096, 4096), "cpu": (512, 512, 512)}  # (tokens, in_features, out_features)

# Per row: the precision of its (forward, dX, dW) GEMMs, for the mixed peak.
LAYERS: dict[str, tuple[dict, tuple[str, str, str]]] = {
    "dense": ({}, ("bf16", "bf16", "bf16")),
    "int8": ({"precision": "int8"}, ("int8", "int8", "bf16")),
    "int8+dW": ({"precision": "int8", "quantize_weight_grad": True}, ("int8", "int8", "int8")),
    "fp8-tensor": ({"precision": "fp8", "scaling": "tensor"}, ("fp8", "fp8", "bf16")),
    "fp8-row": ({"precision": "fp8", "scaling": "row"}, ("fp8", "fp8", "bf16")),
    "fp8-delayed": ({"precision": "fp8", "scaling": "delayed"}, ("fp8", "fp8", "bf16")),
}


@dataclass
class Row:
    name: str
    what: str  # "layer fwd+bwd", "layer fwd", "gemm", "quantize"
    shape: str
    backend: str
    median_ms: float
    tops: float | None
    peak_tops: float | None
    of_peak: float | None
    gbs: float | None
    speedup: float | None  # dense median / this median (same `what`)
    sqnr_db: float | None


def device_peaks(device: torch.device) -> dict[str, float]:
    """This GPU's peaks from :data:`PEAKS` (empty on CPU or an unknown GPU)."""
    if device.type != "cuda":
        return {}
    name = torch.cuda.get_device_name(device)
    return next((peaks for key, peaks in PEAKS if key in name), {})


def mixed_peak(flops_per_gemm: int, precisions: tuple[str, ...], peaks: dict[str, float]) -> float | None:
    """TOPS a sequence of equal-sized GEMMs reaches if each runs at its precision's peak."""
    if not all(p in peaks for p in precisions):
        return None
    seconds = sum(flops_per_gemm / (peaks[p] * 1e12) for p in precisions)
    return len(precisions) * flops_per_gemm / seconds / 1e12


def convert_bench_model(model: nn.Module, linear: str) -> LowPrecisionReport | None:
    """The ``--linear`` option of ``python -m lowmem.bench train``: ``"dense"`` leaves the model
    alone; ``"int8"`` / ``"fp8"`` swap every linear but ``lm_head`` (see
    :func:`lowmem.nn.convert_to_low_precision`) and return the report."""
    if linear == "dense":
        return None
    return convert_to_low_precision(model, precision=linear)


def _sqnr_db(truth: torch.Tensor, approx: torch.Tensor) -> float:
    truth, approx = truth.double(), approx.double()
    return 10 * math.log10(
        truth.square().sum().item() / (truth - approx).square().sum().clamp_min(1e-300).item()
    )


def _layer_backend(name: str, device: torch.device) -> str:
    if name == "dense":
        return "torch"
    if name.startswith("int8"):
        return choose_backend("int8_matmul", device)
    if not fp8_supported(device):
        return "emulated (no fp8 tensor cores)"
    chosen = choose_backend("fp8_matmul", device)  # "ref" / "triton" when forced
    return {"cuda": "fastest: _scaled_mm|triton"}.get(chosen, chosen)


def run(
    device: torch.device,
    tokens: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    budget_s: float,
) -> list[Row]:
    """All rows for one shape; see the module docstring."""
    m, k, n = tokens, in_features, out_features
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, generator=gen, device=device, dtype=dtype)
    gy = torch.randn(m, n, generator=gen, device=device, dtype=dtype)
    dense = nn.Linear(k, n, device=device, dtype=dtype)
    truth = torch.addmm(dense.bias.float(), x.float(), dense.weight.float().t())
    peaks = device_peaks(device)
    flops = int8_matmul_ops(m, n, k)
    shape = f"{m}x{k}->{n}"
    timing = {"budget_s": budget_s}
    high = "bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32"  # fp32 has no peak entry
    rows: list[Row] = []
    base: dict[str, float] = {}
    for name, (options, precisions) in LAYERS.items():
        precisions = tuple(high if p == "bf16" else p for p in precisions)
        layer = dense if name == "dense" else LowPrecisionLinear.from_linear(dense, **options)
        xg = x.detach().requires_grad_(True)
        params = [xg, layer.weight, layer.bias]

        def fwd(layer: nn.Module = layer) -> object:
            with torch.no_grad():
                return layer(x)

        def fwd_bwd(layer: nn.Module = layer, xg: torch.Tensor = xg, params: list = params) -> object:
            return torch.autograd.grad(layer(xg), params, gy)

        with torch.no_grad():
            sqnr = _sqnr_db(truth, layer(x).float())
        for what, fn, gemms in (("layer fwd", fwd, precisions[:1]), ("layer fwd+bwd", fwd_bwd, precisions)):
            ms = median_ms(fn, device, **timing)
            base.setdefault(what, ms)
            peak = mixed_peak(flops, gemms, peaks)
            tops = len(gemms) * flops / (ms * 1e-3) / 1e12
            rows.append(
                Row(name, what, shape, _layer_backend(name, device), ms, tops, peak,
                    tops / peak if peak else None, None, base[what] / ms, sqnr)
            )  # fmt: skip
    rows += _gemm_rows(x, dense.weight, device, peaks, flops, shape, timing, high)
    return rows


def _gemm_rows(
    x: torch.Tensor,
    w: torch.Tensor,
    device: torch.device,
    peaks: dict,
    flops: int,
    shape: str,
    timing: dict,
    high: str,
) -> list[Row]:
    """The bare GEMMs and the int8 quantizer, to split a layer row's time into its parts."""
    quantize = dispatch("quantize_int8", device, x.dtype)
    xq, xs = quantize(x, 1)
    wq, ws = quantize(w.detach(), 1)
    int8_mm = dispatch("int8_matmul", device)
    cases: list[tuple[str, str, Callable[[], object], str]] = [
        ("mm", "torch", lambda: x @ w.t(), high),
        (
            "int8_matmul",
            choose_backend("int8_matmul", device),
            lambda: int8_mm(xq, wq.t(), xs, ws, None, x.dtype),
            "int8",
        ),
    ]
    if fp8_supported(device):
        cases += _fp8_gemm_cases(x, w, device)
    rows: list[Row] = []
    base_ms = None
    with torch.no_grad():
        for name, backend, fn, precision in cases:
            try:
                ms = median_ms(fn, device, **timing)
            except RuntimeError as error:  # e.g. cuBLASLt rejecting a shape or scale layout
                # One rejected GEMM must not end the run (and waste a lent GPU's time): say why.
                print(f"{name}: rejected ({str(error).splitlines()[0][:160]})")
                continue
            base_ms = base_ms or ms
            tops = flops / (ms * 1e-3) / 1e12
            peak = peaks.get(precision)
            rows.append(
                Row(
                    name,
                    "gemm",
                    shape,
                    backend,
                    ms,
                    tops,
                    peak,
                    tops / peak if peak else None,
                    None,
                    base_ms / ms,
                    None,
                )
            )
        ms = median_ms(lambda: quantize(x, 1), device, **timing)
        nbytes = quantize_bytes(x.shape[0], x.shape[1], x.element_size())
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append(
            Row("quantize_int8 (x, per row)", "quantize", f"{x.shape[0]}x{x.shape[1]}",
                choose_backend("quantize_int8", device), ms, None, peaks.get("gbs"),
                gbs / peaks["gbs"] if "gbs" in peaks else None, gbs, None, None)
        )  # fmt: skip
        quantize_fp8 = dispatch("quantize_fp8", device, x.dtype)
        for dim, label in ((None, "tensor"), (1, "per row")):
            ms = median_ms(lambda dim=dim: quantize_fp8(x, torch.float8_e4m3fn, dim), device, **timing)
            gbs = quantize_fp8_bytes(x.shape[0], x.shape[1], x.element_size(), dim) / (ms * 1e-3) / 1e9
            rows.append(
                Row(f"quantize_fp8 (x, {label})", "quantize", f"{x.shape[0]}x{x.shape[1]}",
                    choose_backend("quantize_fp8", device, x.dtype), ms, None, peaks.get("gbs"),
                    gbs / peaks["gbs"] if "gbs" in peaks else None, gbs, None, None)
            )  # fmt: skip
    return rows


def _fp8_gemm_cases(x: torch.Tensor, w: torch.Tensor, device: torch.device) -> list:
    """``torch._scaled_mm`` and the Triton fp8 GEMM on the same e4m3 operands, tensor-wise and
    row-wise scales (the operand layouts each wants prepared outside the timed call)."""
    from lowmem.kernels.fp8_matmul_triton import fp8_matmul as triton_fp8

    quantize = dispatch("quantize_fp8", device, x.dtype)
    cases = []
    for label, dim in (("tensor", None), ("row", 1)):
        xf, xfs = quantize(x, torch.float8_e4m3fn, dim)
        wf, wfs = quantize(w.detach(), torch.float8_e4m3fn, dim)
        wf_cm, wfs_t = wf.t(), wfs.t()  # (K, N) column-major, as cuBLASLt wants it

        def scaled_mm(xf=xf, xfs=xfs, wf_cm=wf_cm, wfs_t=wfs_t) -> object:
            return torch._scaled_mm(xf, wf_cm, scale_a=xfs, scale_b=wfs_t.contiguous(), out_dtype=x.dtype)

        def triton(xf=xf, xfs=xfs, wf_cm=wf_cm, wfs_t=wfs_t) -> object:
            return triton_fp8(xf, wf_cm, xfs, wfs_t, None, x.dtype)

        cases.append((f"_scaled_mm e4m3 {label}", "torch", scaled_mm, "fp8"))
        cases.append((f"fp8_matmul e4m3 {label}", "triton", triton, "fp8"))
    return cases


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'row':<28}{'what':<15}{'backend':<32}{'ms':>9}{'TOPS':>9}{'peak':>8}{'of peak':>9}"
        f"{'GB/s':>8}{'speedup':>9}{'SQNR dB':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name:<28}{r.what:<15}{r.backend[:31]:<32}{r.median_ms:>9.3f}{_fmt(r.tops, '.3g'):>9}"
            f"{_fmt(r.peak_tops, '.0f'):>8}{_fmt(r.of_peak, '.0%'):>9}{_fmt(r.gbs, '.0f'):>8}"
            f"{_fmt(r.speedup, '.2f'):>9}{_fmt(r.sqnr_db, '.1f'):>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lowmem.bench.lowp_linear", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, help="rows of x (default 8192 on CUDA, 512 on CPU)")
    p.add_argument("--in-features", type=int, help="default 4096 on CUDA, 512 on CPU")
    p.add_argument("--out-features", type=int, help="default 4096 on CUDA, 512 on CPU")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="baseline dtype (bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--budget-s", type=float, default=2.0, help="time budget per measurement")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    m, k, n = SHAPES["cuda" if device.type == "cuda" else "cpu"]
    m, k, n = args.tokens or m, args.in_features or k, args.out_features or n
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cpu":
        print(
            "CPU: int8 and fp8 are emulated in fp32 (same numerics, no speed-up: slower than nn.Linear "
            "by design)."
        )
    else:
        print(f"GPU: {torch.cuda.get_device_name(device)}; peaks: {device_peaks(device) or 'unknown GPU'}")
    rows = run(device, m, k, n, dtype, args.budget_s)
    print(format_table(rows))
    if scaled_mm_fallbacks():
        print(f"torch._scaled_mm fell back to the emulation for: {scaled_mm_fallbacks()}")
    for key, measured in fp8_matmul_choices().items():
        print(f"fp8 GEMM choice for bucket {key}: {measured}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"device": str(device), "dtype": str(dtype), "rows": [asdict(r) for r in rows]}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
