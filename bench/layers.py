"""Benchmark of the memory-saving layers: SLTrain's ``SparseLowRankLinear`` against ``nn.Linear``.

``python -m lowmem.bench.layers [--device cpu|cuda] [--quick] [--json PATH]`` prints three tables:

1. **Time**: median forward+backward ms of ``nn.Linear`` and ``SparseLowRankLinear`` on the same
   input (default 2048 x 2048, rank 512, density 3%, 2048 tokens, fp32 on CPU; on CUDA 4096 x 4096,
   rank 1024, 2048 and 8192 tokens, bf16), and their ratio. Samples of the candidates are
   interleaved (A, B, A, B, ...) so a load change on a shared machine hits both. Where the
   dispatched backend is not the reference (Triton on CUDA; on CPU the compiled factorized path,
   labelled ``cpp factorized``, or ``cpp: rebuild W`` where its cost model rebuilds W instead), a
   row with ``lowmem.backend("ref")`` (W materialized with torch ops) is timed too, plus the
   build-W op alone with its bytes / FLOPs model.
2. **Saved for backward**: bytes packed by autograd (counted with
   ``torch.autograd.graph.saved_tensors_hooks``, each storage once) next to the budget "input
   activation + the layer's own parameters and index" and next to ``nn.Linear``'s.
3. **Parameters** of a LLaMA-style model (:mod:`lowmem.bench.model` presets) converted with
   :func:`sltrain_variant` (rank d/4, density 3%, attention and MLP linears) against the dense
   model.

``--quick`` shrinks everything (seconds; used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowmem._ops import backend as force_backend
from lowmem._ops import choose_backend, dispatch
from lowmem.kernels.sparse_low_rank import (
    sparse_low_rank_weight_bytes,
    sparse_low_rank_weight_flops,
)
from lowmem.nn.convert import ConversionReport, convert_to_sparse_low_rank
from lowmem.nn.sparse_low_rank import SparseLowRankLinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Shape:
    in_features: int
    out_features: int
    rank: int
    density: float
    tokens: int

    def __str__(self) -> str:
        size = f"{self.out_features}x{self.in_features}"
        return f"{size} r{self.rank} d{100 * self.density:g}% {self.tokens} tokens"


# (shapes, dtype, model preset) per mode and device type.
PRESETS: dict[str, dict[str, tuple[list[Shape], str, str]]] = {
    "full": {
        "cpu": ([Shape(2048, 2048, 512, 0.03, 2048)], "float32", "small"),
        "cuda": (
            [Shape(4096, 4096, 1024, 0.03, 2048), Shape(4096, 4096, 1024, 0.03, 8192)],
            "bfloat16",
            "small",
        ),
    },
    "quick": {
        "cpu": ([Shape(96, 64, 16, 0.03, 32)], "float32", "micro"),
        "cuda": ([Shape(512, 512, 128, 0.03, 256)], "bfloat16", "micro"),
    },
}


@dataclass
class TimeRow:
    shape: str
    dtype: str
    layer: str  # "nn.Linear", "SparseLowRankLinear[<backend>]", "build W[<backend>]"
    median_ms: float
    ratio: float  # median / nn.Linear's median (build-W rows: / the ref build's median)
    gbs: float | None = None
    tflops: float | None = None


@dataclass
class SavedRow:
    shape: str
    dtype: str
    layer: str
    saved_bytes: int
    input_bytes: int
    param_bytes: int  # the layer's parameters and buffers (the sparse index)
    within_budget: bool  # saved_bytes <= input_bytes + param_bytes


@dataclass
class ParamRow:
    preset: str
    rank: int
    density: float
    dense_params: int
    converted_params: int
    ratio: float
    index_bytes: int
    converted_layers: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int, iters: int, budget_s: float
) -> dict[str, float]:
    """Median ms per call of each fn, sampled round-robin (one call of each per round)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < iters and (rounds < 3 or time.perf_counter() - start < budget_s):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def _layers(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[nn.Linear, SparseLowRankLinear]:
    torch.manual_seed(0)
    dense = nn.Linear(shape.in_features, shape.out_features, device=device, dtype=dtype)
    sparse = SparseLowRankLinear(
        shape.in_features, shape.out_features, shape.rank, shape.density, seed=0, device=device, dtype=dtype
    )
    with torch.no_grad():
        sparse.B.normal_(0, 0.02)  # a trained layer's B is not 0; time the layer in that state
    return dense, sparse


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    return run


def time_rows(
    shape: Shape, dtype: torch.dtype, device: torch.device, *, warmup: int, iters: int, budget_s: float
) -> list[TimeRow]:
    """Forward+backward of nn.Linear vs SparseLowRankLinear (dispatched, and ref if different)."""
    dense, sparse = _layers(shape, dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(
        shape.tokens, shape.in_features, device=device, dtype=dtype, generator=gen
    ).requires_grad_()
    grad = torch.randn(shape.tokens, shape.out_features, device=device, dtype=dtype, generator=gen)
    # The layer runs the op sparse_low_rank_linear: on CPU its cpp backend (the factorized path,
    # or rebuilding W where its cost model prefers that); its ref rebuilds W with the build-W op's
    # backend (Triton on CUDA).
    build_backend = choose_backend("sparse_low_rank_weight", device, dtype)
    linear_backend = choose_backend("sparse_low_rank_linear", device, dtype)
    chosen = linear_backend if linear_backend != "ref" else build_backend
    label = chosen
    if linear_backend == "cpp":
        from lowmem.kernels.sparse_support import factorized_is_cheaper

        factorized = factorized_is_cheaper(
            shape.tokens, shape.out_features, shape.in_features, shape.rank, sparse.nnz
        )
        label = "cpp factorized" if factorized else "cpp: rebuild W"
    fns: dict[str, Callable[[], object]] = {
        "nn.Linear": _fwd_bwd(dense, x, grad),
        f"SparseLowRankLinear[{label}]": _fwd_bwd(sparse, x, grad),
    }
    if chosen != "ref":

        def with_ref() -> None:
            with force_backend("ref"):
                _fwd_bwd(sparse, x, grad)()

        fns["SparseLowRankLinear[ref]"] = with_ref
    medians = interleaved_medians(fns, device, warmup=warmup, iters=iters, budget_s=budget_s)
    dt = str(dtype).removeprefix("torch.")
    rows = [TimeRow(str(shape), dt, name, ms, ms / medians["nn.Linear"]) for name, ms in medians.items()]

    # The build-W op alone, with its bytes / FLOPs model (the GPU check: fused vs torch ops).
    args = (
        sparse.B.detach(),
        sparse.A.detach(),
        sparse.sparse_values.detach(),
        sparse.sparse_index,
        sparse.scale,
    )
    order = sparse._tile_order() if build_backend == "triton" else None
    built = dispatch("sparse_low_rank_weight", device, dtype)
    build_fns: dict[str, Callable[[], object]] = {}
    with force_backend("ref"):
        ref_build = dispatch("sparse_low_rank_weight", device, dtype)
    build_fns["build W[ref]"] = lambda: ref_build(*args)
    if build_backend != "ref":
        build_fns[f"build W[{build_backend}]"] = lambda: built(*args, order=order)
    build_ms = interleaved_medians(build_fns, device, warmup=warmup, iters=iters, budget_s=budget_s)
    m, n, r, nnz = shape.out_features, shape.in_features, shape.rank, sparse.nnz
    nbytes = sparse_low_rank_weight_bytes(
        m, n, r, nnz, sparse.B.element_size(), sparse.sparse_index.element_size()
    )
    flops = sparse_low_rank_weight_flops(m, n, r, nnz)
    for name, ms in build_ms.items():
        rows.append(
            TimeRow(
                str(shape), dt, name, ms, ms / build_ms["build W[ref]"], nbytes / ms / 1e6, flops / ms / 1e9
            )
        )
    return rows


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward in ``layer(x)``, each storage counted once."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values())


def saved_rows(shape: Shape, dtype: torch.dtype, device: torch.device) -> list[SavedRow]:
    """Saved-for-backward bytes of both layers against input + own parameters."""
    dense, sparse = _layers(shape, dtype, device)
    x = torch.randn(shape.tokens, shape.in_features, device=device, dtype=dtype, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    rows = []
    for name, layer in (("nn.Linear", dense), ("SparseLowRankLinear", sparse)):
        own = sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
        got = saved_bytes(layer, x)
        rows.append(
            SavedRow(
                str(shape),
                str(dtype).removeprefix("torch."),
                name,
                got,
                input_bytes,
                own,
                got <= input_bytes + own,
            )
        )
    return rows


def sltrain_variant(
    model: nn.Module, *, rank_fraction: float = 0.25, density: float = 0.03, seed: int = 0
) -> ConversionReport:
    """Convert a LLaMA-style model's attention and MLP linears to SLTrain layers, in place.

    Every ``nn.Linear`` but the ``lm_head`` becomes a :class:`SparseLowRankLinear` with rank
    ``round(rank_fraction * hidden)`` (hidden = ``model.config.hidden_size`` when present, else
    each layer's smaller side) and the given density; random SLTrain initialization, supports
    seeded ``seed, seed + 1, ...`` in module order. For ``bench/train.py --model-variant sltrain``.
    """
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)

    def rank_for(linear: nn.Linear) -> int:
        base = hidden if hidden is not None else min(linear.weight.shape)
        return max(1, min(round(rank_fraction * base), *linear.weight.shape))

    return convert_to_sparse_low_rank(model, rank_for, density, seed=seed)


def param_row(preset_name: str, density: float = 0.03, rank_fraction: float = 0.25) -> ParamRow:
    """Parameter count of a bench LLaMA preset before and after :func:`sltrain_variant`."""
    from lowmem.bench.model import PRESETS as MODEL_PRESETS
    from lowmem.bench.model import build_model

    preset = MODEL_PRESETS[preset_name]
    model = build_model(preset, seq_len=128, seed=0)
    report = sltrain_variant(model, rank_fraction=rank_fraction, density=density)
    return ParamRow(
        preset_name,
        round(rank_fraction * preset.hidden_size),
        density,
        report.params_before,
        report.params_after,
        report.param_ratio,
        report.index_bytes,
        len(report.converted),
    )


def format_tables(times: list[TimeRow], saved: list[SavedRow], params: list[ParamRow]) -> str:
    lines = [
        f"{'shape':<38} {'dtype':<9} {'layer':<36} {'median ms':>10} {'ratio':>7} {'GB/s':>8} {'GFLOP/s':>9}"
    ]
    for r in times:
        gbs = f"{r.gbs:8.1f}" if r.gbs is not None else f"{'':>8}"
        gfl = f"{r.tflops * 1e3:9.1f}" if r.tflops is not None else f"{'':>9}"
        lines.append(
            f"{r.shape:<38} {r.dtype:<9} {r.layer:<36} {r.median_ms:10.2f} {r.ratio:7.3f} {gbs} {gfl}"
        )
    lines.append("")
    lines.append(
        f"{'shape':<38} {'layer':<20} {'saved MB':>9} {'input MB':>9} {'params MB':>10} {'<= in+params':>13}"
    )
    for s in saved:
        lines.append(
            f"{s.shape:<38} {s.layer:<20} {s.saved_bytes / 1e6:9.2f} {s.input_bytes / 1e6:9.2f} "
            f"{s.param_bytes / 1e6:10.2f} {s.within_budget!s:>13}"
        )
    lines.append("")
    lines.append(
        f"{'model':<8} {'rank':>5} {'density':>8} {'dense params':>13} {'SLTrain params':>15} {'ratio':>7}"
    )
    for p in params:
        lines.append(
            f"{p.preset:<8} {p.rank:>5} {p.density:>8.2f} {p.dense_params:>13,} {p.converted_params:>15,} "
            f"{p.ratio:>7.3f}   (+{p.index_bytes:,} index bytes, {p.converted_layers} layers converted)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m lowmem.bench.layers [--device D] [--quick] [--json P]``."""
    parser = argparse.ArgumentParser(prog="python -m lowmem.bench.layers", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="device to time on (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="override the preset's dtype")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (seconds); for tests")
    parser.add_argument("--iters", type=int, default=15, help="timed rounds per measurement (max)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--budget-s", type=float, default=20.0, help="time cap per measurement (s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    shapes, dtype_name, model_preset = PRESETS["quick" if args.quick else "full"][
        "cuda" if device.type == "cuda" else "cpu"
    ]
    dtype = DTYPES[args.dtype or dtype_name]
    times: list[TimeRow] = []
    saved: list[SavedRow] = []
    for shape in shapes:
        times += time_rows(shape, dtype, device, warmup=args.warmup, iters=args.iters, budget_s=args.budget_s)
        saved += saved_rows(shape, dtype, device)
    params = [param_row(model_preset)]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"lowmem layer benchmark on {device_name} (torch {torch.__version__}, {torch.get_num_threads()} CPU "
        "threads); forward+backward median ms, samples interleaved; ratio = median / nn.Linear's median "
        "(build W rows: / the ref build's)"
    )
    print(format_tables(times, saved, params))
    if args.json:
        meta = {"device": device_name, "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch.")}
        data = {
            "meta": meta,
            "time": [asdict(r) for r in times],
            "saved": [asdict(r) for r in saved],
            "params": [asdict(r) for r in params],
        }
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
