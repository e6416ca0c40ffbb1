"""``python -m lowmem.bench.offload_optim``: the host step of CPUOffloadOptimizer vs torch's fused AdamW.

Issue target (CPU, 2 threads, ratios measured in the same run): the host update over a small
LLaMA's fp32 weights (``bench.step8bit.llama_shapes``; 61.2M parameters in 84 tensors by default,
GaLore's "LLaMA 60M") takes at most 1.1x ``torch.optim.AdamW(fused=True)`` with fp32 states and
at most 1.5x with 8-bit states. Rows, all on the same gradients:

- ``torch-fused``: ``torch.optim.AdamW(fused=True).step()`` on the weights themselves: the baseline.
- ``offload-fp32 host``: ``CPUOffloadOptimizer(params, torch.optim.AdamW)``'s inner step alone,
  on the fp32 masters (the default host path: torch's fused C++ kernel, see below).
- ``offload-fp32 step``: its whole ``step()``: gathering the host gradients, the host update and
  the copy of the new weights back to the "device" (here the CPU: a memcpy per tensor; on a GPU
  that copy is a PCIe transfer, and the gradient copies happen during backward, not here).
- ``offload-8bit host`` / ``offload-8bit step``: the same with ``lowmem.optim.AdamW8bit``
  (8-bit block-wise states, the C++ kernel of ``csrc/adamw8bit.cpp``, one op call per tensor).
- ``adamw8bit-multi``: ``adamw8bit_cpu_multi``, the same kernel stepping all tensors in one op
  call, for comparison with the per-tensor calls of ``AdamW8bit``.

Why the fp32 host path is torch's kernel and not a ``csrc/`` one: an AdamW step reads weight,
gradient and two moments and writes three (28 bytes per parameter in fp32), and torch's fused
CPU kernel moves them at about the speed of a plain ``torch.add`` (12 bytes per element) on
this machine: it is memory-bound, so a hand-written kernel has nothing left to win.

Optimizers run in interleaved rounds (one timed step of each per round), so drifts of a shared
machine hit all alike; rows give the median and minimum, and the ratio of medians to
``torch-fused``.

A second table times whole training steps (forward, backward, ``step()``, ``zero_grad()``) of an
MLP stack (``--mlp-width`` × ``--mlp-depth`` linear layers with GELU) with and without
``update_in_backward=True``, which runs each parameter's host update on a worker thread during the
rest of backward: ``offload-fp32 train`` / ``offload-fp32 overlap train`` and the same for 8-bit
states, with the ratio of each overlapped row to its non-overlapped twin, and a check that both
reach bitwise-equal weights. On a CPU-only machine the "device" and the host share the same cores,
so the overlap can only win where backward leaves cores idle; on a GPU the backward runs on the
device and the whole host update can hide behind it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowmem.bench.step8bit import HYPER, llama_shapes, state_bytes

ROWS = (
    "torch-fused",
    "offload-fp32 host",
    "offload-fp32 step",
    "offload-8bit host",
    "offload-8bit step",
    "adamw8bit-multi",
)
#: Issue 5's targets for the host update, as ratios to torch-fused.
TARGETS = {"offload-fp32 host": 1.1, "offload-8bit host": 1.5}
QUICK = {
    "vocab": 300,
    "hidden": 16,
    "intermediate": 40,
    "layers": 1,
    "warmup": 1,
    "repeats": 2,
    "mlp_width": 24,
    "mlp_depth": 2,
    "mlp_batch": 4,
}
#: Whole training steps of an MLP stack, without and with ``update_in_backward=True``.
TRAIN_ROWS = (
    "offload-fp32 train",
    "offload-fp32 overlap train",
    "offload-8bit train",
    "offload-8bit overlap train",
)


def _torch_kwargs() -> dict[str, Any]:
    return {
        "lr": HYPER["lr"],
        "betas": (HYPER["beta1"], HYPER["beta2"]),
        "eps": HYPER["eps"],
        "weight_decay": HYPER["weight_decay"],
    }


def _params(init: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(w.clone()) for w in init]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return params


class _Multi8bit:
    """Just enough of an optimizer around ``adamw8bit_cpu_multi`` to time it (one op call per step)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        from lowmem.kernels.blockwise_quant import blockwise_zeros

        self.params = params
        self.state = {}
        for p in params:
            m, m_absmax = blockwise_zeros(p.shape, True, p.device)
            v, v_absmax = blockwise_zeros(p.shape, False, p.device)
            self.state[p] = {
                "exp_avg": m,
                "exp_avg_absmax": m_absmax,
                "exp_avg_sq": v,
                "exp_avg_sq_absmax": v_absmax,
            }
        self.steps = 0

    def step(self) -> None:
        from lowmem.kernels.adamw8bit_cpu import adamw8bit_cpu_multi

        self.steps += 1
        states = [self.state[p] for p in self.params]
        adamw8bit_cpu_multi(
            [p.data for p in self.params],
            [p.grad for p in self.params],
            *(
                [s[key] for s in states]
                for key in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax")
            ),
            step=float(self.steps),
            **HYPER,
        )


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build every row's optimizer on the same weights and gradients, time interleaved rounds."""
    from lowmem.memory import CPUOffloadOptimizer
    from lowmem.optim import AdamW8bit

    shapes = llama_shapes(args.vocab, args.hidden, args.intermediate, args.layers)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    numel = sum(t.numel() for t in init)
    wanted = [name for name in args.rows.split(",") if name]
    unknown = set(wanted) - set(ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {', '.join(ROWS)}")

    offload: dict[str, CPUOffloadOptimizer] = {}
    fns: dict[str, Callable[[], Any]] = {}
    states: dict[str, Any] = {}
    for name in wanted:
        if name == "torch-fused":
            opt = torch.optim.AdamW(_params(init, grads), fused=True, **_torch_kwargs())
            fns[name], states[name] = opt.step, opt
        elif name == "adamw8bit-multi":
            multi = _Multi8bit(_params(init, grads))
            fns[name], states[name] = multi.step, multi
        else:
            kind = name.split()[0]
            if kind not in offload:
                cls = torch.optim.AdamW if kind == "offload-fp32" else AdamW8bit
                offload[kind] = CPUOffloadOptimizer(_params(init, grads), cls, **_torch_kwargs())
            opt = offload[kind]
            states[name] = opt
            if name.endswith("step"):
                fns[name] = opt.step
            else:

                def host_step(opt: CPUOffloadOptimizer = opt) -> None:
                    opt.inner.step()

                fns[name] = host_step

    times: dict[str, list[float]] = {name: [] for name in fns}
    for rnd in range(args.warmup + args.repeats):
        for name, fn in fns.items():
            if name.endswith("host"):
                offload[name.split()[0]]._gather_grads()  # untimed: the masters' .grad, as step() sets it
            elapsed = _timed(fn)
            if rnd >= args.warmup:
                times[name].append(elapsed)

    base = statistics.median(times["torch-fused"]) if "torch-fused" in times else None
    rows = []
    for name in fns:
        median = statistics.median(times[name])
        ratio = median / base if base else None
        target = TARGETS.get(name)
        rows.append(
            {
                "row": name,
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(times[name]),
                "repeats": len(times[name]),
                "ratio_to_torch_fused": ratio,
                "target": target,
                "meets_target": None if target is None or ratio is None else ratio <= target,
                "host_state_bytes_per_param": state_bytes(states[name]) / numel,
            }
        )
    return {
        "settings": vars(args).copy(),
        "params": numel,
        "tensors": len(shapes),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _mlp(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def run_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time forward + backward + ``step()`` + ``zero_grad()`` of every train row, interleaved rounds."""
    from lowmem.memory import CPUOffloadOptimizer
    from lowmem.optim import AdamW8bit

    gen = torch.Generator().manual_seed(1)
    rounds = args.warmup + args.repeats
    shape = (args.mlp_batch, args.mlp_width)
    batches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(rounds)]
    models: dict[str, torch.nn.Module] = {}
    opts: dict[str, CPUOffloadOptimizer] = {}
    for name in TRAIN_ROWS:
        models[name] = _mlp(args.mlp_width, args.mlp_depth)
        cls = torch.optim.AdamW if name.startswith("offload-fp32") else AdamW8bit
        opts[name] = CPUOffloadOptimizer(
            models[name].parameters(), cls, update_in_backward="overlap" in name, **_torch_kwargs()
        )

    times: dict[str, list[float]] = {name: [] for name in TRAIN_ROWS}
    for rnd, (x, y) in enumerate(batches):
        for name in TRAIN_ROWS:
            model, opt = models[name], opts[name]

            def train_step(
                model: torch.nn.Module = model,
                opt: CPUOffloadOptimizer = opt,
                x: torch.Tensor = x,
                y: torch.Tensor = y,
            ) -> None:
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()

            elapsed = _timed(train_step)
            if rnd >= args.warmup:
                times[name].append(elapsed)

    rows = []
    for name in TRAIN_ROWS:
        twin = name.replace(" overlap", "")
        median = statistics.median(times[name])
        same = all(
            torch.equal(a, b)
            for a, b in zip(models[name].parameters(), models[twin].parameters(), strict=True)
        )
        rows.append(
            {
                "row": name,
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(times[name]),
                "repeats": len(times[name]),
                "ratio_to_no_overlap": median / statistics.median(times[twin]),
                "weights_equal_no_overlap": same,
            }
        )
    return rows


def format_train_table(rows: list[dict[str, Any]]) -> str:
    """The train rows as a fixed-width table."""
    header = f"{'row':<27} {'median ms':>10} {'min ms':>9} {'n':>3} {'/ no overlap':>13}"
    lines = [f"{header} {'same weights':>13}"]
    for r in rows:
        lines.append(
            f"{r['row']:<27} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['repeats']:>3} "
            f"{r['ratio_to_no_overlap']:>12.2f}x {r['weights_equal_no_overlap']!s:>13}"
        )
    return "\n".join(lines)


def format_table(results: dict[str, Any]) -> str:
    """The rows as a fixed-width table."""
    header = f"{'row':<19} {'median ms':>10} {'min ms':>9} {'n':>3} {'/ torch-fused':>14} {'target':>8}"
    lines = [f"{header} {'state B/param':>14}"]
    for r in results["rows"]:
        ratio = f"{r['ratio_to_torch_fused']:.2f}x" if r["ratio_to_torch_fused"] is not None else "-"
        target = (
            "-" if r["target"] is None else f"<={r['target']}x " + ("ok" if r["meets_target"] else "MISS")
        )
        lines.append(
            f"{r['row']:<19} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['repeats']:>3} {ratio:>14} "
            f"{target:>8} {r['host_state_bytes_per_param']:>14.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the rows, print the table (and write JSON if asked); returns 0."""
    parser = argparse.ArgumentParser(
        prog="python -m lowmem.bench.offload_optim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of: {', '.join(ROWS)}")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=11, help="timed interleaved rounds")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads (the target's setting: 2)"
    )
    parser.add_argument("--mlp-width", type=int, default=1024, help="train table: width of the MLP stack")
    parser.add_argument("--mlp-depth", type=int, default=8, help="train table: linear layers in the stack")
    parser.add_argument("--mlp-batch", type=int, default=64, help="train table: rows per batch")
    parser.add_argument(
        "--tables", default="host,train", help="comma list of: host (the host step), train (overlap)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model and 2 rounds (for tests)")
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    tables = [name for name in args.tables.split(",") if name]
    if not tables or set(tables) - {"host", "train"}:
        raise SystemExit(f"--tables: {args.tables!r}; choose from host, train")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": args.threads, "rows": [], "train_rows": []}
    try:
        if "host" in tables:
            shapes = llama_shapes(args.vocab, args.hidden, args.intermediate, args.layers)
            numel = sum(torch.Size(s).numel() for s in shapes)
            print(
                f"CPUOffloadOptimizer host step: {numel / 1e6:.1f}M fp32 parameters in {len(shapes)} "
                f"tensors (LLaMA-style, hidden {args.hidden}, {args.layers} layers), "
                f"{torch.get_num_threads()} threads",
                flush=True,
            )
            results.update(run(args))
            print(format_table(results))
        if "train" in tables:
            mlp_params = args.mlp_depth * (args.mlp_width + 1) * args.mlp_width
            print(
                f"CPUOffloadOptimizer train step (forward, backward, step, zero_grad) of an MLP stack: "
                f"{args.mlp_depth} x Linear({args.mlp_width}, {args.mlp_width}), {mlp_params / 1e6:.1f}M "
                f"parameters, batch {args.mlp_batch}, {torch.get_num_threads()} threads",
                flush=True,
            )
            results["train_rows"] = run_train(args)
            print(format_train_table(results["train_rows"]))
    finally:
        torch.set_num_threads(previous)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
