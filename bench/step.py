"""``python -m lowmem.bench step``: one optimizer step, lowmem's low-rank optimizers vs the research code.

Pairs compared (ratio = ours / theirs, same run): ``lowmem-randomized`` and ``lowmem-svd``
(GaLoreAdamW) vs ``galore-torch``; ``fira`` vs ``fira-package``; ``apollo`` vs ``apollo-torch``
(channel-wise, random projection). ``adamw`` and ``apollo-mini`` are shown for scale.

Times the steady-state step (no projector refresh) and the refresh step (every step refreshes:
``update_proj_gap=1``) on ``--weights`` square weights of ``--size``, rank ``--rank``, with
the same gradients and equal weight decay for every optimizer, and prints medians and the
ratios against galore-torch measured in the same run. Also counts optimizer-state bytes.

The default (4 × 1024×1024, rank 128) is the issue's target setting. On a GPU (``--device
cuda``) timings use ``torch.cuda.synchronize`` around each step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowmem.optim import APOLLO_MINI, ApolloAdamW, FiraAdamW, GaLoreAdamW

#: Which research-code optimizer each of ours is timed against.
BASELINE_OF = {
    "lowmem-randomized": "galore-torch",
    "lowmem-svd": "galore-torch",
    "fira": "fira-package",
    "apollo": "apollo-torch",
}


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "ortho_matrix"):  # galore-torch keeps its basis in a Python object
                basis = value.ortho_matrix
                for t in basis if isinstance(basis, list) else [basis]:
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
    return total


def _make_optimizer(
    name: str, params: list[torch.nn.Parameter], args: argparse.Namespace, gap: int
) -> torch.optim.Optimizer | None:
    lowrank = {"rank": args.rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    if name == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if name.startswith("lowmem-"):
        projector = name.removeprefix("lowmem-")
        group = {"params": params, **lowrank, "projector": projector}
        return GaLoreAdamW([group], lr=args.lr, weight_decay=args.weight_decay)
    apollo_keys = {**lowrank, "scale": 1.0, "scale_type": "channel", "proj": "random"}
    if name == "fira":
        return FiraAdamW([{"params": params, **lowrank}], lr=args.lr, weight_decay=args.weight_decay)
    if name == "apollo":
        return ApolloAdamW([{"params": params, **apollo_keys}], lr=args.lr, weight_decay=args.weight_decay)
    if name == "apollo-mini":
        group = {"params": params, **lowrank, **APOLLO_MINI}
        return ApolloAdamW([group], lr=args.lr, weight_decay=args.weight_decay)
    if name in ("fira-package", "apollo-torch"):
        try:
            if name == "fira-package":
                from fira import FiraAdamW as Research
            else:
                from apollo_torch import APOLLOAdamW as Research
        except Exception:
            return None
        keys = dict(lowrank, alpha=lowrank.pop("scale")) if name == "fira-package" else apollo_keys
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Research([{"params": params, **keys}], lr=args.lr, weight_decay=args.weight_decay)
    if name == "galore-torch":
        try:
            from galore_torch import GaLoreAdamW as ResearchGaLoreAdamW
        except Exception:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ResearchGaLoreAdamW(
                [{"params": params, **lowrank}], lr=args.lr, weight_decay=args.weight_decay
            )
    raise ValueError(f"unknown optimizer {name!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    init = [torch.randn(args.size, args.size, generator=gen) * 0.02 for _ in range(args.weights)]
    # Gradients with a decaying spectrum, like real ones, so rank-r captures most of them.
    grads = []
    for _ in range(args.weights):
        u = torch.linalg.qr(torch.randn(args.size, args.size, generator=gen)).Q
        s = torch.logspace(0, -3, args.size)
        grads.append((u * s) @ torch.linalg.qr(torch.randn(args.size, args.size, generator=gen)).Q.t())

    results: dict[str, Any] = {"settings": vars(args).copy(), "rows": []}
    names = args.optimizers.split(",")
    for mode, gap, warmup, repeats in (
        ("steady", 10**9, 2, args.repeats),
        ("refresh", 1, 1, args.refresh_repeats),
    ):
        optimizers: dict[str, torch.optim.Optimizer] = {}
        for name in names:
            if name == "adamw" and mode == "refresh":
                continue
            params = [torch.nn.Parameter(w.to(device=device, dtype=dtype)) for w in init]
            for p, g in zip(params, grads, strict=True):
                p.grad = g.to(device=device, dtype=dtype)
            opt = _make_optimizer(name, params, args, gap)
            if opt is None:
                if mode == "steady":
                    print(f"  {name}: not installed, skipped (pip install 'lowmem[anchors]')")
                continue
            optimizers[name] = opt
        for opt in optimizers.values():
            _time_steps(opt.step, device, warmup, 0)
        # Interleaved rounds, one step of each optimizer per round, so that the machine's slow
        # drifts (other jobs, clock changes) hit every optimizer alike and the ratios stay fair.
        times: dict[str, list[float]] = {name: [] for name in optimizers}
        for _ in range(repeats):
            for name, opt in optimizers.items():
                times[name] += _time_steps(opt.step, device, 0, 1)
        for name, opt in optimizers.items():
            row = {
                "optimizer": name,
                "mode": mode,
                "median_ms": 1e3 * statistics.median(times[name]),
                "min_ms": 1e3 * min(times[name]),
                "repeats": repeats,
                "state_bytes": _state_bytes(opt),
            }
            results["rows"].append(row)
            print(
                f"  {name:<18} {mode:<8} median {row['median_ms']:9.2f} ms  (min {row['min_ms']:.2f}, "
                f"n={repeats})  state {row['state_bytes'] / 2**20:.2f} MiB",
                flush=True,
            )
        del optimizers
    return results


def _ratio_table(results: dict[str, Any]) -> list[str]:
    by_key = {(r["optimizer"], r["mode"]): r for r in results["rows"]}
    lines = []
    for mode in ("steady", "refresh"):
        for (name, row_mode), row in by_key.items():
            base = by_key.get((BASELINE_OF.get(name, ""), mode))
            if row_mode == mode and base is not None:
                ratio = row["median_ms"] / base["median_ms"]
                lines.append(f"  {mode:<8} {name:<18} / {base['optimizer']:<13} = {ratio:.3f}x")
        # The refresh target compares our randomized refresh with galore-torch's SVD one.
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowmem.bench step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--optimizers",
        default="lowmem-randomized,lowmem-svd,galore-torch,adamw",
        help="comma list of: adamw, lowmem-randomized, lowmem-svd, galore-torch, fira, fira-package, "
        "apollo, apollo-torch, apollo-mini",
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--weights", type=int, default=4)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=40, help="timed steady-state steps")
    parser.add_argument("--refresh-repeats", type=int, default=5, help="timed refresh steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    args = parser.parse_args(argv)
    print(
        f"optimizer step: {args.weights} x {args.size}x{args.size}, rank {args.rank}, {args.dtype}, "
        f"{args.device}, {torch.get_num_threads()} threads"
    )
    results = run(args)
    lines = _ratio_table(results)
    if lines:
        print("ratios (median step time, same run):")
        print("\n".join(lines))
    results["ratios"] = lines
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
