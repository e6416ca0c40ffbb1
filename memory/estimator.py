"""``lowmem.memory.estimate``: what training a model takes in memory, per device, before allocating anything.

Four parts, each from a rule that is checked against the real thing in tests/memory:

- weights: every parameter of the model (a LLaMA preset is built on the meta device, so a 70B
  model costs nothing to count), in the training dtype;
- gradients: one per parameter, or with per-layer updates (``layerwise=True``: each gradient is
  consumed by its update inside backward and freed) the largest single one;
- optimizer states: per parameter, by the rules the lowmem optimizers allocate with
  (:mod:`lowmem.memory.state_bytes`), exactly;
- activations: what a LLaMA decoder saves for backward (:mod:`lowmem.memory.activations`),
  under the chosen activation mode.

The papers' headline claim is a row of this estimator: GaLore (Zhao et al. 2024,
arXiv:2403.03507) pre-trains LLaMA-7B on one 24 GB GPU with 8-bit GaLore states and per-layer
weight updates, bf16 weights, a token batch of 256, no checkpointing and no offload, where
AdamW needs more than twice that::

    estimate("llama-7b", optimizer="galore_adamw8bit", layerwise=True, batch_size=1, seq_len=256)
    estimate("llama-7b", optimizer="adamw", batch_size=1, seq_len=256)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowmem.memory.activations import llama_activation_bytes
from lowmem.memory.presets import LLAMA_PRESETS, LlamaShape, llama_shape, llama_skeleton
from lowmem.memory.state_bytes import optimizer_spec, param_state_split
from lowmem.optim.lowrank_adam import MIN_8BIT_SIZE

__all__ = ["ACTIVATION_MODES", "GALORE_RANKS", "MemoryReport", "estimate", "format_reports"]

#: How saved activations are handled: kept on the device, recomputed per decoder layer, moved to
#: host memory, or both (layer inputs on the host, one layer recomputed at a time).
ACTIVATION_MODES = ("none", "checkpoint", "offload", "offload_checkpoint")
#: The ranks of the GaLore paper's pre-training runs, per preset (hidden_size / 4 elsewhere).
GALORE_RANKS = {"llama-60m": 128, "llama-130m": 256, "llama-350m": 256, "llama-1b": 512, "llama-7b": 1024}
#: GaLore's target modules: every linear layer of attention and MLP (not embedding or LM head).
DEFAULT_TARGETS = ("self_attn", "mlp")
GIB = 1024**3


@dataclass
class MemoryReport:
    """Bytes per device for one training setup, the host bytes it moves out, and the assumptions made.

    ``total`` is the device's steady-state sum of the four parts; ``host`` lists what offloading
    keeps in host memory instead. ``str(report)`` is a table in GiB.
    """

    model: str
    optimizer: str
    params: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    host: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Device bytes: weights + gradients + optimizer states + activations."""
        return self.weights + self.gradients + self.optimizer_states + self.activations

    def parts(self) -> dict[str, int]:
        """The device parts and their total, in bytes."""
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer states": self.optimizer_states,
            "activations": self.activations,
            "total per device": self.total,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (bytes as integers)."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "params": self.params,
            **{key.replace(" ", "_"): value for key, value in self.parts().items()},
            "host": dict(self.host),
            "settings": dict(self.settings),
            "assumptions": list(self.assumptions),
        }

    @property
    def label(self) -> str:
        extras = [
            f"{k}={v}"
            for k, v in self.settings.items()
            if k in ("rank", "activation", "world_size", "beta1") and v not in (None, "none", 1)
        ]
        if self.settings.get("layerwise"):
            extras.append("layerwise")
        if self.settings.get("offload_optimizer"):
            extras.append("offload_optimizer")
        return f"{self.model} {self.optimizer}" + (f" ({', '.join(extras)})" if extras else "")

    def __str__(self) -> str:
        return format_reports([self])


def format_reports(reports: list[MemoryReport]) -> str:
    """Reports side by side: one column per report, rows in GiB, then host bytes and assumptions."""
    width = max(14, *(len(r.optimizer) + 2 for r in reports))
    lines = [f"{'GiB per device':<26}" + "".join(f"{r.optimizer:>{width}}" for r in reports)]
    for key in reports[0].parts():
        lines.append(f"{key:<26}" + "".join(f"{r.parts()[key] / GIB:>{width}.2f}" for r in reports))
    host_keys = sorted({k for r in reports for k in r.host})
    for key in host_keys:
        values = "".join(f"{r.host.get(key, 0) / GIB:>{width}.2f}" for r in reports)
        lines.append(f"{'host ' + key:<26}" + values)
    lines.append("")
    for index, report in enumerate(reports):
        lines.append(f"[{index + 1}] {report.label}: {report.params / 1e6:.1f}M parameters")
    seen: list[str] = []
    for report in reports:
        seen += [a for a in report.assumptions if a not in seen]
    lines.append("Assumptions:")
    lines += [f"  - {a}" for a in seen]
    return "\n".join(lines)


#: What each activation mode's bytes stand for (measured against the real implementation on the tiny
#: LLaMA in tests/memory/test_estimator_modes.py; the numbers are in ActivationBytes.device_peak).
_ACTIVATION_NOTES = {
    "none": "activations: everything saved for backward, at the end of the forward",
    "checkpoint": (
        "checkpoint: each decoder layer keeps its input; peak = all inputs plus the larger of the LM "
        "head's saved tensors (end of forward) and one recomputed layer's (backward)"
    ),
    "offload": (
        "offload: every saved tensor goes to host memory (host row); the device figure is a bound "
        "that assumes the copies keep pace with compute: one layer (or the head) in use, one in flight"
    ),
    "offload_checkpoint": (
        "offload_checkpoint: the step runs inside the offload context: layer inputs and the LM head's "
        "saved tensors in host memory; on the device one recomputed layer with its input, and the "
        "previous layer's input in flight"
    ),
}


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _resolve_model(model_or_config: Any, dtype: torch.dtype) -> tuple[str, nn.Module, LlamaShape | None]:
    """(name, a module with the parameters, the LLaMA shape if the activations can be modeled)."""
    if isinstance(model_or_config, nn.Module):
        config = getattr(model_or_config, "config", None)
        try:
            shape = llama_shape(config) if config is not None else None
        except TypeError:
            shape = None
        return type(model_or_config).__name__, model_or_config, shape
    shape = llama_shape(model_or_config)
    name = next((k for k, v in LLAMA_PRESETS.items() if v == shape), "llama (custom shape)")
    return name, llama_skeleton(shape, dtype=dtype, device="meta"), shape


def _check(name: str, value: Any, ok: bool, fix: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; {fix}")


#: Low-rank optimizers whose state lowmem shards under FSDP2 (``optim/sharded.py``): moments by rows,
#: GaLore's and Fira's basis by columns, APOLLO's projection regenerated from a seed on every rank;
#: GaLoreAdafactor's row statistics by rows, its column statistics whole on every rank.
FSDP2_LOWRANK = (
    "galore_adamw",
    "galore_adamw8bit",
    "fira_adamw",
    "apollo_adamw",
    "apollo_mini",
    "galore_adafactor",
)
#: proj_type values a row-sharded weight accepts; each projects it on the right (unsharded) side.
FSDP2_PROJ_TYPES = ("std", "reverse_std", "right")


def estimate(
    model_or_config: Any,
    *,
    optimizer: str = "adamw",
    batch_size: int = 1,
    seq_len: int = 256,
    dtype: torch.dtype | None = None,
    activation: str = "none",
    layerwise: bool = False,
    rank: int | None = None,
    update_proj_gap: int = 200,
    proj_type: str = "std",
    target_modules: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    min_8bit_size: int = MIN_8BIT_SIZE,
    beta1: float | None = None,
    offload_optimizer: bool = False,
    world_size: int = 1,
    activation_bytes: int | None = None,
) -> MemoryReport:
    """Estimate the device memory of training ``model_or_config`` with ``optimizer``.

    Args:
        model_or_config: a preset name (``"llama-60m"``, ``"130m"``, ..., ``"llama-7b"``,
            ``"llama-13b"``, ``"llama-70b"``), a :class:`~lowmem.memory.presets.LlamaShape`, a
            ``LlamaConfig``, or an ``nn.Module`` (its parameters are counted as they are; its
            activations are modeled only if it has a LLaMA ``config``, else pass ``activation_bytes``).
        optimizer: ``adamw`` (torch.optim.AdamW), ``adamw8bit``, ``galore_adamw``,
            ``galore_adamw8bit``, ``fira_adamw``, ``apollo_adamw``, ``apollo_mini``,
            ``adafactor`` (transformers.optimization.Adafactor), ``galore_adafactor``.
        batch_size, seq_len: sequences per device and tokens per sequence.
        dtype: weights, gradients and activations (optimizer states as the optimizer keeps them);
            None: bfloat16 for a preset or config, each parameter's own dtype for a module.
        activation: one of :data:`ACTIVATION_MODES`.
        layerwise: per-layer updates inside backward (``layerwise=True`` of lowmem optimizers).
        rank: of projected weights (low-rank optimizers); default: the GaLore paper's for the
            presets, hidden_size / 4 otherwise, 1 for ``apollo_mini``.
        update_proj_gap: recorded only: how often the projector is refreshed changes no bytes.
        proj_type: which side is projected (``std``: the smaller one).
        target_modules: names of the modules whose linear weights are projected (GaLore's default:
            attention and MLP).
        min_8bit_size: smaller moments stay fp32 under 8-bit states.
        beta1: Adafactor's (``adafactor``, ``galore_adafactor``): None (their default) keeps no
            first moment, a number keeps one of the statistics' shape; only the None-ness
            changes bytes. Not accepted for the Adam family, which always keeps one.
        offload_optimizer: :class:`lowmem.memory.CPUOffloadOptimizer`: states and an fp32 master
            in host memory.
        world_size: devices that shard weights, gradients and states (FSDP full sharding):
            ``adamw``, ``adamw8bit`` and the optimizers whose low-rank state lowmem shards under
            FSDP2 (:data:`FSDP2_LOWRANK`, with a ``proj_type`` of :data:`FSDP2_PROJ_TYPES`: the
            sharded optimizers project every weight on the right); not with ``layerwise``, nor
            for ``adafactor`` (transformers' Adafactor is not written for DTensor parameters;
            ``galore_adafactor`` without low-rank groups is its FSDP2 equivalent).
        activation_bytes: saved-activation bytes to use instead of the LLaMA model.

    Returns:
        A :class:`MemoryReport`; ``print`` it for a table with the assumptions it made.
    """
    spec = optimizer_spec(optimizer)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        _check(name, value, ok, "it must be an integer >= 1")
    modes = ", ".join(ACTIVATION_MODES)
    _check("activation", activation, activation in ACTIVATION_MODES, f"choose one of {modes}")
    floating = dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)
    _check("dtype", dtype, floating, "pass a floating torch.dtype (or None)")
    full_ok = spec.family in ("galore", "galore_adafactor")
    allowed = ("std", "reverse_std", "left", "right") + (("full",) if full_ok else ())
    _check(
        "proj_type", proj_type, proj_type in allowed, f"choose one of {', '.join(allowed)} for {optimizer}"
    )
    if world_size > 1 and spec.lowrank and optimizer.lower().replace("-", "_") not in FSDP2_LOWRANK:
        raise ValueError(
            f"Invalid world_size: {world_size} with {optimizer}; under FSDP2 lowmem shards the state of "
            f"{', '.join(FSDP2_LOWRANK)} (and of adamw / adamw8bit), not yet of {optimizer}'s low-rank "
            "groups; estimate per device with world_size=1"
        )
    if world_size > 1 and spec.lowrank and proj_type not in FSDP2_PROJ_TYPES:
        raise ValueError(
            f"Invalid proj_type: {proj_type!r} with world_size={world_size}; row-sharded (FSDP2) weights "
            f"are projected on their unsharded side: choose one of {', '.join(FSDP2_PROJ_TYPES)}"
        )
    if beta1 is not None:
        ok = isinstance(beta1, (int, float)) and not isinstance(beta1, bool) and 0.0 <= beta1 < 1.0
        _check("beta1", beta1, ok, "pass None (no first moment) or a number in [0, 1)")
        _check(
            "beta1", beta1, spec.adafactor, f"beta1 is Adafactor's; {optimizer} always keeps a first moment"
        )
    if world_size > 1 and spec.family == "hf_adafactor":
        raise ValueError(
            f"Invalid world_size: {world_size} with {optimizer}; transformers' Adafactor does not support "
            "FSDP2's sharded (DTensor) parameters; estimate galore_adafactor (lowmem's Adafactor, sharded "
            "under FSDP2, plain groups = transformers' update) or world_size=1"
        )
    if world_size > 1 and layerwise:
        raise ValueError(f"Invalid world_size: {world_size} with layerwise=True; estimate one or the other")
    forced_dtype = dtype
    if dtype is None:
        modules_dtype = None
        if isinstance(model_or_config, nn.Module):
            modules_dtype = next(
                (p.dtype for p in model_or_config.parameters() if p.is_floating_point()), None
            )
        dtype = modules_dtype or torch.bfloat16
    name, model, shape = _resolve_model(model_or_config, dtype)
    b = _dtype_bytes(dtype)
    assumptions = [
        f"weights, gradients and activations in {str(dtype).removeprefix('torch.')}; no separate fp32 master "
        "copy on the device (pure low-precision training, as in the GaLore paper)"
        if dtype != torch.float32
        else "weights, gradients and activations in float32",
    ]

    # ----------------------------------------------------------------- weights and states
    if spec.lowrank:
        if rank is None:
            rank = spec.rank or GALORE_RANKS.get(name) or max(1, (shape.hidden_size if shape else 256) // 4)
        from lowmem.optim.param_groups import lowrank_param_groups

        groups = lowrank_param_groups(model, list(target_modules), rank)
        projected = {id(p) for p in groups[0]["params"]}
        assumptions.append(
            f"rank {rank} ({proj_type}) for the linear weights of modules matching {list(target_modules)}; "
            f"the rest (embedding, norms, LM head) get the plain update; update_proj_gap={update_proj_gap} "
            "changes no bytes"
        )
    else:
        projected = set()
    params = [p for p in model.parameters() if p.requires_grad]
    # Each parameter in the training dtype, or in its own when a module is given without a dtype.
    dtypes = [forced_dtype or p.dtype for p in params]
    sizes = [p.numel() * _dtype_bytes(d) for p, d in zip(params, dtypes, strict=True)]
    total_params = sum(p.numel() for p in params)
    weights = sum(sizes)
    # Under FSDP2 every accepted proj_type projects a sharded weight on the right (optim/sharded.py).
    state_proj_type = "right" if world_size > 1 and spec.lowrank else proj_type
    splits = [
        param_state_split(
            tuple(p.shape),
            param_dtype,
            spec,
            rank=rank if id(p) in projected else None,
            proj_type=state_proj_type,
            min_8bit_size=min_8bit_size,
            first_moment=beta1 is not None,
        )
        for p, param_dtype in zip(params, dtypes, strict=True)
    ]
    states = sum(split.total for split in splits)
    adafactor_moments = (
        "factored second moment (row and column statistics of each matrix, in fp32 for 16-bit weights)"
        + (", a first moment (beta1)" if beta1 is not None else ", no first moment (beta1=None)")
    )
    state_note = {
        "torch_adamw": "adamw = torch.optim.AdamW: two moments in the weights' dtype",
        "adam": "adamw8bit: 8-bit block-wise moments (2 bytes + 8 per 256 per element; fp32 under 4096)",
        "hf_adafactor": f"adafactor = transformers.optimization.Adafactor: {adafactor_moments}",
        "galore_adafactor": f"galore_adafactor: {adafactor_moments}, of R where projected",
    }.get(spec.family, f"{optimizer}: low-rank moments{' in 8 bits' if spec.state_dtype == 'int8' else ''}")
    assumptions.append(f"optimizer states: {state_note}, as the optimizer allocates them")
    gradients = max(sizes) if layerwise else weights
    if layerwise:
        assumptions.append(
            "layerwise: each gradient is freed by its update inside backward; peak: the largest"
        )

    # ----------------------------------------------------------------- activations
    host: dict[str, int] = {}
    if activation_bytes is not None:
        activations = activation_bytes
        assumptions.append(f"activations given by the caller ({activation_bytes} bytes)")
    elif shape is None:
        activations = 0
        assumptions.append("activations NOT counted: no LLaMA config to model them (pass activation_bytes)")
    else:
        act = llama_activation_bytes(shape, batch_size, seq_len, b)
        assumptions.append(
            f"activations: tensors saved for backward by a HF LLaMA with fused (SDPA) attention, batch "
            f"{batch_size} x {seq_len} tokens per device; transient buffers and allocator slack not counted"
        )
        activations = act.device_peak(activation)
        if act.host_bytes(activation):
            host["activations"] = act.host_bytes(activation)
        assumptions.append(_ACTIVATION_NOTES[activation])

    # ----------------------------------------------------------------- optimizer offload
    if offload_optimizer:
        host["optimizer states"] = states
        host["fp32 master weights"] = 4 * total_params
        # A gradient buffer in the weights' dtype; for other dtypes also an fp32 gradient and a staging
        # copy of the master in the weights' dtype for the copy back.
        host["gradient buffers"] = total_params * b + (total_params * (4 + b) if b != 4 else 0)
        states = 0
        assumptions.append(
            "offload_optimizer: CPUOffloadOptimizer keeps states, an fp32 master, gradient buffers and (for "
            "non-fp32 weights) an fp32 gradient and a staging copy in host memory"
        )

    # ----------------------------------------------------------------- sharding
    if world_size > 1:
        largest_block = _largest_block_bytes(model, b)
        weights = math.ceil(weights / world_size) + 2 * largest_block
        gradients = math.ceil(gradients / world_size) + largest_block
        # Rows (and basis columns) 1/w each; Adafactor's column statistics and counters whole per rank.
        replicated = 0 if offload_optimizer else sum(split.replicated for split in splits)
        states = math.ceil((states - replicated) / world_size) + replicated
        scalars = (
            "Adafactor's column statistics of each matrix and its step counters are whole on every rank "
            "(counted in full)"
            if spec.adafactor
            else "per-rank copies of scalar state (step counters, norms: at most 24 bytes per tensor) ignored"
        )
        assumptions.append(
            f"FSDP full sharding over {world_size} devices: weights, gradients and states / {world_size}, "
            "plus two decoder layers' full weights (gathered, prefetched) and one layer's full gradients "
            f"(before reduce-scatter); 8-bit blocks split at shard edges ignored; {scalars}"
        )
        if projected:
            # lowmem's FSDP2 GaLore (optim/sharded.py): moments and basis are row-sharded, exactly 1/w;
            # a projector refresh gathers one weight's full gradient, one weight at a time.
            largest_projected = max(p.numel() for p in params if id(p) in projected) * b
            gradients += largest_projected
            assumptions.append(
                "low-rank states under FSDP2: every projected weight projected on its right (unsharded) "
                f"side whatever proj_type; moments sharded by rows and a stored basis by columns (1/"
                f"{world_size}); a projector refresh gathers the full gradient of one weight at a time "
                "(counted with the gradients)"
            )
    return MemoryReport(
        model=name,
        optimizer=optimizer,
        params=total_params,
        weights=weights,
        gradients=gradients,
        optimizer_states=states,
        activations=activations,
        host=host,
        settings={
            "batch_size": batch_size,
            "seq_len": seq_len,
            "dtype": str(dtype).removeprefix("torch."),
            "activation": activation,
            "layerwise": layerwise,
            "rank": rank if spec.lowrank else None,
            "update_proj_gap": update_proj_gap if spec.lowrank else None,
            "offload_optimizer": offload_optimizer,
            "world_size": world_size,
            "beta1": beta1 if spec.adafactor else None,
        },
        assumptions=assumptions,
    )


def _largest_block_bytes(model: nn.Module, dtype_bytes: int) -> int:
    """Bytes of the largest entry of the model's first ModuleList (a decoder layer), else of the model."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return max(sum(p.numel() for p in block.parameters()) for block in module) * dtype_bytes
    return sum(p.numel() for p in model.parameters()) * dtype_bytes
