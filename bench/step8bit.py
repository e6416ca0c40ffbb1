"""``python -m lowmem.bench step8bit``: one 8-bit AdamW step over a small LLaMA's weights, on CPU.

Times, on the same weights and gradients (a LLaMA-style parameter set: token embedding, per
layer q/k/v/o and gate/up/down projections and two RMSNorm weights, a final norm and an untied
LM head; the default is about 61M parameters, close to GaLore's "LLaMA 60M"):

- ``lowmem``: ``lowmem.optim.AdamW8bit`` (``min_8bit_size=0``: every tensor 8-bit), whose step
  hands all tensors to one ``adamw8bit_multi`` op (on CPU one call of the compiled C++ kernel,
  ``csrc/adamw8bit.cpp``, whose threads split the blocks of every tensor);
- ``torch-fused``: ``torch.optim.AdamW(fused=True)``, fp32 states: the speed target;
- ``torch-foreach``: ``torch.optim.AdamW()`` with its default (foreach) implementation;
- ``bnb``: ``bitsandbytes.optim.AdamW8bit`` on CPU tensors, when bitsandbytes is importable.
  Its CPU path is far slower than the others, so it is timed separately, for ``--bnb-repeats``
  steps after one warm-up step, not in the interleaved rounds;
- ``torchao``: ``torchao.optim.AdamW8bit``, when torchao is importable (timed like bnb).

The fast optimizers run in interleaved rounds (one step of each per round) so the machine's
drifts hit all alike; rows report the median and minimum step time, the ratio of medians to
``torch-fused`` measured in the same run, and optimizer-state bytes per parameter (every tensor
in the optimizer's state: codes, absmax, maps, step counters). Gradients are shared between the
optimizers (none of them writes to a gradient); each has its own copy of the weights.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowmem._ops import choose_backend

HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
FAST = ("lowmem", "torch-fused", "torch-foreach")
SLOW = ("bnb", "torchao")


def llama_shapes(vocab: int, hidden: int, intermediate: int, layers: int) -> list[tuple[int, ...]]:
    """Weight shapes of a LLaMA-style decoder (untied embedding and head, no biases)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4  # q, k, v, o
        shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]  # gate, up, down
        shapes += [(hidden,), (hidden,)]  # the two RMSNorm weights
    shapes += [(hidden,), (vocab, hidden)]  # final norm, LM head
    return shapes


def _import_reason(module: str) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken optional dependency
        return f"{module} is not importable ({type(error).__name__}: {error})"
    return None


def make_optimizer(name: str, params: list[torch.nn.Parameter]) -> Any:
    """The optimizer ``name`` over ``params``, or a string saying why it is unavailable."""
    torch_kw = {
        "lr": HYPER["lr"],
        "betas": (HYPER["beta1"], HYPER["beta2"]),
        "eps": HYPER["eps"],
        "weight_decay": HYPER["weight_decay"],
    }
    if name == "lowmem":
        from lowmem.optim import AdamW8bit

        # min_8bit_size=0: every tensor 8-bit, the norms too, so all rows time the same work.
        return AdamW8bit(params, min_8bit_size=0, **torch_kw)
    if name == "torch-fused":
        return torch.optim.AdamW(params, fused=True, **torch_kw)
    if name == "torch-foreach":
        return torch.optim.AdamW(params, foreach=True, **torch_kw)
    if name == "bnb":
        reason = _import_reason("bitsandbytes")
        if reason:
            return reason
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **torch_kw)
    if name == "torchao":
        reason = _import_reason("torchao.optim")
        if reason:
            return reason
        from torchao.optim import AdamW8bit

        return AdamW8bit(params, **torch_kw)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(FAST + SLOW)}")


def state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _timed(step: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    shapes = llama_shapes(args.vocab, args.hidden, args.intermediate, args.layers)
    gen = torch.Generator().manual_seed(0)
    init = [(torch.randn(s, generator=gen) * 0.02).to(device, dtype) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device, dtype) for s in shapes]
    numel = sum(t.numel() for t in init)
    names = [n for n in args.optimizers.split(",") if n]
    results: dict[str, Any] = {
        "settings": vars(args).copy(),
        "params": numel,
        "tensors": len(shapes),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "lowmem_backend": choose_backend("adamw8bit_multi", device, dtype),
        "rows": [],
        "skipped": {},
    }
    optimizers: dict[str, Any] = {}
    for name in names:
        params = [torch.nn.Parameter(w.clone()) for w in init]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt = make_optimizer(name, params)
        if isinstance(opt, str):
            results["skipped"][name] = opt
            print(f"  {name}: skipped ({opt})", flush=True)
            continue
        optimizers[name] = opt

    times: dict[str, list[float]] = {name: [] for name in optimizers}
    # On a GPU every implementation is fast enough to interleave; on CPU bnb / torchao are not.
    fast = [n for n in optimizers if n in FAST or device.type == "cuda"]
    for name in fast:
        for _ in range(args.warmup):
            optimizers[name].step()
    # Interleaved rounds, one step of each optimizer per round: slow drifts of the machine (other
    # jobs, clocks) hit every optimizer alike, and each finds its tensors out of cache, as after
    # a forward and backward pass.
    for _ in range(args.repeats):
        for name in fast:
            times[name].append(_timed(optimizers[name].step, device))
    for name in (n for n in optimizers if n not in fast):
        optimizers[name].step()  # warm-up (allocates states)
        for _ in range(args.slow_repeats):
            times[name].append(_timed(optimizers[name].step, device))

    base = statistics.median(times["torch-fused"]) if "torch-fused" in times else None
    for name, opt in optimizers.items():
        median = statistics.median(times[name])
        row = {
            "optimizer": name,
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * min(times[name]),
            "repeats": len(times[name]),
            "interleaved": name in fast,
            "ratio_to_torch_fused": median / base if base else None,
            "state_bytes": state_bytes(opt),
            "state_bytes_per_param": state_bytes(opt) / numel,
        }
        results["rows"].append(row)
    return results


def format_table(results: dict[str, Any]) -> str:
    header = ("optimizer", "median ms", "min ms", "n", "/ torch-fused", "state B/param")
    lines = [f"{header[0]:<14} {header[1]:>10} {header[2]:>9} {header[3]:>3} {header[4]:>14} {header[5]:>14}"]
    for r in results["rows"]:
        ratio = f"{r['ratio_to_torch_fused']:.2f}x" if r["ratio_to_torch_fused"] is not None else "-"
        note = "" if r["interleaved"] else "  (timed apart)"
        lines.append(
            f"{r['optimizer']:<14} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['repeats']:>3} "
            f"{ratio:>14} {r['state_bytes_per_param']:>14.3f}{note}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lowmem.bench step8bit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--optimizers",
        default="lowmem,torch-fused,torch-foreach,bnb,torchao",
        help=f"comma list of: {', '.join(FAST + SLOW)}",
    )
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each fast optimizer")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds")
    parser.add_argument("--slow-repeats", type=int, default=2, help="timed steps of bnb / torchao")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (the target's setting) or cuda")
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = llama_shapes(args.vocab, args.hidden, args.intermediate, args.layers)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"8-bit AdamW step: {numel / 1e6:.1f}M parameters in {len(shapes)} tensors (LLaMA-style, hidden "
        f"{args.hidden}, {args.layers} layers, vocab {args.vocab}), {args.dtype}, {args.device}, "
        f"{torch.get_num_threads()} threads; "
        f"lowmem backend: {choose_backend('adamw8bit_multi', args.device)}",
        flush=True,
    )
    results = run(args)
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
