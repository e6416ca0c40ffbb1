"""Micro-benchmarks of the fused optimizer ops against the unfused PyTorch they replace.

``python -m lowmem.bench micro`` (or ``python -m lowmem.bench.micro``) times, for each op, the
implementation :func:`lowmem._ops.dispatch` picks on the device (Triton on CUDA, the reference
on CPU unless ``LOWMEM_BACKEND`` says otherwise) and the unfused PyTorch baseline, in the same
run, and prints one row per (op, implementation):

- ``adamw`` on N elements; baseline: ``torch.optim.AdamW``'s single-tensor op sequence
  (:func:`lowmem.kernels.adamw.adamw_ref`, ~10 separate elementwise kernels).
- ``adam_direction`` on N elements; baseline: :func:`adam_direction_ref`.
- ``adamw8bit`` on N elements (8-bit block-wise states); baseline: :func:`adamw8bit_ref`.
- ``lowrank_update`` on an m x n weight with rank r, in GaLore's three orientations (Zhao et al.
  2024; see :mod:`lowmem.kernels.lowrank_update`); baseline: what galore-torch effectively does,
  ``upd = scale * (a @ b)`` (an m x n temporary), ``W.add_(upd, alpha=-lr)``, then
  ``W.add_(W, alpha=-lr * wd)`` (W read and written twice more). For "full", ``b = N @ Q`` is
  computed inside the timed region in both paths. Where the dispatched backend is not the
  reference (Triton on CUDA), a third row times the reference ``W.addmm_(a, b, beta=, alpha=)``,
  one BLAS GEMM with a beta term, which is the honest competitor of the fused kernel.

Columns: median ms per call (after warm-up; CUDA events around 10 back-to-back calls on GPU,
``perf_counter`` per call on CPU), the op's bytes
and FLOPs model (the same model for both rows: the useful work, so GB/s compares directly), the
achieved GB/s and TFLOP/s, the hardware peak where known, the speedup over the baseline, and the
ratio to the best alternative (median / fastest other implementation of the same op and shape;
below 1 means this one wins). ``--sizes sweep`` repeats everything over three sizes, from
launch-bound to bandwidth-bound. The same ops run as pytest-benchmark suites:
``pytest bench --benchmark-enable --benchmark-only`` (``bench/bench_kernels.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from lowmem._ops import choose_backend, dispatch
from lowmem.kernels.adamw import (
    adam_direction_bytes,
    adam_direction_flops,
    adam_direction_ref,
    adamw_bytes,
    adamw_flops,
    adamw_ref,
)
from lowmem.kernels.adamw8bit import adamw8bit_bytes, adamw8bit_flops, adamw8bit_ref
from lowmem.kernels.blockwise_quant import quantize_blockwise
from lowmem.kernels.lowrank_update import lowrank_update_bytes, lowrank_update_flops, lowrank_update_ref

# Dense peaks per device-name substring (first match wins, so the PCIe entry precedes "H100").
# GB/s of HBM; TFLOP/s per dtype without sparsity (fp32 is the non-tensor-core rate, which is
# what an ieee-precision fp32 tl.dot gets).
HARDWARE_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"gbs": 2000.0, "bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("H100", {"gbs": 3350.0, "bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H200", {"gbs": 4800.0, "bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"gbs": 2039.0, "bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
]

# (numel for the elementwise ops, (m, n, rank) for lowrank_update), per preset and device type.
SIZES: dict[str, dict[str, tuple[int, tuple[int, int, int]]]] = {
    "small": {"cpu": (4096, (96, 64, 8)), "cuda": (1 << 20, (1024, 1024, 64))},
    "default": {"cpu": (1 << 22, (1024, 1024, 128)), "cuda": (1 << 26, (4096, 4096, 256))},
}
# ``--sizes sweep``: every op over a range of sizes, smallest (launch-bound) to largest (bandwidth-bound).
SWEEP: dict[str, list[tuple[int, tuple[int, int, int]]]] = {
    "cpu": [(1 << 16, (256, 256, 32)), (1 << 20, (512, 512, 64)), (1 << 22, (1024, 1024, 128))],
    "cuda": [(1 << 20, (1024, 1024, 64)), (1 << 24, (2048, 2048, 128)), (1 << 26, (4096, 4096, 256))],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ORIENTATIONS = ("right", "left", "full")
LR, BETA1, BETA2, EPS, WD, SCALE = 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.25


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    backend: str
    median_ms: float
    bytes: int
    flops: int
    gbs: float
    tflops: float
    peak_gbs: float | None
    peak_tflops: float | None
    speedup: float  # unfused baseline median / this median (1.0 for the baseline row)
    vs_best_other: float = float("nan")  # this median / the fastest *other* row of the same op and shape


def hardware_peaks(device: torch.device, dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(peak GB/s, peak dense TFLOP/s for ``dtype``) of ``device`` if known, else ``(None, None)``."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, peaks in HARDWARE_PEAKS:
        if key in name:
            return peaks["gbs"], peaks.get(str(dtype).removeprefix("torch."))
    return None, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    iters: int = 30,
    budget_s: float = 2.0,
    calls_per_sample: int = 10,
) -> float:
    """Median time of one ``fn()`` call in ms over up to ``iters`` samples (at least 3; stops
    past ``budget_s``).

    On CUDA each sample brackets ``calls_per_sample`` back-to-back calls with CUDA events, so
    the GPU queue stays full and the number is the sustained per-call time (host launch cost
    counts only where it exceeds the kernel's); on CPU each sample is one ``perf_counter`` call.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters and (len(times) < 3 or time.perf_counter() - start < budget_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls_per_sample):
                fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / calls_per_sample)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rows(
    op: str,
    shape: str,
    dtype: torch.dtype,
    device: torch.device,
    nbytes: int,
    flops: int,
    timings: list[tuple[str, float]],
) -> list[Row]:
    """Rows for one op; ``timings[0]`` is the baseline the others' speedups refer to."""
    peak_gbs, peak_tflops = hardware_peaks(device, dtype)
    base_ms = timings[0][1]

    def vs_best_other(index: int) -> float:
        others = [ms for i, (_, ms) in enumerate(timings) if i != index]
        return timings[index][1] / min(others) if others else float("nan")

    return [
        Row(
            op=op,
            shape=shape,
            dtype=str(dtype).removeprefix("torch."),
            backend=backend,
            median_ms=ms,
            bytes=nbytes,
            flops=flops,
            gbs=nbytes / (ms * 1e-3) / 1e9,
            tflops=flops / (ms * 1e-3) / 1e12,
            peak_gbs=peak_gbs,
            peak_tflops=peak_tflops,
            speedup=base_ms / ms,
            vs_best_other=vs_best_other(index),
        )
        for index, (backend, ms) in enumerate(timings)
    ]


def _time_all(
    op: str,
    device: torch.device,
    unfused: Callable[[], object],
    dispatched: Callable[[], object],
    ref: Callable[[], object] | None,
    **timing: float,
) -> list[tuple[str, float]]:
    """[("unfused", ms), ("ref", ms) if the dispatched backend is not the reference, (backend, ms)].

    For the elementwise ops the unfused baseline *is* the reference, so no separate ref row.
    """
    backend_name = choose_backend(op, device)
    timings = [("unfused", median_ms(unfused, device, **timing))]
    if ref is not None and backend_name != "ref":
        timings.append(("ref", median_ms(ref, device, **timing)))
    timings.append((backend_name, median_ms(dispatched, device, **timing)))
    return timings


def bench_adamw(numel: int, dtype: torch.dtype, device: torch.device, **timing: float) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(0)
    fused = dispatch("adamw", device)
    kw = {"lr": LR, "beta1": BETA1, "beta2": BETA2, "eps": EPS, "weight_decay": WD, "step": 10.0}

    def tensors() -> list[torch.Tensor]:
        g = torch.randn(numel, generator=gen, device=device).to(dtype)
        return [torch.randn(numel, generator=gen, device=device).to(dtype), g, g * 0.1, g * g]

    t_fused, t_base = tensors(), tensors()
    timings = _time_all(
        "adamw", device, lambda: adamw_ref(*t_base, **kw), lambda: fused(*t_fused, **kw), None, **timing
    )
    size = torch.tensor([], dtype=dtype).element_size()
    return _rows("adamw", f"N={numel}", dtype, device, adamw_bytes(numel, size), adamw_flops(numel), timings)


def bench_adam_direction(numel: int, dtype: torch.dtype, device: torch.device, **timing: float) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(1)
    fused = dispatch("adam_direction", device)
    kw = {"beta1": BETA1, "beta2": BETA2, "eps": EPS, "step": 10.0}

    def tensors() -> list[torch.Tensor]:
        g = torch.randn(numel, generator=gen, device=device).to(dtype)
        return [g, g * 0.1, g * g]

    t_fused, t_base = tensors(), tensors()
    out = torch.empty_like(t_fused[0])
    timings = _time_all(
        "adam_direction",
        device,
        lambda: adam_direction_ref(*t_base, **kw),
        lambda: fused(*t_fused, out=out, **kw),
        None,
        **timing,
    )
    size = torch.tensor([], dtype=dtype).element_size()
    return _rows(
        "adam_direction",
        f"N={numel}",
        dtype,
        device,
        adam_direction_bytes(numel, size),
        adam_direction_flops(numel),
        timings,
    )


def bench_adamw8bit(numel: int, dtype: torch.dtype, device: torch.device, **timing: float) -> list[Row]:
    """8-bit block-wise AdamW (Dettmers et al. 2022); baseline: the reference (dequantize, torch
    math, requantize), the unfused way to do it."""
    gen = torch.Generator(device=device).manual_seed(2)
    fused = dispatch("adamw8bit", device, dtype)
    kw = {"lr": LR, "beta1": BETA1, "beta2": BETA2, "eps": EPS, "weight_decay": WD, "step": 10.0}

    def tensors() -> list[torch.Tensor]:
        p = torch.randn(numel, generator=gen, device=device).to(dtype)
        g = torch.randn(numel, generator=gen, device=device).to(dtype)
        m_codes, m_absmax = quantize_blockwise(g * 0.1, signed=True)
        v_codes, v_absmax = quantize_blockwise(g * g, signed=False)
        return [p, g, m_codes, m_absmax, v_codes, v_absmax]

    t_fused, t_base = tensors(), tensors()
    timings = _time_all(
        "adamw8bit",
        device,
        lambda: adamw8bit_ref(*t_base, **kw),
        lambda: fused(*t_fused, **kw),
        None,
        **timing,
    )
    size = torch.tensor([], dtype=dtype).element_size()
    return _rows(
        "adamw8bit",
        f"N={numel}",
        dtype,
        device,
        adamw8bit_bytes(numel, size),
        adamw8bit_flops(numel),
        timings,
    )


def _factors(orientation: str, m: int, n: int, r: int, dtype, device, gen) -> Callable[[], tuple]:
    """A closure returning (a, b) for ``orientation``; "full" forms ``N @ Q`` on every call."""

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) / math.sqrt(shape[-1])).to(dtype)

    if orientation == "right":  # a = N (m x r), b = Q (r x n)
        a, b = randn(m, r), randn(r, n)
        return lambda: (a, b)
    if orientation == "left":  # a = P (m x r), b = N (r x n)
        a, b = randn(m, r), randn(r, n)
        return lambda: (a, b)
    p, n_low, q = randn(m, r), randn(r, r), randn(r, n)  # "full": a = P, b = N @ Q
    return lambda: (p, n_low @ q)


def bench_lowrank_update(
    m: int, n: int, r: int, orientation: str, dtype: torch.dtype, device: torch.device, **timing: float
) -> list[Row]:
    gen = torch.Generator(device=device).manual_seed(2)
    fused = dispatch("lowrank_update", device)
    factors = _factors(orientation, m, n, r, dtype, device, gen)
    w_fused = torch.randn(m, n, generator=gen, device=device).to(dtype)
    w_base = w_fused.clone()

    def run_fused() -> None:
        a, b = factors()
        fused(w_fused, a, b, alpha=-LR * SCALE, beta=1 - LR * WD)

    def run_unfused() -> None:  # galore-torch: project back, scale, add, then decay (all m x n)
        a, b = factors()
        update = (a @ b) * SCALE
        w_base.add_(update, alpha=-LR)
        w_base.add_(w_base, alpha=-LR * WD)

    w_ref = w_fused.clone()

    def run_ref() -> None:  # one cuBLAS / BLAS GEMM with beta: already fused on its own
        a, b = factors()
        lowrank_update_ref(w_ref, a, b, alpha=-LR * SCALE, beta=1 - LR * WD)

    timings = _time_all("lowrank_update", device, run_unfused, run_fused, run_ref, **timing)
    size = torch.tensor([], dtype=dtype).element_size()
    return _rows(
        f"lowrank_update/{orientation}",
        f"{m}x{n} r={r}",
        dtype,
        device,
        lowrank_update_bytes(m, n, r, size),
        lowrank_update_flops(m, n, r),
        timings,
    )


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    header = [
        "op",
        "shape",
        "dtype",
        "backend",
        "median ms",
        "bytes",
        "FLOPs",
        "GB/s",
        "TFLOP/s",
        "peak GB/s",
        "peak TFLOP/s",
        "speedup",
        "vs best other",
    ]
    body = [
        [
            r.op,
            r.shape,
            r.dtype,
            r.backend,
            f"{r.median_ms:.4f}",
            f"{r.bytes:.3e}",
            f"{r.flops:.3e}",
            f"{r.gbs:.1f}",
            f"{r.tflops:.3f}",
            _fmt(r.peak_gbs, ".0f"),
            _fmt(r.peak_tflops, ".0f"),
            f"{r.speedup:.2f}x",
            f"{r.vs_best_other:.2f}x",
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(
    device: torch.device, dtype: torch.dtype, sizes: str, *, iters: int = 30, budget_s: float = 2.0
) -> list[Row]:
    """All rows for one device / dtype / size preset (``"sweep"``: every size of :data:`SWEEP`)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    points = SWEEP[kind] if sizes == "sweep" else [SIZES[sizes][kind]]
    timing = {"iters": iters, "budget_s": budget_s}
    rows: list[Row] = []
    for numel, (m, n, r) in points:
        rows += bench_adamw(numel, dtype, device, **timing)
        rows += bench_adam_direction(numel, dtype, device, **timing)
        rows += bench_adamw8bit(numel, dtype, device, **timing)
        for orientation in ORIENTATIONS:
            rows += bench_lowrank_update(m, n, r, orientation, dtype, device, **timing)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m lowmem.bench.micro [--device D] [--dtype T] [--sizes S] [--json P]``."""
    parser = argparse.ArgumentParser(prog="python -m lowmem.bench micro", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to time on (default: cuda if available, else cpu)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tensor dtype")
    parser.add_argument(
        "--sizes",
        choices=[*sorted(SIZES), "sweep"],
        default="default",
        help="size preset; 'default' finishes in well under a minute on 2 CPU cores; 'sweep' runs 3 sizes",
    )
    parser.add_argument("--iters", type=int, default=30, help="timed calls per measurement (max)")
    parser.add_argument("--budget-s", type=float, default=2.0, help="time cap per measurement (s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows (and run metadata) as JSON")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    rows = run(device, DTYPES[args.dtype], args.sizes, iters=args.iters, budget_s=args.budget_s)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"lowmem micro-benchmarks on {device_name} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads); speedup = unfused median / median; "
        "vs best other = median / fastest other implementation of the same op and shape"
    )
    print(format_table(rows))
    if args.json:
        meta = {"device": device_name, "torch": torch.__version__, "dtype": args.dtype, "sizes": args.sizes}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
