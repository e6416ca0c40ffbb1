"""HuggingFace ``Trainer`` integration: lowmem optimizers from ``TrainingArguments``, layer-wise
updates that work under the Trainer, and real gradient norms in its logs.

Pick an optimizer by name and hand the result to the Trainer::

    import lowmem.hf
    from transformers import TrainingArguments

    args = TrainingArguments("out", learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.0,
                             gradient_accumulation_steps=4)
    trainer = lowmem.hf.LowmemTrainer(            # or transformers.Trainer (see grad_norm below)
        model=model, args=args, train_dataset=dataset,
        optimizer_cls_and_kwargs=lowmem.hf.optimizer_cls_and_kwargs(
            "galore_adamw_layerwise", args, model, target_modules=["self_attn", "mlp"], rank=128),
    )
    trainer.train()                               # resume_from_checkpoint=... works too

What this fixes over transformers' built-in ``optim="galore_adamw"`` / ``"apollo_adamw"``
(and their ``*_layerwise`` variants):

- the arguments' ``learning_rate``, ``weight_decay``, ``adam_beta1``/``adam_beta2`` and
  ``adam_epsilon`` all reach the optimizer (the built-in low-rank wiring passes only the
  learning rate: betas, epsilon and weight decay are the optimizer class's defaults, for every
  parameter); weight decay skips biases and norm weights exactly like the Trainer's own
  optimizers (``Trainer.get_decay_parameter_names``);
- layer-wise mode is one real optimizer (:mod:`lowmem.optim.layerwise`), so the Trainer's LR
  scheduler drives every update, ``optimizer.pt`` in each checkpoint holds the whole state
  (tensors only: the Trainer's ``torch.load(weights_only=True)`` restores it and a resumed run
  continues the same loss curve), ``gradient_accumulation_steps > 1`` works (the optimizer
  updates on every k-th backward; a shorter last window of an epoch is applied when the Trainer
  calls ``step()``), and :class:`LowmemTrainer` logs the real gradient norm.

Gradient norm and clipping in layer-wise mode
    Each gradient is consumed and freed inside backward, so when the Trainer measures
    ``grad_norm`` after backward there is nothing left (a plain ``Trainer`` logs 0.0), and
    global-norm clipping (``max_grad_norm``) is impossible: set ``max_grad_norm=0`` and, to
    clip, pass ``max_grad_norm_per_param=c`` (each parameter's gradient to norm c). The
    optimizer adds up ‖g‖² of every gradient an update consumes (before clipping) and
    :class:`LowmemTrainer` (or :class:`LowmemTrainerMixin` on your own Trainer subclass) logs
    sqrt of that sum as ``grad_norm``: the Trainer's own number. One exception: with
    ``gradient_accumulation_steps > 1``, GaLore keeps a projected weight's gradient summed in
    its low-rank basis between refreshes (the full summed gradient never exists; that is the
    memory saving), so such a weight contributes the norm of its projected gradient, a lower
    bound of its full norm. ``max_grad_norm_per_param`` accumulates full gradients instead,
    which makes the norm exact.

Data parallel (DDP, launched by torchrun or accelerate)
    Every name works under the Trainer's DDP as in one process on the global batch. In layer-wise
    mode :class:`LowmemTrainerMixin` moves the updates into a DDP communication hook
    (:func:`lowmem.optim.register_layerwise_ddp_hook`) on the first training step, so each
    parameter is updated from the gradient DDP averaged; the optimizer then takes
    ``accumulation_steps=1`` (the Trainer accumulates in accelerate's ``no_sync``), and
    ``TrainingArguments(ddp_find_unused_parameters=False)`` is required. DDP keeps every gradient
    in its buckets, so layer-wise mode under DDP saves no gradient memory (see that module).
    Layer-wise mode under accelerate's FSDP plugin (``TrainingArguments(fsdp=...)``) or DeepSpeed
    is refused; under FSDP2 with the model sharded at load time it works (next section).

Fully sharded data parallel (FSDP2, launched by torchrun)
    Load the model sharded, then build the optimizer on it, as in one process::

        from transformers import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=8))
        args = TrainingArguments("out", ..., save_strategy="no")   # or save_only_model=True
        trainer = lowmem.hf.LowmemTrainer(model=model, args=args, train_dataset=dataset,
            optimizer_cls_and_kwargs=lowmem.hf.optimizer_cls_and_kwargs(
                "galore_adamw", args, model, target_modules=["self_attn", "mlp"], rank=128))

    transformers ``fully_shard``-s the model at load time (its ``_fsdp_plan``: each decoder layer,
    then the root), so the parameters are already row-sharded DTensors when the optimizer is
    built, ``target_modules`` match the same module names, and the Trainer neither wraps the
    model in DDP nor shards it again; gradient accumulation defers FSDP's reduce-scatter to the
    last micro-batch. Each rank updates its own rows (:mod:`lowmem.optim.sharded`: GaLore, Fira
    and APOLLO project on the unsharded side, ``proj_type`` ``"std"`` / ``"reverse_std"`` /
    ``"right"``), so optimizer state per rank is 1/world_size of one process's. This path works
    on CPU (gloo) and GPUs (nccl). Its limits are transformers': the Trainer refuses to
    checkpoint the optimizer of a model sharded at load time (``save_strategy="no"`` or
    ``save_only_model=True``); ``transformers.distributed.checkpoint.save_optimizer_distributed``
    / ``load_optimizer_distributed`` (DCP) save and restore a lowmem optimizer outside the
    Trainer. ``TrainingArguments(fsdp=...)`` (accelerate's FSDP plugin) does not shard on CPU:
    accelerate keeps a multi-CPU run data parallel, so :class:`LowmemTrainer` refuses it there
    instead of training unsharded.

    Layer-wise names (``"galore_adamw_layerwise"``, ...) work on such a model too. FSDP2 itself
    runs each sharded parameter's update hook after its reduce-scatter, with the averaged row
    shard as ``.grad`` (:mod:`lowmem.optim.layerwise`, "FSDP2"), so each rank updates its rows
    inside backward and frees that shard: a rank holds one layer's sharded gradient at a time.
    The Trainer turns gradient sync off (``set_requires_gradient_sync(False)``) for all but the
    last micro-batch of an update, so the hooks run once per update, after the last backward,
    on the sum of its micro-batches: the optimizer takes ``accumulation_steps=1``, as under DDP
    (with ``gradient_accumulation_steps`` instead, every update would wait in ``.grad`` for
    ``step()``). Between those micro-batches FSDP2 holds every layer's *unsharded* gradient
    (world_size times the sharded one), so with ``gradient_accumulation_steps > 1`` layer-wise
    mode saves only the sharded gradients that ``step()`` would hold after backward; with
    ``accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}}`` the Trainer
    reduce-scatters every micro-batch instead, the optimizer then counts
    ``gradient_accumulation_steps`` micro-batches itself (GaLore accumulating projected shards)
    and gradient memory stays sharded, at the cost of a reduce-scatter per micro-batch.
    ``max_grad_norm=0`` as in one process; the logged ``grad_norm`` is the norm of the whole
    gradient (each rank's squared norm of its rows, all-reduced once per update). Refused in
    layer-wise mode, when the optimizer is built (ValueError naming the cause and the fix): a model
    sharded some other way (``fully_shard`` called by hand) or loaded tensor parallel only
    (``DistributedConfig(tp_size=...)``): the Trainer defers the reduce-scatter only for a model
    transformers FSDP2-sharded (``is_fsdp_managed_module``, its own test), which is what
    ``accumulation_steps=1`` relies on; trainable plain tensors on a sharded model (PEFT adapters
    attached after loading), whose gradients the Trainer averages only after backward; and
    parameters that are not row shards on a 1-D mesh (HSDP, ``dp_replicate_size > 1``, whose
    replicas the Trainer all-reduces after the hooks ran).

Activation memory and layer conversions
    ``LowmemTrainer(..., activation_memory=ActivationMemory(checkpoint=True, offload=True))``
    recomputes each decoder layer in backward with its inputs in host memory
    (:func:`lowmem.memory.apply_checkpointing`) and keeps the other saved tensors of the forward
    pass in host memory too (:func:`lowmem.memory.offload_activations`, entered through the
    Trainer's ``compute_loss_context_manager``), as in MEMO (2025). :func:`convert_model` swaps
    layers (SLTrain's sparse plus low-rank linears, int8/fp8 linears) before the optimizer is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import Trainer, TrainingArguments
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.trainer_utils import check_target_module_exists
except ImportError as exc:  # an optional dependency: say how to get it
    raise ImportError(
        "lowmem.hf needs transformers and accelerate: pip install 'lowmem[hf]' "
        "(or pip install transformers accelerate)"
    ) from exc

from lowmem.optim import (
    APOLLO_MINI,
    AdamW8bit,
    ApolloAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
)
from lowmem.optim.lowrank_base import LowRankOptimizer
from lowmem.optim.sharded import is_dtensor, local_tensor

__all__ = [
    "OPTIMIZER_NAMES",
    "ActivationMemory",
    "LowmemTrainer",
    "LowmemTrainerMixin",
    "TrainerStepping",
    "convert_model",
    "optimizer_cls_and_kwargs",
    "unwrap_optimizer",
]

# ----------------------------------------------------------------------------- the catalogue

#: galore-torch's low-rank group keys plus ours (GaLoreAdamW, FiraAdamW, GaLoreAdafactor, 8-bit).
_GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "projector", "on_refresh", "seed")
#: apollo-torch's keys plus ours (ApolloAdamW).
_APOLLO_KEYS = ("rank", "update_proj_gap", "scale", "scale_type", "proj", "proj_type", "on_refresh", "seed")
_ADAM_OPTIONS = ("state_dtype", "min_8bit_size", "maximize", "max_grad_norm_per_param")
_ADAFACTOR_OPTIONS = (
    "beta1",
    "eps",
    "clip_threshold",
    "decay_rate",
    "scale_parameter",
    "relative_step",
    "warmup_init",
    "maximize",
    "max_grad_norm_per_param",
)
#: Options every name takes; ``target_modules`` only the low-rank ones.
_COMMON_OPTIONS = ("layerwise",)
#: Keys that come from TrainingArguments, and the field to set instead.
_FROM_ARGS = {
    "lr": "learning_rate",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "betas": "adam_beta1 / adam_beta2",
    "eps": "adam_epsilon",
    "accumulation_steps": "gradient_accumulation_steps",
    "params": "(the param groups are built from the model)",
}
#: Rank when none is given: transformers' and galore-torch's default.
DEFAULT_RANK = 128


@dataclass(frozen=True)
class _Spec:
    cls: type[LowRankOptimizer]
    group_keys: tuple[str, ...] = ()  # low-rank param-group keys; empty: no low-rank group
    options: tuple[str, ...] = _ADAM_OPTIONS  # constructor keywords
    group_defaults: dict[str, Any] = field(default_factory=dict)
    adam: bool = True  # takes betas/eps from the arguments

    @property
    def lowrank(self) -> bool:
        return bool(self.group_keys)

    def valid_options(self) -> tuple[str, ...]:
        targets = ("target_modules",) if self.lowrank else ()
        return tuple(sorted({*self.group_keys, *self.options, *_COMMON_OPTIONS, *targets}))


_SPECS: dict[str, _Spec] = {
    "galore_adamw": _Spec(GaLoreAdamW, _GALORE_KEYS, group_defaults={"rank": DEFAULT_RANK}),
    "galore_adamw8bit": _Spec(GaLoreAdamW8bit, _GALORE_KEYS, group_defaults={"rank": DEFAULT_RANK}),
    "fira_adamw": _Spec(FiraAdamW, _GALORE_KEYS, group_defaults={"rank": DEFAULT_RANK}),
    "apollo_adamw": _Spec(ApolloAdamW, _APOLLO_KEYS, group_defaults={"rank": DEFAULT_RANK}),
    "apollo_mini": _Spec(ApolloAdamW, _APOLLO_KEYS, group_defaults=dict(APOLLO_MINI)),
    "adamw8bit": _Spec(AdamW8bit),
    "galore_adafactor": _Spec(
        GaLoreAdafactor, _GALORE_KEYS, _ADAFACTOR_OPTIONS, {"rank": DEFAULT_RANK}, adam=False
    ),
}
#: Every name :func:`optimizer_cls_and_kwargs` accepts (each also with a ``_layerwise`` suffix).
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_SPECS)
_LAYERWISE_SUFFIX = "_layerwise"


# ----------------------------------------------------------------------------- the optimizer side
class TrainerStepping:
    """Mixin for a lowmem optimizer driven by the Trainer (what :func:`optimizer_cls_and_kwargs` returns).

    Changes nothing without ``layerwise=True``. With it:

    - records ‖g‖² (fp32) of every gradient an update consumes, before per-parameter clipping
      (the accumulated gradient; with GaLore's low-rank accumulation, the projected one) and
      publishes sqrt of the sum at each ``step()`` as :attr:`last_grad_norm` (a 0-d tensor);
      for FSDP2-sharded parameters each rank sums its rows' ‖g_k‖² and ``step()`` all-reduces
      the sum over the mesh, so every rank publishes the norm of the whole gradient;
    - ``step()`` closes an accumulation window the Trainer ended early: the Trainer steps once
      per update and runs fewer micro-batches than ``gradient_accumulation_steps`` in the last
      update of an epoch whose length is not a multiple of it (scaling their loss to a mean),
      so the gradients accumulated so far are applied then, as a non-layer-wise ``step()`` would.
    """

    #: sqrt(Σ‖g‖²) over the gradients of the last update (layer-wise only; None before the first).
    last_grad_norm: Tensor | None = None
    _grad_sq_sum: Tensor | None = None
    _grad_sq_group: Any = None  # FSDP2: the mesh's process group, whose ranks hold the other rows

    def _step_param(
        self, param: Tensor, group: dict[str, Any], side: Any, projected_grad: Tensor | None = None
    ) -> None:
        if self._layerwise is not None:  # type: ignore[attr-defined]
            grad = param.grad if projected_grad is None else projected_grad
            if is_dtensor(param):
                # FSDP2: the gradient is this rank's rows; step() adds the ranks' sums (one
                # all-reduce per update, not one per parameter inside backward).
                self._grad_sq_group = param.device_mesh.get_group()  # type: ignore[attr-defined]
            sq = torch.linalg.vector_norm(local_tensor(grad), dtype=torch.float32).square()
            total = self._grad_sq_sum
            self._grad_sq_sum = sq if total is None else total + sq.to(total.device)
        super()._step_param(param, group, side, projected_grad)  # type: ignore[misc]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        stepper = self._layerwise  # type: ignore[attr-defined]
        if stepper is not None:
            # The Trainer may end a window after fewer backward passes than accumulation_steps
            # (the last one of an epoch): apply what was accumulated now.
            stepper.close_window(self)
        loss = super().step(closure)  # type: ignore[misc]
        if stepper is not None and self._grad_sq_sum is not None:
            total = self._grad_sq_sum
            if self._grad_sq_group is not None:
                # Every rank steps every parameter (even one with no local rows), so every rank of
                # the mesh reaches this all-reduce once per update.
                torch.distributed.all_reduce(total, group=self._grad_sq_group)
            self.last_grad_norm = total.sqrt()
            self._grad_sq_sum = None
        return loss


_TRAINER_CLASSES: dict[type, type] = {}


def _trainer_class(base: type[LowRankOptimizer]) -> type[LowRankOptimizer]:
    """``base`` with :class:`TrainerStepping` mixed in (one class per base, same name)."""
    cls = _TRAINER_CLASSES.get(base)
    if cls is None:
        # Same __name__ (error messages read "GaLoreAdamW: ..."); a module-level qualname so that
        # pickle and copy find the class again.
        qualname = f"_Trainer{base.__name__}"
        namespace = {"__module__": __name__, "__qualname__": qualname, "__doc__": base.__doc__}
        cls = type(base.__name__, (TrainerStepping, base), namespace)
        globals()[qualname] = cls
        _TRAINER_CLASSES[base] = cls
    return cls


# ----------------------------------------------------------------------------- param groups
def _decay_names(model: nn.Module) -> set[str]:
    # The Trainer's own rule (biases, LayerNorm modules and *norm* names get no decay); the
    # method does not use the instance, and calling it keeps the rule identical across versions.
    return set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]


def _target_weights(model: nn.Module, target_modules: str | Sequence[str]) -> set[str]:
    """Names of the ``nn.Linear`` weights transformers' ``optim_target_modules`` rules select.

    A string is a regular expression matched against the whole module name (or ``"all-linear"``);
    a list matches a module whose name equals an entry, contains one as a substring, or
    fully matches one as a regex (``transformers.trainer_utils.check_target_module_exists``).
    """
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    names = set()
    linears = []
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        linears.append(module_name)
        if all_linear or check_target_module_exists(target_modules, module_name):
            names.add(f"{module_name}.weight")
    if not names:
        shown = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
        raise ValueError(
            f"lowmem.hf: target_modules={target_modules!r} matched no nn.Linear layer of the model "
            f"(its linears: {shown or 'none'}); a list matches by exact name, substring or regex, a "
            "single string is a regex on the whole name; 'all-linear' selects every nn.Linear"
        )
    return names


def _param_groups(
    model: nn.Module,
    target_names: set[str],
    lowrank_keys: dict[str, Any],
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Low-rank and plain groups, each split into decayed and not decayed, as named parameters.

    ``named_parameters()`` yields a tied weight once, under its first name: a tied output head
    is low-rank only if that first name is targeted (as in transformers).
    """
    decay = _decay_names(model)
    buckets: dict[tuple[bool, bool], list[tuple[str, Tensor]]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (name in target_names and param.dim() >= 2, name in decay)
        buckets.setdefault(key, []).append((name, param))
    groups = []
    for lowrank in (True, False):
        for decayed in (True, False):
            params = buckets.get((lowrank, decayed))
            if params:
                group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
                if lowrank:
                    group.update(lowrank_keys)
                groups.append(group)
    return groups


# ----------------------------------------------------------------------------- the entry point
def _split_name(name: str, options: dict[str, Any]) -> tuple[_Spec, bool]:
    if not isinstance(name, str):
        raise TypeError(f"lowmem.hf: name must be a string, one of {list(OPTIMIZER_NAMES)}; got {name!r}")
    base, layerwise = name, False
    if name.endswith(_LAYERWISE_SUFFIX):
        base, layerwise = name[: -len(_LAYERWISE_SUFFIX)], True
    spec = _SPECS.get(base)
    if spec is None:
        raise ValueError(
            f"lowmem.hf: unknown optimizer {name!r}; choose one of {list(OPTIMIZER_NAMES)}, "
            f"each optionally with the suffix {_LAYERWISE_SUFFIX!r}"
        )
    if "layerwise" in options:
        value = options["layerwise"]
        if not isinstance(value, bool):
            raise ValueError(f"lowmem.hf: layerwise must be True or False, got {value!r}")
        if layerwise and not value:
            raise ValueError(f"lowmem.hf: {name!r} is layer-wise but layerwise=False was passed; drop one")
        layerwise = layerwise or value
    return spec, layerwise


def _check_options(name: str, spec: _Spec, options: dict[str, Any]) -> None:
    valid = spec.valid_options()
    for key in options:
        if key in valid:
            continue
        if key in _FROM_ARGS:
            raise ValueError(
                f"lowmem.hf: {key!r} comes from the TrainingArguments ({_FROM_ARGS[key]}); set it there"
            )
        raise ValueError(f"lowmem.hf: unknown option {key!r} for {name!r}; valid options: {', '.join(valid)}")


def _check_layerwise_args(args: TrainingArguments, model: nn.Module) -> None:
    """Raise for Trainer settings that cannot work when updates happen inside backward."""
    if args.max_grad_norm:
        raise ValueError(
            f"lowmem.hf: layer-wise updates free each gradient inside backward, so the Trainer's global-norm "
            f"clipping (max_grad_norm={args.max_grad_norm}) cannot see them: set "
            "TrainingArguments(max_grad_norm=0.0), and pass max_grad_norm_per_param=c to clip each "
            "parameter's gradient instead"
        )
    if args.fp16:
        raise ValueError(
            "lowmem.hf: layer-wise updates run inside backward, before fp16's loss scaler can unscale the "
            "gradients; use bf16=True or drop layerwise"
        )
    if args.deepspeed or args.fsdp:
        raise ValueError(
            "lowmem.hf: layer-wise updates under accelerate's FSDP or DeepSpeed are not supported (they "
            "shard and reduce gradients after the update hooks ran); drop layerwise, load the model sharded "
            "with from_pretrained(..., distributed_config=transformers.DistributedConfig("
            "fsdp_size=world_size)) and drop fsdp from the TrainingArguments, or train with plain data "
            "parallel (DDP)"
        )
    if _sharded(model) and not _sharded_at_load(model):
        raise ValueError(
            "lowmem.hf: layer-wise updates on a model whose parameters are DTensors that transformers' "
            "loading did not FSDP2-shard (fully_shard called by hand, or tensor parallel only: "
            "DistributedConfig(tp_size=...) without fsdp_size): under the Trainer, layer-wise mode supports "
            "FSDP2 for models sharded at load time, from_pretrained(..., distributed_config="
            "transformers.DistributedConfig(fsdp_size=world_size)), whose reduce-scatter the Trainer defers "
            "to the last micro-batch of an update (which is how the optimizer counts them); load the model "
            "that way, or drop layerwise"
        )
    if _sharded_at_load(model):
        _check_layerwise_sharded_params(model)
    if _data_parallel(args, model) and _sync_each_batch(args):
        raise ValueError(
            "lowmem.hf: layer-wise updates under DDP run in DDP's communication hook once per update, on "
            "the gradients accumulated without sync; accelerator_config's gradient_accumulation_kwargs="
            "{'sync_each_batch': True} would run it after every micro-batch: drop sync_each_batch, or drop "
            "layerwise"
        )
    if _data_parallel(args, model) and args.ddp_find_unused_parameters is not False:
        raise ValueError(
            "lowmem.hf: layer-wise updates under DDP run in DDP's communication hook, which would update "
            "unused parameters from the zeros DDP fills in for them with find_unused_parameters=True (the "
            "Trainer's default for a model without gradient checkpointing): set "
            "TrainingArguments(ddp_find_unused_parameters=False)"
        )


def _check_layerwise_sharded_params(model: nn.Module) -> None:
    """Refuse, before training, the parameters of a model sharded at load time that layer-wise hooks
    cannot update: plain trainable tensors next to the DTensors (PEFT adapters attached after
    loading), and DTensors that are not FSDP2's row shards on a 1-D mesh (HSDP's 2-D mesh, tensor
    parallelism combined with FSDP). Without this they fail at the first hook, with an error about
    the generic multi-process guard or an unsupported placement."""
    from torch.distributed.tensor import Shard

    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    plain = [name for name, param in trainable if not is_dtensor(param)]
    if plain:
        shown = ", ".join(plain[:4]) + (" ..." if len(plain) > 4 else "")
        raise ValueError(
            "lowmem.hf: layer-wise updates on a model sharded at load time support its FSDP2-sharded "
            f"(DTensor) parameters only, but {shown} ({len(plain)} trainable) are plain tensors, e.g. PEFT "
            "adapters attached after loading: the Trainer averages their gradients over the ranks after "
            "backward (Trainer._sync_replicated_trainable_parameters), after a layer-wise hook would have "
            "updated each rank's copy from its own gradient. Drop layerwise (step() then updates them "
            "from the averaged gradient), or freeze them"
        )
    for name, param in trainable:
        mesh, placements = param.device_mesh, tuple(param.placements)  # type: ignore[attr-defined]
        if mesh.ndim != 1 or placements != (Shard(0),):
            raise ValueError(
                "lowmem.hf: layer-wise updates support FSDP2's row shards on a 1-D mesh (Shard(0)) only, "
                f"but {name} has placements {placements} on a {mesh.ndim}-D mesh (HSDP, DistributedConfig("
                "dp_replicate_size>1), whose replicas the Trainer all-reduces only after the update hooks "
                "ran; or tensor parallelism, tp_size>1): load with DistributedConfig(fsdp_size=world_size) "
                "alone, or drop layerwise"
            )


def _sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensor parameters (FSDP2: ``from_pretrained(distributed_config=...)``)."""
    return any(is_dtensor(param) for param in model.parameters())


def _loaded_distributed(model: nn.Module) -> bool:
    """Whether ``from_pretrained(distributed_config=...)`` distributed ``model`` (FSDP2, tensor
    parallelism or both): the Trainer then neither wraps it in DDP nor shards it again
    (``Trainer.is_distributed_loading_by_transformers``)."""
    return bool(getattr(model, "is_distributed_loading_by_transformers", False))


def _sharded_at_load(model: nn.Module) -> bool:
    """Whether transformers FSDP2-sharded ``model`` when loading it: the Trainer's own condition
    (distributed at load time *and* ``is_fsdp_managed_module``) for deferring its gradient
    reduction to the last micro-batch of each update (``Trainer._defer_fsdp_gradient_reduction``).
    A model loaded tensor parallel only is distributed but not FSDP-managed: no deferral."""
    return _loaded_distributed(model) and is_fsdp_managed_module(model)


def _data_parallel(args: TrainingArguments, model: nn.Module) -> bool:
    """Whether the Trainer will wrap the model in DDP (several processes, neither FSDP nor DeepSpeed,
    nor a model transformers distributed at load time)."""
    return args.world_size > 1 and not (args.deepspeed or args.fsdp or _loaded_distributed(model))


def _sync_each_batch(args: TrainingArguments) -> bool:
    """``TrainingArguments(accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch":
    True}})``: the Trainer then reduces gradients after every micro-batch, not only the last."""
    kwargs = getattr(args.accelerator_config, "gradient_accumulation_kwargs", None) or {}
    return bool(kwargs.get("sync_each_batch", False))


def _layerwise_accumulation_steps(args: TrainingArguments, model: nn.Module) -> int:
    """The optimizer's ``accumulation_steps`` for the Trainer's ``gradient_accumulation_steps``.

    One process: the optimizer counts the backward passes itself. Under DDP the Trainer runs all
    but the last micro-batch of an update in accelerate's ``no_sync``, so the gradients add up in
    ``.grad`` and the comm hook of the last backward sees their sum: the optimizer must update on
    every backward it is handed (:func:`lowmem.optim.register_layerwise_ddp_hook`). A model
    sharded at load time (FSDP2) is the same: the Trainer turns gradient sync off
    (``set_requires_gradient_sync(False)``) for all but the last micro-batch, FSDP2 adds their
    unsharded gradients up and runs the update hooks only after the last one's reduce-scatter,
    so each update sees one backward (:mod:`lowmem.optim.layerwise`, "FSDP2": never both). With
    ``sync_each_batch`` the Trainer reduce-scatters every micro-batch, FSDP2 runs the hooks each
    time and adds the shards into ``.grad``, so the optimizer counts the micro-batches itself.
    """
    if _data_parallel(args, model) or (_sharded_at_load(model) and not _sync_each_batch(args)):
        return 1
    return args.gradient_accumulation_steps


def optimizer_cls_and_kwargs(
    name: str, args: TrainingArguments, model: nn.Module, **options: Any
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The value for ``Trainer(..., optimizer_cls_and_kwargs=...)``: a lowmem optimizer from a name.

    Args:
        name: one of :data:`OPTIMIZER_NAMES` — ``"galore_adamw"``, ``"galore_adamw8bit"``,
            ``"fira_adamw"``, ``"apollo_adamw"``, ``"apollo_mini"`` (APOLLO-Mini: rank 1,
            tensor-wise scaling, scale 128), ``"adamw8bit"``, ``"galore_adafactor"`` — optionally
            with the suffix ``"_layerwise"`` (the same as ``layerwise=True``).
        args: the Trainer's arguments. ``learning_rate``, ``weight_decay`` (applied to the
            parameters the Trainer decays: not biases, not norm weights), ``adam_beta1``,
            ``adam_beta2``, ``adam_epsilon`` (the AdamW family) and ``optim_target_modules``
            are honoured; layer-wise mode takes ``gradient_accumulation_steps`` as the
            optimizer's ``accumulation_steps`` (1 under DDP and on a model sharded at load
            time, where the Trainer defers the gradient reduction to the last micro-batch),
            needs ``max_grad_norm=0`` and,
            under DDP, ``ddp_find_unused_parameters=False`` (see the module docstring). For
            ``"galore_adafactor"``, as for the Trainer's ``optim="adafactor"``,
            ``learning_rate`` is the step size (``relative_step=False, scale_parameter=False``
            unless passed as options).
        model: the model the Trainer will train; the param groups hold its parameters (build
            the value again for another model).
        **options: low-rank group keys (``rank`` (128), ``update_proj_gap``, ``scale``,
            ``proj_type``, ``projector``, ``on_refresh``, ``seed``; APOLLO: ``scale_type``,
            ``proj`` instead of ``projector``), ``target_modules`` (overrides
            ``args.optim_target_modules``; the same rules: a list matches by exact name,
            substring or regex, a string is a regex, ``"all-linear"`` every ``nn.Linear``),
            ``layerwise``, ``max_grad_norm_per_param``, and the optimizer's own keywords
            (``state_dtype``, ``min_8bit_size``, ``maximize``; Adafactor: ``beta1``, ``eps``,
            ``clip_threshold``, ``decay_rate``, ``scale_parameter``, ``relative_step``,
            ``warmup_init``). Anything else raises ValueError listing the valid options.

    Returns:
        ``(optimizer_cls, kwargs)``: the lowmem class (with :class:`TrainerStepping` mixed in)
        and its keyword arguments, ``params`` included (named param groups: low-rank weights
        with the group keys, the rest plain, each split by weight decay). ``cls(**kwargs)``
        builds the optimizer outside the Trainer too.
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"lowmem.hf: args must be transformers.TrainingArguments, got {type(args).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowmem.hf: model must be a torch.nn.Module, got {type(model).__name__}")
    spec, layerwise = _split_name(name, options)
    _check_options(name, spec, options)
    options = dict(options)
    options.pop("layerwise", None)

    lowrank_keys: dict[str, Any] = {}
    target_names: set[str] = set()
    if spec.lowrank:
        target_modules = options.pop("target_modules", None)
        if target_modules is None:
            target_modules = args.optim_target_modules
        if target_modules is None:
            raise ValueError(
                f"lowmem.hf: {name!r} projects the gradients of the nn.Linear layers in target_modules; "
                "pass target_modules=[...] (e.g. ['self_attn', 'mlp'] for LLaMA, or 'all-linear') or set "
                "TrainingArguments(optim_target_modules=...)"
            )
        if not isinstance(target_modules, (str, list, tuple)):
            raise TypeError(
                f"lowmem.hf: target_modules must be a string (regex or 'all-linear') or a list of strings, "
                f"got {target_modules!r}"
            )
        if isinstance(target_modules, tuple):
            target_modules = list(target_modules)
        target_names = _target_weights(model, target_modules)
        lowrank_keys = {**spec.group_defaults}
        for key in spec.group_keys:
            if key in options:
                lowrank_keys[key] = options.pop(key)

    kwargs: dict[str, Any] = {
        "params": _param_groups(model, target_names, lowrank_keys, args.weight_decay),
        "lr": args.learning_rate,
        "weight_decay": args.weight_decay,
    }
    if spec.adam:
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
        kwargs["eps"] = args.adam_epsilon
    else:  # Adafactor with the Trainer's LR schedule, as transformers' optim="adafactor"
        kwargs["relative_step"] = False
        kwargs["scale_parameter"] = False
    kwargs.update(options)
    if layerwise:
        _check_layerwise_args(args, model)
        kwargs["layerwise"] = True
        kwargs["accumulation_steps"] = _layerwise_accumulation_steps(args, model)
    return _trainer_class(spec.cls), kwargs


# ----------------------------------------------------------------------------- the Trainer side
def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (``trainer.optimizer``), e.g. to
    read :attr:`TrainerStepping.last_grad_norm` or the state; ``None`` stays ``None``."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


@dataclass(frozen=True)
class ActivationMemory:
    """How :class:`LowmemTrainer` keeps activation memory down.

    Attributes:
        checkpoint: recompute each decoder layer in backward (the model's gradient-checkpointing
            layers, through :func:`lowmem.memory.apply_checkpointing`); only their inputs are kept.
        offload: keep saved tensors in host memory until backward: the checkpointed layers' inputs
            and every tensor the rest of the forward pass saves (embeddings, the head's logits).
            Overlapped with compute on CUDA; on a CPU-only machine the tensors already live on the
            host and nothing moves.
        offload_fraction: with ``checkpoint``: the share of each layer's op outputs saved
            (offloaded, with ``offload``) instead of recomputed, where recomputation costs most
            per byte (MEMO's partial recomputation; :class:`lowmem.memory.PartialRecompute`).
        offloader: the :class:`lowmem.memory.ActivationOffload` engine to use (its ``stats``
            say what moved); default: ``lowmem.memory.offload_activations(keep=model)``.
    """

    checkpoint: bool = False
    offload: bool = False
    offload_fraction: float = 0.0
    offloader: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.checkpoint, bool) or not isinstance(self.offload, bool):
            raise ValueError("ActivationMemory: checkpoint and offload must be True or False")
        if self.offload_fraction and not self.checkpoint:
            raise ValueError(
                "ActivationMemory: offload_fraction is the share of a checkpointed layer's outputs kept "
                "instead of recomputed; it needs checkpoint=True"
            )
        if self.offloader is not None and not self.offload:
            raise ValueError("ActivationMemory: an offloader was given but offload=False; set offload=True")


class LowmemTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before Trainer) for lowmem's layer-wise mode
    and activation memory.

    - ``log``: replaces ``grad_norm`` by the layer-wise optimizer's :attr:`TrainerStepping.last_grad_norm`
      (the Trainer measures the norm after backward, when layer-wise updates have freed every
      gradient, and would log 0.0);
    - ``create_optimizer``: checks that a layer-wise optimizer matches the arguments the Trainer
      runs with (``gradient_accumulation_steps``, ``max_grad_norm=0``), which may have been
      changed after :func:`optimizer_cls_and_kwargs` was called;
    - ``training_step``: under DDP, on the first step, hands a layer-wise optimizer's updates to
      a DDP comm hook on the wrapped model (:func:`lowmem.optim.register_layerwise_ddp_hook`),
      so they use the averaged gradients (a plain ``Trainer`` would update from each rank's own);
    - the constructor refuses ``TrainingArguments(fsdp=...)`` where accelerate would not shard (on
      CPU it trains with DDP instead; see "Fully sharded data parallel" in :mod:`lowmem.hf`);
    - ``activation_memory=ActivationMemory(...)`` (keyword of the constructor): ``train`` turns
      lowmem's offloaded checkpointing on for its duration (and off after), and
      ``compute_loss_context_manager`` enters activation offload around each forward pass.

    Only public Trainer methods are overridden, with their signatures passed through.
    """

    def __init__(self, *args: Any, activation_memory: ActivationMemory | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._check_fsdp_engaged()
        if activation_memory is not None and not isinstance(activation_memory, ActivationMemory):
            raise TypeError(
                "activation_memory must be a lowmem.hf.ActivationMemory, got "
                f"{type(activation_memory).__name__}"
            )
        if activation_memory is not None and activation_memory.checkpoint:
            targs = self.args  # type: ignore[attr-defined]
            if getattr(targs, "activation_checkpointing", False) or getattr(
                targs, "gradient_checkpointing", False
            ):
                raise ValueError(
                    "ActivationMemory(checkpoint=True) replaces the Trainer's own checkpointing: set "
                    "TrainingArguments(activation_checkpointing=False) or drop checkpoint=True"
                )
        self.activation_memory = activation_memory
        self._lowmem_offloader: Any = None
        self._lowmem_ddp_model: nn.Module | None = None  # the DDP module whose comm hook updates

    def _check_fsdp_engaged(self) -> None:
        # accelerate engages its FSDP plugin on accelerators only: on CPU a TrainingArguments(fsdp=...)
        # run silently becomes DDP, with every rank holding the whole model and optimizer state.
        targs = self.args  # type: ignore[attr-defined]
        engaged = getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False)
        if not targs.fsdp or engaged:
            return
        state = getattr(getattr(self, "accelerator", None), "state", None)
        engine = getattr(state, "distributed_type", "no distributed engine")
        raise ValueError(
            f"lowmem.hf: TrainingArguments(fsdp={targs.fsdp!r}) was given, but accelerate runs this job as "
            f"{engine} without sharding (its FSDP plugin works on GPUs/accelerators only, not on CPU): the "
            "model and optimizer state would not be sharded. On CPU, load the model sharded with "
            "from_pretrained(..., distributed_config=transformers.DistributedConfig(fsdp_size=world_size)) "
            "and drop fsdp from the TrainingArguments (see lowmem.hf), or drop fsdp to train with DDP"
        )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        memory = self.activation_memory
        if memory is None or not (memory.checkpoint or memory.offload):
            return super().train(*args, **kwargs)  # type: ignore[misc]
        from lowmem.memory import apply_checkpointing, offload_activations

        model = self.model  # type: ignore[attr-defined]
        handle = None
        offloader = memory.offloader
        if memory.checkpoint:
            handle = apply_checkpointing(
                model,
                offload=memory.offload,
                offload_fraction=memory.offload_fraction,
                offloader=offloader,
            )
            offloader = handle.offloader
        elif offloader is None:
            offloader = offload_activations(keep=model)
        self._lowmem_offloader = offloader if memory.offload else None
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._lowmem_offloader = None
            if handle is not None:
                handle.remove()

    def compute_loss_context_manager(self, *args: Any, **kwargs: Any) -> Any:
        context = super().compute_loss_context_manager(*args, **kwargs)  # type: ignore[misc]
        if self._lowmem_offloader is None:
            return context
        stack = contextlib.ExitStack()
        stack.enter_context(context)
        stack.enter_context(self._lowmem_offloader)
        return stack

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        inner = unwrap_optimizer(optimizer)
        stepper = getattr(inner, "_layerwise", None)
        if stepper is not None:
            targs = self.args  # type: ignore[attr-defined]
            model = self.model  # type: ignore[attr-defined]
            _check_layerwise_args(targs, model)
            if stepper.options.accumulation_steps != _layerwise_accumulation_steps(targs, model):
                raise ValueError(
                    f"lowmem.hf: the layer-wise optimizer accumulates {stepper.options.accumulation_steps} "
                    f"backward passes per update but the Trainer runs gradient_accumulation_steps="
                    f"{targs.gradient_accumulation_steps} (under DDP, and on a model sharded at load time, "
                    "the optimizer must take 1); build optimizer_cls_and_kwargs from the same "
                    "TrainingArguments and model the Trainer gets"
                )
        return optimizer

    def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        # The first moment both exist: the model as accelerate wrapped it (DDP) and the optimizer.
        # Layer-wise updates then move into DDP's comm hook, after the gradients are averaged.
        if self._lowmem_ddp_model is not model and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = unwrap_optimizer(getattr(self, "optimizer", None))
            if getattr(inner, "_layerwise", None) is not None:
                from lowmem.optim.layerwise_ddp import register_layerwise_ddp_hook

                register_layerwise_ddp_hook(model, inner)
                self._lowmem_ddp_model = model
        return super().training_step(model, *args, **kwargs)  # type: ignore[misc]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        inner = unwrap_optimizer(getattr(self, "optimizer", None))
        if "grad_norm" in logs and isinstance(inner, TrainerStepping) and inner._layerwise is not None:
            norm = inner.last_grad_norm
            if norm is not None:
                logs["grad_norm"] = float(norm)
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class LowmemTrainer(LowmemTrainerMixin, Trainer):
    """``transformers.Trainer`` with :class:`LowmemTrainerMixin`: real ``grad_norm`` in layer-wise
    mode, and ``activation_memory=ActivationMemory(...)``."""


# ----------------------------------------------------------------------------- layer conversions
def convert_model(
    model: nn.Module,
    *,
    sparse_low_rank: dict[str, Any] | None = None,
    low_precision: str | dict[str, Any] | None = None,
) -> list[Any]:
    """Swap ``model``'s linear layers before training; call it before :func:`optimizer_cls_and_kwargs`.

    Args:
        model: modified in place (layers are replaced on their parents).
        sparse_low_rank: keyword arguments of :func:`lowmem.nn.convert.convert_to_sparse_low_rank`
            (SLTrain, Han et al. 2024: W = B·A·alpha/r + S on a fixed random support), e.g.
            ``{"rank": 64, "density": 0.03}``; applied first.
        low_precision: ``"int8"`` / ``"fp8"``, or keyword arguments of
            :func:`lowmem.nn.convert_to_low_precision` (int8/fp8 matmuls with per-row or per-tensor
            scales); applied to the linears still dense after ``sparse_low_rank``.

    Both select linears with ``target_modules`` (default: every ``nn.Linear`` but ``lm_head``).
    The optimizer must be built after the conversion: it holds the model's parameters at that
    moment (int8/fp8 linears keep their weights, sparse plus low-rank ones have new parameters).

    Returns:
        The conversion reports, in the order applied (they print as a summary).
    """
    if sparse_low_rank is None and low_precision is None:
        raise ValueError(
            "convert_model: pass sparse_low_rank={...} and/or low_precision='int8' | 'fp8' | {...}"
        )
    reports: list[Any] = []
    if sparse_low_rank is not None:
        from lowmem.nn.convert import convert_to_sparse_low_rank

        if not isinstance(sparse_low_rank, dict):
            raise TypeError(
                f"convert_model: sparse_low_rank must be a dict of keywords, got {sparse_low_rank!r}"
            )
        reports.append(convert_to_sparse_low_rank(model, **sparse_low_rank))
    if low_precision is not None:
        from lowmem.nn.convert_low_precision import convert_to_low_precision

        keywords = {"precision": low_precision} if isinstance(low_precision, str) else low_precision
        if not isinstance(keywords, dict):
            raise TypeError(
                f"convert_model: low_precision must be 'int8', 'fp8' or a dict, got {low_precision!r}"
            )
        reports.append(convert_to_low_precision(model, **keywords))
    return reports
