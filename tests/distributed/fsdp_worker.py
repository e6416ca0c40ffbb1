"""One rank of test_fsdp.py: lowmem optimizers on FSDP2 (``fully_shard``) parameters, 2 gloo ranks.

``python fsdp_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR`` runs, in one launch:

1. ``exact``: the two-layer model of :mod:`ddp_worker` (or :class:`ConvTwo`) with each layer
   and the root ``fully_shard``-ed, trained on each rank's half of every global batch for every
   case of :data:`EXACT_CASES`; saves the full parameters (``full_tensor``) for comparison with
   one process on DDP's arithmetic. Layer-wise cases (``layerwise=True``: FSDP2 runs the
   optimizer's hooks after its reduce-scatter) split the half into ``accumulation_steps``
   micro-batches, cut the last window short with ``close_window()``, and record whether each
   update happened inside backward (parameters moved, gradients freed, before ``step()``).
2. ``grad_memory``: the sharded gradient bytes a rank holds at its peak, layer-wise vs ``step()``.
3. ``llama``: the micro LLaMA of :mod:`lowmem.bench.fsdp_example` with GaLoreAdamW, under FSDP2
   and under DDP with the same global batches: losses, held-out loss and optimizer-state bytes
   per rank.
4. ``resume``: the FSDP2 run checkpointed with ``torch.distributed.checkpoint`` midway, then
   resumed into a fresh model and optimizer; saves both final parameters and optimizer states.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import (
    ADAM,
    CASES,
    GAP,
    GLOBAL_BATCH,
    STEPS,
    Case,
    TwoLayer,
    _all,
    _linear,
    _loss,
    _split,
    batch,
    set_mean_gradient,
)
from gloo_launch import gloo_group

from lowmem.memory import offload_activations
from lowmem.optim import (
    APOLLO_MINI,
    AdamW8bit,
    ApolloAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
)

F64, F32 = torch.float64, torch.float32
RIGHT = {"rank": 2, "proj_type": "right", **GAP}
ADAFACTOR_LR = {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "weight_decay": 0.1}
#: Per-parameter clipping threshold: below every gradient norm of these runs, so every update clips.
CLIP = 1e-3
CONV_CHANNELS, CONV_LENGTH = 4, 7
# name -> the fields of ddp_worker.Case: (layer factory, param dtype, optimizer class, groups(model),
# optimizer kwargs, flags). proj_type="right": the side FSDP projects a row-sharded weight on, so one
# process computes the same update.
EXACT_CASES: dict[str, Case] = {
    "galore": (_linear(F64), F64, GaLoreAdamW, lambda m: _split(m, **RIGHT), ADAM, set()),
    "galore_reset_svd": (
        _linear(F64),
        F64,
        GaLoreAdamW,
        lambda m: _split(m, **RIGHT, on_refresh="reset", projector="svd"),
        ADAM,
        set(),
    ),
    "fira_plain": (_linear(F64), F64, FiraAdamW, _all, ADAM, set()),
    # Fira / APOLLO low-rank groups: norms over the whole matrix are all-reduced (optim/sharded.py).
    "fira": (_linear(F64), F64, FiraAdamW, lambda m: _split(m, **RIGHT), ADAM, set()),
    "apollo": (_linear(F64), F64, ApolloAdamW, lambda m: _split(m, **RIGHT), ADAM, set()),
    "apollo_svd": (
        _linear(F64),
        F64,
        ApolloAdamW,
        lambda m: _split(m, **RIGHT, proj="svd", on_refresh="project"),
        ADAM,
        set(),
    ),
    "apollo_mini": (
        _linear(F64),
        F64,
        ApolloAdamW,
        lambda m: _split(m, **{**APOLLO_MINI, "proj_type": "right"}, **GAP),
        ADAM,
        set(),
    ),
    # GaLoreAdafactor: column means, mean(r), RMS(U), RMS(W) are all-reduced (optim/sharded.py);
    # the plain group holds the sharded biases (element-wise moment, whole-tensor RMS).
    "adafactor_lr": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        lambda m: _split(m, **RIGHT),
        {**ADAFACTOR_LR, "beta1": None},
        set(),
    ),
    "adafactor_scaled_beta1": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        lambda m: _split(m, **RIGHT),
        {"beta1": 0.9, "weight_decay": 0.1},  # relative_step and scale_parameter: the defaults
        set(),
    ),
    "adafactor_reset_svd": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        lambda m: _split(m, **RIGHT, on_refresh="reset", projector="svd"),
        {**ADAFACTOR_LR, "beta1": 0.9, "clip_threshold": 0.5},
        set(),
    ),
    "adafactor_plain": (_linear(F64), F64, GaLoreAdafactor, _all, {"beta1": None}, set()),
    "galore8bit": (
        _linear(F32),
        F32,
        GaLoreAdamW8bit,
        lambda m: _split(m, **RIGHT),
        {**ADAM, "min_8bit_size": 0},
        set(),
    ),
    "adamw8bit": (_linear(F32), F32, AdamW8bit, _all, {**ADAM, "min_8bit_size": 0}, set()),
    "sparse_low_rank": CASES["sparse_low_rank"],
    "low_rank": CASES["low_rank"],
    "int8_linear": (CASES["int8_linear"][0], F32, GaLoreAdamW, _all, ADAM, set()),
    "offload": (_linear(F64), F64, GaLoreAdamW, lambda m: _split(m, **RIGHT), ADAM, {"offload"}),
    # Per-parameter clipping: the norm of the whole gradient, squared norms all-reduced.
    "galore_clip": (
        _linear(F64),
        F64,
        GaLoreAdamW,
        lambda m: _split(m, **RIGHT),
        {**ADAM, "max_grad_norm_per_param": CLIP},
        set(),
    ),
    # Conv weights (out, in, k) in a plain Adafactor group: factored over (in, k), inside each
    # rank's rows (out = 5: 3 and 2 rows); RMS(W) and RMS(U) (clip_threshold) all-reduced.
    "adafactor_conv": (
        None,
        F64,
        GaLoreAdafactor,
        _all,
        {"beta1": 0.9, "clip_threshold": 0.5, "weight_decay": 0.1},
        {"conv"},
    ),
    # Layer-wise: FSDP2 runs the hooks after its reduce-scatter, on the averaged row shards.
    # accumulation_steps=2: FSDP2 adds the 2nd micro-batch's reduced shard into .grad (GaLore
    # projects the 1st at once outside refresh windows); the scheduler halves lr every update.
    "layerwise_galore_k2_sched": (
        _linear(F64),
        F64,
        GaLoreAdamW,
        lambda m: _split(m, **RIGHT),
        {**ADAM, "layerwise": True, "accumulation_steps": 2},
        {"sched"},
    ),
    "layerwise_galore8bit": (
        _linear(F32),
        F32,
        GaLoreAdamW8bit,
        lambda m: _split(m, **RIGHT),
        {**ADAM, "min_8bit_size": 0, "layerwise": True},
        {"sched"},
    ),
    # Fira's ‖S‖ and the clipping norm: all-reduces issued from inside the hooks.
    "layerwise_fira_k2_clip": (
        _linear(F64),
        F64,
        FiraAdamW,
        lambda m: _split(m, **RIGHT),
        {**ADAM, "layerwise": True, "accumulation_steps": 2, "max_grad_norm_per_param": CLIP},
        set(),
    ),
    "layerwise_apollo": (
        _linear(F64),
        F64,
        ApolloAdamW,
        lambda m: _split(m, **RIGHT),
        {**ADAM, "layerwise": True},
        {"sched"},
    ),
    # FSDP2's own accumulation: set_requires_gradient_sync(False) on the 1st of 2 micro-batches
    # (no reduce-scatter, so no hook runs), accumulation_steps=1 (counting is FSDP2's then).
    "layerwise_galore_no_sync": (
        _linear(F64),
        F64,
        GaLoreAdamW,
        lambda m: _split(m, **RIGHT),
        {**ADAM, "layerwise": True},
        {"no_sync"},
    ),
    # A 1-row head on 2 ranks: rank 1 holds no rows of layer2 (weight 1×16, bias 1), yet must issue
    # every all-reduce its hooks do (clipping norm, Adafactor's column means, RMS(W), RMS(U)).
    "layerwise_adafactor_head1_clip": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        _all,  # plain groups: a 1-row weight cannot be projected (rank >= min(m, n))
        {"beta1": 0.9, "clip_threshold": 0.5, "layerwise": True, "max_grad_norm_per_param": CLIP},
        {"head1"},
    ),
    # Layer-wise GaLoreAdafactor on projected weights: the hooks run the sharded low-rank update
    # (column means of R and mean(r) all-reduced, RMS(U) for clipping, mean(r) when a refresh
    # carries the factors) from the accumulated full gradient (Adafactor does not accumulate in
    # low-rank form); the scheduler halves the external lr every update.
    "layerwise_adafactor_k2_sched": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        lambda m: _split(m, **RIGHT),
        {**ADAFACTOR_LR, "beta1": 0.9, "layerwise": True, "accumulation_steps": 2},
        {"sched"},
    ),
    # Plain layer-wise GaLoreAdafactor with its own step size: relative_step and scale_parameter
    # (RMS(W) all-reduced inside the hooks) and clip_threshold=0.5 (RMS(U) all-reduced; every
    # update clips: RMS(U) ≈ 1 at the first steps).
    "layerwise_adafactor_relative_clip": (
        _linear(F64),
        F64,
        GaLoreAdafactor,
        _all,
        {"clip_threshold": 0.5, "weight_decay": 0.1, "layerwise": True},
        set(),
    ),
}
#: Optimizer keywords of layer-wise stepping: the single-process reference runs step() without them.
LAYERWISE_KEYS = ("layerwise", "accumulation_steps")
#: The shapes of the DTensors gathered whole (``DTensor.full_tensor``) inside :func:`_gathers_into`.
_gathered: list[tuple[int, ...]] | None = None


def _record_gathers() -> None:
    """Wrap ``DTensor.full_tensor`` (once per process) to record what is gathered inside
    :func:`_gathers_into`: the optimizer's work (backward with its hooks, step()), not the worker's
    own gathers of the parameters for comparison."""
    from torch.distributed.tensor import DTensor

    full_tensor = DTensor.full_tensor

    def recorded(self: DTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _gathered is not None:
            _gathered.append(tuple(self.shape))
        return full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = recorded  # type: ignore[method-assign]


@contextlib.contextmanager
def _gathers_into(shapes: list[tuple[int, ...]]) -> Iterator[None]:
    global _gathered
    _gathered = shapes
    try:
        yield
    finally:
        _gathered = None


class ConvTwo(nn.Module):
    """``layer2(tanh(layer1(x)))`` with 1-D convolutions: 3-D weights (5, 4, 3) and (4, 5, 3)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer1 = nn.Conv1d(CONV_CHANNELS, 5, 3, padding=1, dtype=dtype)
        self.layer2 = nn.Conv1d(5, CONV_CHANNELS, 3, padding=1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(torch.tanh(self.layer1(x)))


def _batch(name: str, step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if "head1" in EXACT_CASES[name][5]:
        x, y = batch(step, dtype)
        return x, y[:, :1]
    if "conv" not in EXACT_CASES[name][5]:
        return batch(step, dtype)
    gen = torch.Generator().manual_seed(2000 + step)
    shape = (GLOBAL_BATCH, CONV_CHANNELS, CONV_LENGTH)
    x, y = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))
    return x.to(dtype), y.to(dtype)


def _model_and_optimizer(name: str, mesh: Any = None) -> tuple[nn.Module, Any, Any, Any]:
    """The case's model (FSDP2-sharded on ``mesh``), optimizer, offload context and scheduler.

    Without ``mesh`` (the single-process reference) the optimizer is built without the
    layer-wise keywords: one process on the global batch with step().
    """
    make_layer, dtype, optimizer_cls, groups, kwargs, flags = EXACT_CASES[name]
    torch.manual_seed(0)
    model = ConvTwo(dtype) if "conv" in flags else TwoLayer(make_layer)
    if "head1" in flags:
        model.layer2 = make_layer(model.layer2.in_features, 1)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.layer1, model.layer2):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        kwargs = {key: value for key, value in kwargs.items() if key not in LAYERWISE_KEYS}
    # keep=model with DTensor parameters: their local shards' storages are the ones kept.
    offload = (
        offload_activations(keep=model, emulate_device=True, min_bytes=0) if "offload" in flags else None
    )
    opt = optimizer_cls(groups(model), **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if "sched" in flags else None
    return model, opt, offload, sched


def _part_loss(
    name: str,
    model: nn.Module,
    offload: Any,
    step: int,
    shard: int,
    world: int,
    part: int = 0,
    parts: int = 1,
) -> torch.Tensor:
    """The loss of micro-batch ``part`` of ``parts`` of rank ``shard``'s share of global batch ``step``,
    divided by ``parts`` (accumulated gradients are summed)."""
    x, y = _batch(name, step, EXACT_CASES[name][1])
    size = GLOBAL_BATCH // world // parts
    rows = slice(
        shard * GLOBAL_BATCH // world + part * size, shard * GLOBAL_BATCH // world + (part + 1) * size
    )
    loss = _loss(model, x[rows], y[rows], offload)
    return loss / parts if parts > 1 else loss


def _moved(model: nn.Module, before: list[torch.Tensor]) -> list[bool]:
    """Per parameter, whether it differs from ``before`` (every rank gathers every parameter)."""
    params = [param.full_tensor() for param in model.parameters()]
    return [not torch.equal(param, old) for param, old in zip(params, before, strict=True)]


def _window(
    name: str,
    model: nn.Module,
    opt: Any,
    offload: Any,
    step: int,
    rank: int,
    world: int,
    gathers: list[tuple[int, ...]],
) -> dict:
    """One update of a layer-wise case; returns what was observed around it (``gathers``: see
    :func:`train_exact`).

    ``moved_early``: a parameter moved before the window's last backward (it must not);
    ``in_backward``: after the last backward and before step(), every parameter moved and no
    gradient is left (the update ran inside backward and freed them). The last update of an
    accumulating case gets a single micro-batch (the whole half) and ``close_window()``.
    """
    flags, k = EXACT_CASES[name][5], EXACT_CASES[name][4].get("accumulation_steps", 1)
    short = k > 1 and step == STEPS - 1
    parts = 1 if short else (2 if "no_sync" in flags else k)
    before = [p.full_tensor().clone() for p in model.parameters()]
    moved_early = False
    for part in range(parts):
        if "no_sync" in flags:
            model.set_requires_gradient_sync(part == parts - 1)
        with _gathers_into(gathers):
            _part_loss(name, model, offload, step, rank, world, part, parts).backward()
        if part < parts - 1 or short:
            moved_early |= any(_moved(model, before))
    if short:
        with _gathers_into(gathers):
            opt._layerwise.close_window(opt)  # the loader ran out: apply what this window holds
    moved = all(_moved(model, before))
    freed = all(p.grad is None for p in model.parameters())
    return {"moved_early": moved_early, "in_backward": moved and freed}


def train_exact(name: str, mesh: Any, rank: int, world_size: int) -> dict[str, Any]:
    """:data:`STEPS` FSDP2 updates of case ``name`` on this rank's half of each global batch.

    Returns the full parameters; the state every rank must hold identically; per parameter,
    this rank's (codes, block scales) sizes of
    8-bit states, to check that blocks are per shard; for layer-wise cases, per update, what
    :func:`_window` observed; the shapes of the DTensors the optimizer gathered whole (in
    backward, with its hooks, and in step()).
    """
    model, opt, offload, sched = _model_and_optimizer(name, mesh)
    layerwise = EXACT_CASES[name][4].get("layerwise", False)
    windows: list[dict] = []
    gathers: list[tuple[int, ...]] = []
    for step in range(STEPS):
        if layerwise:
            windows.append(_window(name, model, opt, offload, step, rank, world_size, gathers))
        else:
            with _gathers_into(gathers):
                _part_loss(name, model, offload, step, rank, world_size).backward()
        with _gathers_into(gathers):
            opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
    blocks = {
        key: (opt.state[param]["exp_avg"].numel(), opt.state[param]["exp_avg_absmax"].numel())
        for key, param in model.named_parameters()
        if "exp_avg_absmax" in opt.state[param]
    }
    # State every rank must hold identically (a gathered parameter cannot show a disagreement:
    # each rank contributes only its own rows): Adafactor's column statistics of matrices, which
    # span every rank's rows and are all-reduced.
    replicated = {
        key: opt.state[param]["exp_avg_sq_col"].clone()
        for key, param in model.named_parameters()
        if param.dim() == 2 and "exp_avg_sq_col" in opt.state[param]
    }
    params = {key: param.full_tensor() for key, param in model.named_parameters()}
    return {
        "params": params,
        "blocks": blocks,
        "windows": windows,
        "gathers": gathers,
        "replicated": replicated,
    }


def train_exact_reference(name: str, world_size: int = 2) -> dict[str, torch.Tensor]:
    """One process, each gradient formed as (g₀/2) + (g₁/2) from the two halves (FSDP's mean),
    step() without layer-wise stepping."""
    model, opt, offload, sched = _model_and_optimizer(name)
    for step in range(STEPS):
        set_mean_gradient(
            model, opt, lambda k, step=step: _part_loss(name, model, offload, step, k, world_size)
        )
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
    return {key: param.detach().clone() for key, param in model.named_parameters()}


def grad_memory(mesh: Any, layerwise: bool) -> dict[str, Any]:
    """Sharded gradient bytes this rank holds: the peak, and the storages alive after backward.

    A 4-layer stack of 32×32 linears, each layer ``fully_shard``-ed, GaLoreAdamW (rank 4), 2
    updates. Gradients are counted by storage (FSDP2's sharded gradients of one layer are views
    of that layer's reduce-scatter output) in a post-accumulate-grad hook registered before the
    optimizer's, so it sees each gradient the moment FSDP2 sets it, before an update frees it,
    and once more after each backward.
    """
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(4)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    peak = [0]

    def live() -> dict[int, int]:
        grads = [p.grad._local_tensor for p in params if p.grad is not None]
        return {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads}

    def measure(_: torch.Tensor) -> None:
        peak[0] = max(peak[0], sum(live().values()))

    for param in params:
        param.register_post_accumulate_grad_hook(measure)
    opt = GaLoreAdamW(_split(model, **RIGHT), lr=1e-3, layerwise=layerwise)
    after_backward = []
    for step in range(2):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        after_backward.append(sorted(live().values()))
        measure(x)
        opt.step()
        opt.zero_grad()
    return {"peak": peak[0], "after_backward": after_backward}


def refusals(mesh: Any) -> dict[str, str]:
    """The errors of unsupported sharded combinations (each must name what to do instead)."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    attempts = {
        "proj_left": (lambda m: _split(m, rank=2, proj_type="left"), {}, True),
        # FSDP2 already averaged the gradients the hooks get: a second all-reduce is refused.
        "layerwise_process_group": (
            _all,
            {"layerwise": True, "process_group": torch.distributed.group.WORLD},
            True,
        ),
        # The root not sharded: layer2's plain parameters get local, un-reduced gradients, which
        # the layer-wise guard still refuses while it accepts layer1's FSDP2 shards.
        "layerwise_plain_param": (_all, {"layerwise": True}, False),
    }
    for name, (groups, kwargs, shard_root) in attempts.items():
        torch.manual_seed(0)
        model = TwoLayer(_linear(F64))
        fully_shard(model.layer1, mesh=mesh)
        if shard_root:
            fully_shard(model, mesh=mesh)
        opt = GaLoreAdamW(groups(model), **ADAM, **kwargs)
        x, y = batch(0, F64)
        try:
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        except (NotImplementedError, ValueError, RuntimeError) as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
        else:
            out[name] = "no error"
    return out


def apollo_nan_refresh(mesh: Any = None, rank: int = 0) -> dict[str, Any]:
    """APOLLO (random projection, ``update_proj_gap=2``) whose 3rd update, a refresh, gets a NaN in
    one element of layer1's weight gradient: under FSDP2 (``mesh``) in rank 0's rows only, in one
    process (no ``mesh``) in the same global row. Returns, per projected weight, ``last_refresh``
    and ``proj_seed`` after that update, and the shapes the optimizer gathered whole in it.
    Single-process semantics: the NaN weight postpones its refresh, layer2's refreshes."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TwoLayer(_linear(F64))
    if mesh is not None:
        for layer in (model.layer1, model.layer2):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = ApolloAdamW(_split(model, **RIGHT), **ADAM)
    gathers: list[tuple[int, ...]] = []
    for step in range(3):
        x, y = batch(step, F64)
        ((model(x) - y) ** 2).mean().backward()
        if step == 2 and rank == 0:
            grad = model.layer1.weight.grad
            (grad.to_local() if mesh is not None else grad)[0, 0] = float("nan")
        with _gathers_into(gathers) if mesh is not None else contextlib.nullcontext():
            opt.step()
        opt.zero_grad()
    states = {key: opt.state[p] for key, p in model.named_parameters() if p.dim() == 2}
    return {
        "last_refresh": {key: int(state["last_refresh"]) for key, state in states.items()},
        "proj_seed": {key: int(state["proj_seed"]) for key, state in states.items()},
        "gathers": gathers,
    }


def refusal_closes_the_backward(mesh: Any) -> dict[str, Any]:
    """The layer-wise guard refuses a plain parameter's local gradient *after* FSDP2 ran the hooks of
    a sharded layer in the same backward (layer1 plain, hooked after layer2, ``fully_shard``-ed, in
    backward order), ``accumulation_steps=2``: that backward must count as micro-batch 1 and leave no
    backward open, or the next one would be counted as part of it. (What the next backward then
    does is tested in one process, tests/optim/test_layerwise.py: FSDP2 itself does not recover from
    an exception inside backward; its next backward leaves layer2 unsharded and reduces nothing.)"""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TwoLayer(_linear(F64))
    fully_shard(model.layer2, mesh=mesh)
    opt = GaLoreAdamW(_all(model), **ADAM, layerwise=True, accumulation_steps=2)
    x, y = batch(0, F64)
    try:
        ((model(x) - y) ** 2).mean().backward()
        error = "no error"
    except RuntimeError as exc:
        error = f"{type(exc).__name__}: {exc}"
    stepper = opt._layerwise
    return {"error": error, "position": stepper.position, "open": stepper._root is not None}


def main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from lowmem.bench import fsdp_example

    _record_gathers()
    with gloo_group(rank, world_size, init_file):
        mesh = init_device_mesh("cpu", (world_size,))
        results: dict[str, Any] = {"exact": {n: train_exact(n, mesh, rank, world_size) for n in EXACT_CASES}}
        results["refusals"] = refusals(mesh)
        results["refusal_closes_the_backward"] = refusal_closes_the_backward(mesh)
        results["apollo_nan_refresh"] = apollo_nan_refresh(mesh, rank)
        results["grad_memory"] = {
            mode: grad_memory(mesh, mode == "layerwise") for mode in ("step", "layerwise")
        }
        config = fsdp_example.Config()
        results["llama_fsdp"] = fsdp_example.train(config, mesh, engine="fsdp")
        results["llama_ddp"] = fsdp_example.train(config, mesh, engine="ddp")
        results["resume"] = fsdp_example.checkpoint_and_resume(config, mesh, Path(out_dir) / "dcp")
        torch.save(results, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
