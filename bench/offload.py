"""``python -m lowmem.bench.offload``: activation memory and step time of the tiny LLaMA at a long sequence.

Rows, each a fresh model from the same seed trained on the same batch:

- ``none``: plain forward + backward.
- ``checkpoint``: every decoder layer checkpointed (``apply_checkpointing(offload=False)``).
- ``offload``: the step inside ``offload_activations()``: every saved activation in host memory.
- ``offload-checkpoint``: checkpointed layers whose kept inputs are offloaded, inside the same
  offload context (the embedding and LM-head activations outside the layers go to host too).
- ``partial-F`` (``--fractions``): offloaded checkpointing that also offloads a fraction F of each
  layer's op outputs and replays them instead of recomputing (:class:`lowmem.memory.PartialRecompute`).
- ``tokenwise-F`` (``--tokenwise``): MEMO's token-wise split of each MLP
  (:func:`lowmem.memory.apply_tokenwise_recompute`): the first F of the tokens keep their MLP
  activations in host memory, the rest are recomputed in backward; attention and norms are not
  split (attention mixes tokens) and, like every other saved tensor of the step, go to host
  through the same offload context.

Measured per row: the median step time after warm-up (rows interleaved round by round, so drifts of
a shared machine hit every row alike) and its ratio to ``none`` in the same run; the bytes of saved
tensors still resident on the compute device after the forward, counted by saved-tensor hooks
(:class:`lowmem.memory.SavedTensorCounter`, parameters and the batch excluded); on CUDA the peak
``torch.cuda.max_memory_allocated`` of a step above what was allocated before it; and whether the
loss and every gradient equal the ``none`` row's bit for bit.

On a CPU-only machine activations already live in host memory, so offload would change nothing;
there the offload rows run with ``emulate_device=True`` (CPU tensors treated as device tensors:
copied to separate host buffers and back), which measures the bookkeeping and copy cost and the
bytes that would stay on a device. ``--quick`` runs the micro preset at a short sequence (a test).

Also per row: the bytes copied to host in one step (``host MiB``) and the recompute FLOPs of
backward (``recompute GF``: backward FLOPs counted by ``torch.utils.flop_counter`` minus the
``none`` row's), so the token-wise rows show host bytes rising and recompute falling with F. The
``exact`` column says ``yes`` when loss and gradients equal the ``none`` row's bit for bit, else the
largest gradient difference relative to that gradient's largest entry (token-wise rows: the
weight gradient is summed over tokens in two parts, a rounding difference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowmem.bench.model import PRESETS, build_model, language_model_loss
from lowmem.memory import (
    ActivationOffload,
    SavedTensorCounter,
    apply_checkpointing,
    apply_tokenwise_recompute,
    offload_activations,
)

BASE_MODES = ("none", "checkpoint", "offload", "offload-checkpoint")


def _decoder_layer_type() -> type[nn.Module]:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return LlamaDecoderLayer


def _mlp_type() -> type[nn.Module]:
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP


def wrap_forward(
    model: nn.Module,
    mode: str,
    *,
    emulate_device: bool = False,
    min_bytes: int | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``loss_fn(windows)``: the bench model's loss (``language_model_loss``) under technique ``mode``.

    ``mode`` is one of ``none``, ``checkpoint``, ``offload``, ``offload-checkpoint``,
    ``partial-F`` or ``tokenwise-F`` (F in [0, 1]). Checkpointing (or the token-wise split of the
    MLPs) is applied to ``model`` once, here; the returned function enters the offload context
    around each forward (call ``.backward()`` on its result as usual: the hooks recorded in forward
    bring the tensors back). The engine is reachable as ``loss_fn.offloader`` (its ``stats``), the
    checkpointing or token-wise handle as ``loss_fn.handle``.
    """
    options: dict[str, Any] = {"emulate_device": emulate_device, "keep": model}
    if min_bytes is not None:
        options["min_bytes"] = min_bytes
    offloader: ActivationOffload | None = None
    handle = None
    if mode == "none":
        pass
    elif mode == "checkpoint":
        handle = apply_checkpointing(model, block_types=(_decoder_layer_type(),), offload=False)
    elif mode == "offload":
        offloader = offload_activations(**options)
    elif mode == "offload-checkpoint" or mode.startswith("partial-"):
        fraction = 0.0 if mode == "offload-checkpoint" else _fraction(mode)
        offloader = offload_activations(**options)
        handle = apply_checkpointing(
            model,
            block_types=(_decoder_layer_type(),),
            offload=True,
            offloader=offloader,
            offload_fraction=fraction,
        )
    elif mode.startswith("tokenwise-"):
        offloader = offload_activations(**options)
        handle = apply_tokenwise_recompute(
            model, _mlp_type(), offload_fraction=_fraction(mode), offloader=offloader
        )
    else:
        raise ValueError(
            f"unknown mode {mode!r}; choose one of {', '.join(BASE_MODES)}, partial-F or tokenwise-F"
        )

    def loss_fn(windows: torch.Tensor) -> torch.Tensor:
        with offloader if offloader is not None else contextlib.nullcontext():
            return language_model_loss(model, windows)

    loss_fn.offloader = offloader  # type: ignore[attr-defined]
    loss_fn.handle = handle  # type: ignore[attr-defined]
    return loss_fn


def _fraction(mode: str) -> float:
    kind, _, number = mode.partition("-")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"mode {mode!r}: {kind}-F needs a number F in [0, 1], e.g. {kind}-0.5") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"mode {mode!r}: F must be in [0, 1]")
    return value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident_saved_bytes(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, batch: torch.Tensor
) -> tuple[int, int]:
    """(saved bytes, saved bytes still alive after the forward) of one step, parameters excluded."""
    offloader = getattr(loss_fn, "offloader", None)
    # The counter must be the innermost hooks, inside the offload context, to see what it does; so
    # the forward runs here rather than through loss_fn (which would push the engine on top of it).
    with offloader if offloader is not None else contextlib.nullcontext():
        with SavedTensorCounter(exclude=[model, batch]) as counter:
            loss = language_model_loss(model, batch)
    device_type = batch.device.type
    result = counter.saved_bytes(device_type), counter.alive_bytes(device_type)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return result


def _backward_flops(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, batch: torch.Tensor
) -> int:
    """FLOPs of one step's backward (``torch.utils.flop_counter``: matmuls and attention),
    recomputation included."""
    from torch.utils.flop_counter import FlopCounterMode

    loss = loss_fn(batch)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every mode; returns the JSON-able results (also printed as a table)."""
    device = torch.device(args.device)
    preset = PRESETS[args.preset]
    emulate = device.type == "cpu" and not args.no_emulate
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
    modes = list(BASE_MODES) + [f"partial-{f:g}" for f in args.fractions]
    modes += [f"tokenwise-{f:g}" for f in args.tokenwise]
    models: dict[str, nn.Module] = {}
    loss_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for mode in modes:
        model = build_model(preset, args.seq_len, seed=0).to(device).train()
        models[mode] = model
        loss_fns[mode] = wrap_forward(model, mode, emulate_device=emulate, min_bytes=args.min_bytes)

    def step(mode: str) -> tuple[float, list[torch.Tensor]]:
        models[mode].zero_grad(set_to_none=True)
        loss = loss_fns[mode](batch)
        loss.backward()
        return loss.item(), [p.grad for p in models[mode].parameters()]

    results: dict[str, dict[str, Any]] = {m: {} for m in modes}
    for mode in modes:  # warm-up, partial-recompute plans, and the exactness check
        for _ in range(args.warmup):
            step(mode)
        loss, grads = step(mode)
        results[mode]["loss"] = loss
        results[mode]["grads"] = grads
    base = results["none"]
    base_grads = base["grads"]
    for mode in modes:
        r = results[mode]
        grads = r.pop("grads")
        r["exact"] = r["loss"] == base["loss"] and all(
            torch.equal(a, b) for a, b in zip(grads, base_grads, strict=True)
        )
        r["grad_rel_diff"] = max(
            ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for a, b in zip(grads, base_grads, strict=True)
        )
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode in modes:
            _sync(device)
            start = time.perf_counter()
            step(mode)
            _sync(device)
            times[mode].append(time.perf_counter() - start)
    for mode in modes:
        r = results[mode]
        r["step_s"] = statistics.median(times[mode])
        r["saved_bytes"], r["resident_bytes"] = _resident_saved_bytes(loss_fns[mode], models[mode], batch)
        if device.type == "cuda":
            _sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(mode)
            _sync(device)
            r["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        offloader = getattr(loss_fns[mode], "offloader", None)
        before = offloader.stats.copied_bytes if offloader is not None else 0
        r["backward_flops"] = _backward_flops(loss_fns[mode], models[mode], batch)
        r["host_bytes"] = (offloader.stats.copied_bytes if offloader is not None else 0) - before
        if offloader is not None:
            r["copied_bytes"] = offloader.stats.copied_bytes
    for mode in modes:
        r = results[mode]
        r["time_ratio"] = r["step_s"] / results["none"]["step_s"]
        r["resident_ratio"] = r["resident_bytes"] / max(results["none"]["resident_bytes"], 1)
        r["recompute_flops"] = r["backward_flops"] - results["none"]["backward_flops"]
    settings = vars(args).copy()
    settings["emulate_device"] = emulate
    return {"settings": settings, "rows": results}


def _table(out: dict[str, Any]) -> str:
    rows = out["rows"]
    cuda = any("cuda_peak_bytes" in r for r in rows.values())
    head = f"{'mode':<20}{'step ms':>10}{'x none':>8}{'resident MiB':>14}{'x none':>8}"
    head += f"{'host MiB':>10}{'recompute GF':>14}"
    head += f"{'cuda peak MiB':>15}" if cuda else ""
    head += f"{'exact':>7}"
    lines = [head, "-" * len(head)]
    mib = 1 / 2**20
    for mode, r in rows.items():
        line = f"{mode:<20}{r['step_s'] * 1e3:>10.1f}{r['time_ratio']:>8.2f}"
        line += f"{r['resident_bytes'] * mib:>14.2f}{r['resident_ratio']:>8.3f}"
        line += f"{r['host_bytes'] * mib:>10.2f}{r['recompute_flops'] / 1e9:>14.3f}"
        if cuda:
            line += f"{r['cuda_peak_bytes'] * mib:>15.1f}"
        line += f"{'yes' if r['exact'] else format(r['grad_rel_diff'], '.0e'):>7}"
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m lowmem.bench.offload", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.5], help="partial-recompute rows")
    parser.add_argument(
        "--tokenwise",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 0.75],
        help="token-wise (MEMO) rows: the fraction of tokens whose MLP activations are offloaded",
    )
    parser.add_argument("--min-bytes", type=int, default=None, help="offload_activations(min_bytes=)")
    parser.add_argument("--no-emulate", action="store_true", help="on CPU, do not emulate a device")
    parser.add_argument("--quick", action="store_true", help="micro preset, short sequence (for tests)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table; returns 0."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.preset, args.seq_len, args.batch_size, args.repeats, args.warmup = "micro", 32, 1, 1, 1
    for name in ("seq_len", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    out = run(args)
    s = out["settings"]
    print(
        f"preset {s['preset']}, batch {s['batch_size']} x seq {s['seq_len']}, device {s['device']}"
        + (" (emulated device: CPU tensors copied as if on an accelerator)" if s["emulate_device"] else "")
    )
    print(_table(out))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
