"""One training run of the benchmark: one optimizer, one seed.

The run is paired across optimizers: ``seed`` fixes the model's initial weights, the order of the
training batches (a CPU ``torch.Generator``) and the global RNG that randomized projectors may use,
so two optimizers with the same seed see identical starting points and data.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from lowmem.bench.corpus import ByteCorpus, sample_windows
from lowmem.bench.measure import (
    StepTimer,
    median_after_warmup,
    optimizer_state_bytes,
    parameter_bytes,
    profiled_peak_bytes,
    tensor_bytes,
)
from lowmem.bench.model import ModelPreset, build_model, evaluate, language_model_loss
from lowmem.bench.optimizers import OptimizerSettings, build_optimizer, split_lowrank_params
from lowmem.bench.techniques import Technique


@dataclass(frozen=True)
class RunConfig:
    """Everything about a run except the optimizer and the seed.

    The schedule is a linear warm-up over ``warmup_fraction`` of the steps, then a cosine decay to
    ``min_lr_ratio`` of the peak; gradients are clipped to a global norm of ``grad_clip``.
    """

    preset: ModelPreset
    steps: int
    batch_size: int
    seq_len: int
    device: torch.device
    eval_every: int = 0
    eval_batch_size: int = 32
    grad_clip: float = 1.0
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    timing_warmup: int = 5
    final_loss_window: int = 10


def lr_multiplier(step: int, total: int, warmup_fraction: float, min_ratio: float) -> float:
    """LambdaLR factor at ``step`` (0-based): linear warm-up to 1, then cosine down to ``min_ratio``."""
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    grad_clip: float,
    optimizer_timer: StepTimer | None = None,
    techniques: tuple[Technique, ...] = (),
) -> float:
    with contextlib.ExitStack() as stack:
        for technique in techniques:
            if technique.step_context is not None:
                stack.enter_context(technique.step_context())
        loss = language_model_loss(model, batch)
        loss.backward()
    if not any(t.layerwise for t in techniques):  # layer-wise: clipped per parameter, in backward
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if optimizer_timer is None:
        optimizer.step()
    else:
        with optimizer_timer:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_one(
    optimizer_name: str,
    settings: OptimizerSettings,
    corpus: ByteCorpus,
    val_windows: torch.Tensor,
    config: RunConfig,
    seed: int,
    log: Callable[[str], None] = print,
    techniques: tuple[Technique, ...] = (),
    progress: Callable[[int], None] | None = None,
    measure_peak: bool = True,
) -> dict[str, Any]:
    """Train a fresh model with one optimizer and return its measurements as a JSON-able dict.

    ``techniques`` (:mod:`lowmem.bench.techniques`) convert the fresh model's layers, wrap every
    step, or make the optimizer layer-wise. ``progress(step)`` is called after every step (the
    harness's progress bar); without it the run logs its loss four times. ``measure_peak=False``
    skips the CPU peak-memory step (a profiled step costs seconds; the peak does not depend on the
    seed, so the harness measures it on the first seed only): ``peak_memory_bytes`` is then None.

    Keys: ``seed``, ``train_loss`` (mean of the last ``final_loss_window`` step losses),
    ``val_loss``, ``val_ppl``, ``step_time_s`` / ``optimizer_step_time_s`` (medians after
    ``timing_warmup`` steps), ``step_time_mean_s`` (includes projector refreshes),
    ``param_bytes``, ``optimizer_state_bytes``, ``target_state_bytes`` (state of the projected
    target-module weights only), ``peak_memory_bytes``, ``peak_memory_method``,
    ``train_curve`` (loss per step), ``val_curve`` (``[step, loss]`` pairs).
    """
    label = "+".join([optimizer_name, *(t.name for t in techniques)])
    device = config.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config.preset, config.seq_len, seed)
    applied: dict[str, Any] = {}
    for technique in techniques:
        applied[technique.name] = technique.transform(model, seed) if technique.transform else {}
        if technique.layerwise:
            settings = replace(settings, layerwise=True, max_grad_norm_per_param=config.grad_clip)
    model.to(device)
    model.train()
    optimizer = build_optimizer(optimizer_name, model, settings)
    train_step = functools.partial(_train_step, techniques=techniques)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, config.steps, config.warmup_fraction, config.min_lr_ratio),
    )
    data_generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    val_on_device = val_windows.to(device)

    def next_batch() -> torch.Tensor:
        return sample_windows(corpus.train, config.batch_size, config.seq_len + 1, data_generator).to(device)

    step_timer, optimizer_timer = StepTimer(device), StepTimer(device)
    train_curve: list[float] = []
    val_curve: list[list[float]] = []
    report_every = max(1, config.steps // 4)
    for step in range(config.steps):
        batch = next_batch()
        with step_timer:
            loss = train_step(model, optimizer, batch, config.grad_clip, optimizer_timer)
        scheduler.step()
        for technique in techniques:
            if technique.after_step is not None:
                technique.after_step(model, optimizer, step + 1)
        train_curve.append(loss)
        if not math.isfinite(loss):
            log(f"    [{label} seed {seed}] step {step + 1}: loss is {loss}; stopping this run")
            break
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            val_curve.append([step + 1, evaluate(model, val_on_device, config.eval_batch_size)])
        if progress is not None:
            progress(step + 1)
        elif (step + 1) % report_every == 0:
            log(f"    [{label} seed {seed}] step {step + 1}/{config.steps}  loss {loss:.3f}")

    val_loss = evaluate(model, val_on_device, config.eval_batch_size)
    val_curve.append([len(train_curve), val_loss])
    state_bytes = optimizer_state_bytes(optimizer)
    param_bytes = parameter_bytes(model.parameters())
    # The state of the weights a low-rank method projects (the target modules' matrices), which
    # is where low-rank methods save; embeddings, norms and the LM head get AdamW in every row.
    targets, _ = split_lowrank_params(model, settings.target_modules)
    target_state_bytes = tensor_bytes([optimizer.state[p] for p in targets if p in optimizer.state])

    # Peak memory. CUDA: the allocator's own high-water mark over the whole run. CPU: one extra
    # (unreported) step under the profiler; its peak above the step's start plus what was live
    # at the start (parameters, buffers, optimizer state, the batch) is the step's peak.
    extra_batch = next_batch()
    peak_bytes: int | None
    if device.type == "cuda":
        train_step(model, optimizer, extra_batch, config.grad_clip)
        peak_bytes, peak_method = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    elif not measure_peak:
        peak_bytes, peak_method = None, "torch.profiler(profile_memory=True), one step"
    else:
        live_before = (
            tensor_bytes([list(model.parameters()), list(model.buffers()), list(optimizer.state.values())])
            + extra_batch.nbytes
        )
        step_peak = profiled_peak_bytes(
            functools.partial(train_step, model, optimizer, extra_batch, config.grad_clip), device
        )
        peak_bytes, peak_method = live_before + step_peak, "torch.profiler(profile_memory=True), one step"

    result = {
        "seed": seed,
        "steps_run": len(train_curve),
        "train_loss": _tail_mean(train_curve, config.final_loss_window),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if val_loss < 700 else float("inf"),
        "step_time_s": median_after_warmup(step_timer.seconds, config.timing_warmup),
        "step_time_mean_s": sum(step_timer.seconds) / max(1, len(step_timer.seconds)),
        "step_cpu_time_s": median_after_warmup(step_timer.cpu_seconds, config.timing_warmup),
        "techniques": applied,
        "optimizer_step_time_s": median_after_warmup(optimizer_timer.seconds, config.timing_warmup),
        "param_bytes": param_bytes,
        "optimizer_state_bytes": state_bytes,
        "target_state_bytes": target_state_bytes,
        "peak_memory_bytes": None if peak_bytes is None else int(peak_bytes),
        "peak_memory_method": peak_method,
        "train_curve": train_curve,
        "val_curve": val_curve,
    }
    del model, optimizer, scheduler
    gc.collect()
    return result


def _tail_mean(values: list[float], window: int) -> float:
    tail = values[-window:]
    return sum(tail) / len(tail) if tail else float("nan")
