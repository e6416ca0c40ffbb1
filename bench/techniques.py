"""Memory techniques a training-benchmark row can add to its optimizer: ``OPTIMIZER+TECHNIQUE+...``.

A row of ``python -m lowmem.bench train`` is an optimizer from :mod:`lowmem.bench.optimizers`
optionally followed by techniques, e.g. ``adamw+sltrain``, ``adamw8bit+sltrain``,
``galore+layerwise``, ``adamw+offload``. Each technique changes one thing of the run and nothing
else (same seed, data, schedule), so its row compares directly with the plain optimizer's:

- ``sltrain``: the attention and MLP linears become ``lowmem.nn.SparseLowRankLinear`` (Han et al.
  2024, SLTrain: W = (alpha/r)·B@A + S, rank d/4, density 3%), converted from the freshly
  initialised model before the optimizer is built.
- ``lowrank``: the same linears become ``lowmem.nn.LowRankLinear`` (W = B@A, rank d/4).
- ``int8`` / ``fp8``: the same linears become ``lowmem.nn.LowPrecisionLinear`` (row-wise int8
  matmuls, or e4m3/e5m2; on CPU the quantization numerics are emulated in fp32).

``train --model-variant sltrain|lowrank`` and ``train --linear int8|fp8`` append the technique
to every row (the issues' names for these rows).
- ``offload``: the forward and backward run inside ``lowmem.memory.offload_activations()``.
- ``ckpt`` / ``ckpt-offload``: every decoder layer is checkpointed with
  ``lowmem.memory.apply_checkpointing`` (recomputed in backward), its kept inputs on the device or
  offloaded to host memory.
- ``layerwise``: the optimizer updates each parameter inside backward (``layerwise=True``); the
  run's global-norm gradient clipping becomes per-parameter clipping at the same threshold
  (``max_grad_norm_per_param``), since no full gradient exists to take a global norm of.
- ``refactor``: with ``sltrain`` or ``lowrank``, every ``REFACTOR_EVERY`` steps re-balance every
  B@A (``lowmem.nn.refactorize_``) and reset the optimizer's momentum with a 10-step lr
  re-warm-up (``lowmem.optim.reset_momentum``), the schedule of Glentis et al. (2025).

Layer conversions and memory techniques import their lowmem modules lazily and report why a
technique is unavailable instead of failing the whole run.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

#: The LLaMA linears a layer technique converts (embeddings and the LM head stay dense).
CONVERTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: SLTrain's settings for the benchmark: rank d/4 and 3% density, as in the paper's LLaMA runs.
SLTRAIN_RANK_FRACTION = 0.25
SLTRAIN_DENSITY = 0.03
#: Peak lr of the factorized-layer rows, tuned on the default benchmark with AdamW (seed 0):
#: 3e-3 (val 1.958) beat 1e-3 (2.079) and 6e-3 (2.036). ``lowrank`` rows reuse it untuned.
SLTRAIN_LR = 3e-3


@dataclass(frozen=True)
class Technique:
    """One technique: what it does to the model, to each training step, and to the optimizer.

    Attributes:
        name: the suffix used in a row name.
        description: one line for ``--help`` and the JSON.
        module: the lowmem module it needs (checked by :meth:`unavailable_reason`).
        attribute: the name it needs from that module.
        transform: ``(model, seed) -> info`` applied to the fresh model before the optimizer is
            built; returns JSON-able facts (what was converted).
        step_context: a context manager factory wrapped around forward + backward.
        layerwise: build the optimizer with ``layerwise=True`` (lowmem optimizers only).
    """

    name: str
    description: str
    module: str | None = None
    attribute: str | None = None
    transform: Callable[[nn.Module, int], dict[str, Any]] | None = None
    step_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    layerwise: bool = False
    conflicts: tuple[str, ...] = field(default=())
    #: Peak lr of a row with this technique (when the row sets none): factorized layers train
    #: best at a higher lr than dense ones, whatever the optimizer.
    lr: float | None = None
    #: The converted layers are no longer ``nn.Linear``: nothing is left for a projecting
    #: (low-rank) optimizer to project, so such rows are refused.
    replaces_linears: bool = False
    #: ``(model, optimizer, step)`` called after every optimizer step (``step`` counts from 1).
    after_step: Callable[[nn.Module, Any, int], None] | None = None
    #: Techniques of which the row must have one.
    requires: tuple[str, ...] = ()

    def unavailable_reason(self) -> str | None:
        """Why this technique cannot run here (its lowmem module lacks it), or None."""
        if self.module is None:
            return None
        try:
            module = importlib.import_module(self.module)
        except Exception as error:
            return f"{self.module} failed to import ({type(error).__name__}: {error})"
        if self.attribute is not None and not hasattr(module, self.attribute):
            return f"{self.module} has no {self.attribute}"
        return None


def _linear_rank(model: nn.Module) -> int:
    return max(1, round(SLTRAIN_RANK_FRACTION * model.config.hidden_size))


def _convert_sltrain(model: nn.Module, seed: int) -> dict[str, Any]:
    from lowmem.nn import convert_to_sparse_low_rank

    rank = _linear_rank(model)
    report = convert_to_sparse_low_rank(
        model, rank=rank, density=SLTRAIN_DENSITY, target_modules=list(CONVERTED_MODULES), seed=seed
    )
    return {"rank": rank, "density": SLTRAIN_DENSITY, "converted": _count_converted(report)}


def _convert_lowrank(model: nn.Module, seed: int) -> dict[str, Any]:
    from lowmem.nn import convert_to_low_rank

    rank = _linear_rank(model)
    report = convert_to_low_rank(model, rank=rank, target_modules=list(CONVERTED_MODULES))
    return {"rank": rank, "converted": _count_converted(report)}


def _low_precision(precision: str) -> Callable[[nn.Module, int], dict[str, Any]]:
    def transform(model: nn.Module, seed: int) -> dict[str, Any]:
        from lowmem.nn import convert_to_low_precision

        report = convert_to_low_precision(model, precision=precision, target_modules=list(CONVERTED_MODULES))
        return {"precision": precision, "converted": _count_converted(report)}

    return transform


def _count_converted(report: Any) -> int:
    """The number of converted layers in a ``convert_*`` report (a list, a dict, or an object)."""
    converted = getattr(report, "converted", report)
    return len(converted)


def _checkpoint(offload: bool) -> Callable[[nn.Module, int], dict[str, Any]]:
    def transform(model: nn.Module, seed: int) -> dict[str, Any]:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        from lowmem.memory import apply_checkpointing

        apply_checkpointing(model, block_types=(LlamaDecoderLayer,), offload=offload)
        return {"block_types": ["LlamaDecoderLayer"], "offload": offload}

    return transform


#: Steps between refactorizations (Glentis et al. 2025 refactorize on a fixed period; 50 is the
#: benchmark's projector-refresh period, four times in a 200-step run).
REFACTOR_EVERY = 50
REFACTOR_WARMUP = 10


def _refactor(model: nn.Module, optimizer: Any, step: int) -> None:
    if step % REFACTOR_EVERY:
        return
    from lowmem.nn import refactorize_
    from lowmem.optim import reset_momentum

    refactorize_(model)
    reset_momentum(optimizer, warmup_steps=REFACTOR_WARMUP)


def _offload_context() -> contextlib.AbstractContextManager[Any]:
    from lowmem.memory import offload_activations

    return offload_activations()


def row_default_lr(optimizer_lr: float, techniques: tuple[Technique, ...]) -> float:
    """A row's peak lr when none is given: its first technique's ``lr``, else its optimizer's."""
    return next((t.lr for t in techniques if t.lr is not None), optimizer_lr)


TECHNIQUES: dict[str, Technique] = {
    t.name: t
    for t in (
        Technique(
            "sltrain",
            "attention/MLP linears -> SparseLowRankLinear (rank d/4, density 3%)",
            "lowmem.nn",
            "convert_to_sparse_low_rank",
            transform=_convert_sltrain,
            conflicts=("lowrank", "int8", "fp8"),
            lr=SLTRAIN_LR,
            replaces_linears=True,
        ),
        Technique(
            "lowrank",
            "attention/MLP linears -> LowRankLinear (rank d/4)",
            "lowmem.nn",
            "convert_to_low_rank",
            transform=_convert_lowrank,
            conflicts=("sltrain", "int8", "fp8"),
            lr=SLTRAIN_LR,
            replaces_linears=True,
        ),
        Technique(
            "int8",
            "attention/MLP linears -> LowPrecisionLinear(precision='int8')",
            "lowmem.nn",
            "convert_to_low_precision",
            transform=_low_precision("int8"),
            conflicts=("sltrain", "lowrank", "fp8"),
        ),
        Technique(
            "fp8",
            "attention/MLP linears -> LowPrecisionLinear(precision='fp8') (emulated off fp8 GPUs)",
            "lowmem.nn",
            "convert_to_low_precision",
            transform=_low_precision("fp8"),
            conflicts=("sltrain", "lowrank", "int8"),
        ),
        Technique(
            "offload",
            "tensors saved for backward offloaded to host memory (offload_activations)",
            "lowmem.memory",
            "offload_activations",
            step_context=_offload_context,
        ),
        Technique(
            "ckpt",
            "every decoder layer checkpointed (recomputed in backward)",
            "lowmem.memory",
            "apply_checkpointing",
            transform=_checkpoint(offload=False),
            conflicts=("ckpt-offload",),
        ),
        Technique(
            "ckpt-offload",
            "every decoder layer checkpointed, its kept inputs offloaded to host memory",
            "lowmem.memory",
            "apply_checkpointing",
            transform=_checkpoint(offload=True),
            conflicts=("ckpt",),
        ),
        Technique(
            "refactor",
            f"every {REFACTOR_EVERY} steps: refactorize_ the B@A factors, reset momentum, re-warm the lr",
            "lowmem.nn",
            "refactorize_",
            after_step=_refactor,
            requires=("sltrain", "lowrank"),
        ),
        Technique(
            "layerwise",
            "updates inside backward (layerwise=True); per-parameter clipping at the same threshold",
            layerwise=True,
        ),
    )
}


#: Optimizers that project the attention / MLP linears (rows with a layer technique that
#: replaces those linears would have nothing to project).
PROJECTING_OPTIMIZERS = (
    "galore",
    "galore-torch",
    "fira",
    "fira-package",
    "apollo",
    "apollo-mini",
    "apollo-torch",
    "galore8bit",
)


def parse_row(row: str, optimizers: dict[str, Any]) -> tuple[str, tuple[Technique, ...]]:
    """Split ``"OPTIMIZER+TECH+..."`` into the optimizer name and its techniques.

    Raises:
        ValueError: an unknown optimizer or technique, a technique given twice, two that
            conflict (two layer conversions, checkpointing with and without offload), or a
            projecting optimizer on layers a technique replaced (SLTrain's factors are already
            rank d/4: use adamw or adamw8bit there).
    """
    name, *suffixes = [part.strip() for part in row.split("+")]
    if name not in optimizers:
        raise ValueError(f"unknown optimizer {name!r} in row {row!r}; known: {', '.join(optimizers)}")
    techniques: list[Technique] = []
    for suffix in suffixes:
        technique = TECHNIQUES.get(suffix)
        if technique is None:
            raise ValueError(f"unknown technique {suffix!r} in row {row!r}; known: {', '.join(TECHNIQUES)}")
        if technique in techniques:
            raise ValueError(f"technique {suffix!r} appears twice in row {row!r}")
        clash = [t.name for t in techniques if t.name in technique.conflicts]
        if clash:
            raise ValueError(f"row {row!r}: {suffix!r} cannot be combined with {clash[0]!r}")
        if technique.replaces_linears and name in PROJECTING_OPTIMIZERS:
            raise ValueError(
                f"row {row!r}: {suffix!r} replaces the linears that {name!r} projects, leaving it nothing to "
                "project; combine it with adamw or adamw8bit (optionally +layerwise)"
            )
        techniques.append(technique)
    for technique in techniques:
        if technique.requires and not any(t.name in technique.requires for t in techniques):
            raise ValueError(f"row {row!r}: {technique.name!r} needs one of {', '.join(technique.requires)}")
    return name, tuple(techniques)
