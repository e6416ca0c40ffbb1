"""Offloaded activation checkpointing, and partial recomputation in the spirit of MEMO (2025).

Checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") keeps only a
block's inputs and recomputes the block in backward. At long sequences even those inputs add up
(``layers × batch × seq × hidden``); :func:`checkpoint` with ``offload=True`` keeps them in host
memory through :class:`~lowmem.memory.ActivationOffload` (side-stream copies, pinned pooled
buffers, prefetch of the previous block's input while this block recomputes), so a checkpointed
model holds almost no activations on the device between forward and backward.

How the inputs get to the host: PyTorch's non-reentrant checkpoint saves the block's positional
tensor arguments as saved tensors *before* installing its own hooks, and the reentrant one saves
them with ``save_for_backward``; both go through the offload context that :func:`checkpoint`
enters around the call. Tensors passed by keyword are held by PyTorch's recompute closure and stay
on the device (transformers passes ``hidden_states`` positionally and the small, shared rotary
tables by keyword).

Partial recomputation (``offload_fraction``): MEMO offloads what fits in host memory and
recomputes the rest. Here a fraction ``f`` of each block's op outputs is offloaded and replayed
instead of recomputed, chosen where recomputation is most expensive per byte: see
:class:`PartialRecompute`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from lowmem.memory.offload import DEFAULT_MIN_BYTES, ActivationOffload, _Kept

__all__ = ["CheckpointingHandle", "PartialRecompute", "apply_checkpointing", "checkpoint"]

_DEFAULT_OFFLOADER: ActivationOffload | None = None
_DEFAULT_LOCK = threading.Lock()


def _default_offloader() -> ActivationOffload:
    """One engine shared by every :func:`checkpoint` call without ``offloader=``: its prefetch order
    spans blocks, so block ``k-1``'s input comes back while block ``k`` recomputes."""
    global _DEFAULT_OFFLOADER
    with _DEFAULT_LOCK:
        if _DEFAULT_OFFLOADER is None:
            _DEFAULT_OFFLOADER = ActivationOffload(DEFAULT_MIN_BYTES)
        return _DEFAULT_OFFLOADER


# -- partial recomputation -------------------------------------------------------------------


def _is_deterministic(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``func`` draws no random numbers: replaying a cached output must leave the RNG
    exactly where recomputing it would, or every later random op in the block would differ."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return True
    # Attention kernels are tagged seeded for their dropout; with dropout_p == 0 they draw nothing.
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            value = args[i] if i < len(args) else kwargs.get("dropout_p", arg.default_value)
            return value == 0
    return False


def _cacheable(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Ops whose output may be replayed: fresh outputs (no aliasing, no mutation), a tensor input
    (factories are free to rerun), and no randomness."""
    schema = func._schema
    if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
        return False
    if not any(isinstance(a, torch.Tensor) for a in tree_flatten((args, kwargs))[0]):
        return False
    return _is_deterministic(func, args, kwargs)


def _aliases_input(outs: list[Any], args: Any) -> bool:
    """Whether an output shares memory with an input (``_unsafe_view`` and friends declare no alias)."""
    inputs = {a.untyped_storage().data_ptr() for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)}
    return any(t is not None and t.untyped_storage().data_ptr() in inputs for t in outs)


def _recompute_flops(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> float:
    """FLOPs to recompute one op: PyTorch's flop_counter formulas for matmuls, attention and
    convolutions; one per output element for everything else (elementwise, norms, casts)."""
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func._overloadpacket)
    if formula is not None:
        try:
            return float(formula(*args, **kwargs, out_val=out))
        except Exception:  # a formula that rejects these arguments: fall back to the element count
            pass
    return float(sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))


@dataclass
class PartialRecomputeStats:
    """Counts over every checkpointed call (bytes are ``Tensor.nbytes``, FLOPs estimated).

    ``saved_*``: op outputs kept (offloaded) in forward; ``replayed_*``: ops served from them
    during recomputation; ``recomputed_*``: ops run again; ``profiled_calls``: forwards that only
    measured their block (the first call of each block signature).
    """

    profiled_calls: int = 0
    saved_ops: int = 0
    saved_bytes: int = 0
    replayed_ops: int = 0
    replayed_flops: float = 0.0
    recomputed_ops: int = 0
    recomputed_flops: float = 0.0


@dataclass
class _Entry:
    func: Any
    flops: float
    values: list[Any]
    spec: Any


@dataclass
class _Call:
    """One checkpointed call: its plan, what its forward saved, and where its replay is."""

    owner: PartialRecompute
    key: Any
    plan: frozenset[int] | None
    engine: ActivationOffload | None
    profile: list[tuple[int, float]] = field(default_factory=list)
    store: dict[int, _Entry] = field(default_factory=dict)
    counter: int = 0
    diverged: bool = False


class _SaveMode(TorchDispatchMode):
    """Forward of a checkpointed block: counts cacheable ops, saves those in the plan."""

    def __init__(self, call: _Call) -> None:
        super().__init__()
        self.call = call

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _cacheable(func, args, kwargs):
            return out
        call = self.call
        index = call.counter
        call.counter += 1
        outs, spec = tree_flatten(out)
        if not all(isinstance(t, torch.Tensor) or t is None for t in outs) or _aliases_input(outs, args):
            # Counted (the replay counts it too) but never saved: not a fresh tensor output.
            if call.plan is None:
                call.profile.append((0, 0.0))
            return out
        if call.plan is not None and index not in call.plan:
            return out
        nbytes = sum(t.nbytes for t in outs if t is not None)
        flops = _recompute_flops(func, args, kwargs, out)
        if call.plan is None:
            call.profile.append((nbytes, flops))
        else:
            packed = [None if t is None else _pack(call.engine, t) for t in outs]
            call.store[index] = _Entry(func, flops, packed, spec)
            call.owner._count(saved_ops=1, saved_bytes=nbytes)
        return out

    def __exit__(self, *exc: Any) -> Any:
        result = super().__exit__(*exc)
        call = self.call
        if call.plan is None and exc[0] is None:
            call.owner._remember_profile(call.key, call.profile)
        return result


class _ReplayMode(TorchDispatchMode):
    """Recomputation of a checkpointed block: serves saved outputs, runs everything else."""

    def __init__(self, call: _Call) -> None:
        super().__init__()
        self.call = call

    def __enter__(self) -> Any:
        self.call.counter = 0
        self.call.diverged = False
        engine = self.call.engine
        if engine is not None:  # start every saved output's copy back before the replay needs it
            engine.prefetch_records(
                v.record for e in self.call.store.values() for v in e.values if hasattr(v, "record")
            )
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not _cacheable(func, args, kwargs):
            return func(*args, **kwargs)
        call = self.call
        index = call.counter
        call.counter += 1
        entry = None if call.diverged else call.store.get(index)
        if entry is not None and entry.func is not func:
            # The replay ran a different op sequence than the forward (global state changed in
            # between): stop serving saved outputs; recomputing is always correct.
            call.diverged = True
            entry = None
        values = None if entry is None else [_unpack(call.engine, v) for v in entry.values]
        if values is None or any(v is _STALE for v in values):
            out = func(*args, **kwargs)
            call.owner._count(recomputed_ops=1, recomputed_flops=_recompute_flops(func, args, kwargs, out))
            return out
        call.owner._count(replayed_ops=1, replayed_flops=entry.flops)
        return tree_unflatten(values, entry.spec)


_STALE = object()


def _pack(engine: ActivationOffload | None, t: torch.Tensor) -> Any:
    return _Kept(t) if engine is None else engine.pack(t.detach())


def _unpack(engine: ActivationOffload | None, packed: Any) -> Any:
    if packed is None:
        return None
    if isinstance(packed, _Kept):
        # Kept by reference: changed in place since (then recompute), and cloned so that in-place
        # ops of the replay cannot reach the forward's tensor.
        if packed.tensor._version != packed.version:
            return _STALE
        return packed.tensor.clone()
    assert engine is not None
    return engine.unpack(packed)


def _signature(obj: Any) -> Any:
    """A hashable description of an argument: tensors by metadata, plain scalars by value."""
    if isinstance(obj, torch.Tensor):
        return ("T", tuple(obj.shape), obj.dtype, str(obj.device), obj.requires_grad)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (tuple, list)):
        return tuple(_signature(o) for o in obj)
    return type(obj).__qualname__


def _block_key(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Blocks with equal keys run the same op sequence: the same code on same-shaped inputs.
    Every layer of a transformer shares one key (and so one plan)."""
    bound: list[Any] = []
    while isinstance(function, functools.partial):
        bound.append((_signature(function.args), _signature(sorted(function.keywords.items()))))
        function = function.func
    if isinstance(function, nn.Module):
        function = type(function).forward
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", function)
    return (code, tuple(bound), _signature(args), _signature(sorted(kwargs.items())))


class PartialRecompute:
    """Offload a fraction of each checkpointed block's activations; recompute the rest.

    MEMO (2025) holds activations in host memory and recomputes what does not fit. Here, inside a
    checkpointed block, every *cacheable* op — fresh output, no aliasing or mutation, no
    randomness, at least one tensor input — is a candidate with output bytes ``b_i`` and recompute
    cost ``c_i`` (FLOPs from ``torch.utils.flop_counter`` for matmuls/attention/convolutions, one
    per output element otherwise). The plan saves the candidates with the highest ``c_i / b_i``
    first, while their total stays within ``offload_fraction × Σ b_i``:

    - ``0``: plain checkpointing (only the block input is kept);
    - ``1``: every candidate output is kept and replayed (no recompute FLOPs, the memory of no
      checkpointing, but in host memory);
    - in between, matmul and attention outputs (hundreds of FLOPs per byte) come first and
      elementwise outputs (a fraction of a FLOP per byte) last, so a small fraction already
      removes most of the recompute time.

    Saved outputs go through the checkpoint's :class:`ActivationOffload` (host memory, prefetched
    when the block's recomputation starts); without offload they stay on the device. During
    recomputation PyTorch's selective-checkpoint hook (``context_fn``) serves them instead of
    running the op; gradients are bitwise those of plain checkpointing.

    The plan is made per block signature (code + argument shapes): the first call of a signature
    runs as plain checkpointing while it measures ``b_i`` and ``c_i``; later calls, including every
    other layer of the same type, use the plan.

    Args:
        offload_fraction: in ``[0, 1]``; the share of each block's candidate output bytes to keep.
    """

    def __init__(self, offload_fraction: float, max_plans: int = 64) -> None:
        if not isinstance(offload_fraction, (int, float)) or not 0.0 <= float(offload_fraction) <= 1.0:
            raise ValueError(f"offload_fraction must be a number in [0, 1], got {offload_fraction!r}")
        self.offload_fraction = float(offload_fraction)
        self.stats = PartialRecomputeStats()
        self._profiles: OrderedDict[Any, list[tuple[int, float]]] = OrderedDict()
        self._plans: dict[Any, frozenset[int]] = {}
        self._max_plans = max_plans
        self._lock = threading.Lock()

    def plan_for(self, profile: list[tuple[int, float]]) -> frozenset[int]:
        """Indices (among a block's cacheable ops, in order) whose outputs are saved."""
        budget = self.offload_fraction * sum(b for b, _ in profile)
        order = sorted(range(len(profile)), key=lambda i: (-profile[i][1] / max(profile[i][0], 1), i))
        chosen: set[int] = set()
        used = 0
        for i in order:
            if used + profile[i][0] <= budget:
                chosen.add(i)
                used += profile[i][0]
        return frozenset(chosen)

    def reset_stats(self) -> None:
        """Zero :attr:`stats` (plans are kept)."""
        with self._lock:
            self.stats = PartialRecomputeStats()

    def profiles(self) -> list[list[tuple[int, float]]]:
        """The measured ``(bytes, FLOPs)`` of every cacheable op, one list per planned block signature."""
        with self._lock:
            return [list(p) for p in self._profiles.values()]

    def _remember_profile(self, key: Any, profile: list[tuple[int, float]]) -> None:
        with self._lock:
            self._profiles[key] = profile
            self._plans[key] = self.plan_for(profile)
            while len(self._profiles) > self._max_plans:
                old, _ = self._profiles.popitem(last=False)
                self._plans.pop(old, None)

    def _count(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self.stats, name, getattr(self.stats, name) + amount)

    def context_fn(
        self,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        engine: ActivationOffload | None,
    ) -> Callable[[], tuple[TorchDispatchMode, TorchDispatchMode]]:
        """A ``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant) for one call of ``function``."""
        key = _block_key(function, args, kwargs)
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            self._count(profiled_calls=1)
        call = _Call(owner=self, key=key, plan=plan, engine=engine)
        return lambda: (_SaveMode(call), _ReplayMode(call))


# -- checkpoint ------------------------------------------------------------------------------


def checkpoint(
    function: Callable[..., Any],
    *args: Any,
    offload: bool = True,
    use_reentrant: bool = False,
    offload_fraction: float | PartialRecompute = 0.0,
    offloader: ActivationOffload | None = None,
    **kwargs: Any,
) -> Any:
    """``torch.utils.checkpoint.checkpoint`` whose kept inputs live in host memory.

    Drop-in for torch's function and for a transformers model's ``_gradient_checkpointing_func``
    (called as ``func(partial(layer.forward, **kwargs), *args)``)::

        model._set_gradient_checkpointing(
            enable=True, gradient_checkpointing_func=functools.partial(lowmem.memory.checkpoint)
        )

    or, simpler, :func:`apply_checkpointing`.

    Args:
        function: the block (a module or any callable); its positional tensor arguments are kept.
        offload: keep the inputs (and saved outputs, see ``offload_fraction``) in host memory. On a
            CPU-only machine tensors already live on the host and this changes nothing.
        use_reentrant: as in torch (``False`` recommended; partial recomputation needs it).
        offload_fraction: a number in ``[0, 1]`` or a :class:`PartialRecompute`: the share of the
            block's op outputs saved (offloaded) instead of recomputed. A plain number uses a plan
            cache shared by every call with that number.
        offloader: the :class:`ActivationOffload` engine to use; default: one shared engine with
            default settings (its prefetch order spans every block).
        **kwargs: passed to ``function`` and to torch's checkpoint (``preserve_rng_state``,
            ``determinism_check``, ``early_stop``, ``context_fn``...).

    Returns:
        ``function(*args, **kwargs)``.
    """
    partial = _as_partial(offload_fraction)
    if partial is not None:
        if use_reentrant:
            raise ValueError(
                "offload_fraction > 0 needs use_reentrant=False (torch's context_fn is non-reentrant only)"
            )
        if "context_fn" in kwargs:
            raise ValueError("pass either context_fn or offload_fraction > 0, not both")
    engine = (offloader if offloader is not None else _default_offloader()) if offload else None
    if partial is not None and torch.is_grad_enabled():
        call_kwargs = {k: v for k, v in kwargs.items() if k not in _TORCH_CHECKPOINT_KWARGS}
        kwargs["context_fn"] = partial.context_fn(function, args, call_kwargs, engine)
    with engine if engine is not None else contextlib.nullcontext():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=use_reentrant, **kwargs)


_TORCH_CHECKPOINT_KWARGS = frozenset(
    {"preserve_rng_state", "context_fn", "determinism_check", "debug", "early_stop"}
)
_SHARED_PARTIALS: dict[float, PartialRecompute] = {}


def _as_partial(offload_fraction: float | PartialRecompute) -> PartialRecompute | None:
    if isinstance(offload_fraction, PartialRecompute):
        # An explicit instance is honoured even at fraction 0: it then only measures the recompute.
        return offload_fraction
    if isinstance(offload_fraction, bool) or not isinstance(offload_fraction, (int, float)):
        raise ValueError(f"offload_fraction must be a number in [0, 1], got {offload_fraction!r}")
    if not 0.0 <= float(offload_fraction) <= 1.0:
        raise ValueError(f"offload_fraction must be a number in [0, 1], got {offload_fraction!r}")
    if offload_fraction == 0:
        return None
    with _DEFAULT_LOCK:
        key = float(offload_fraction)
        if key not in _SHARED_PARTIALS:
            _SHARED_PARTIALS[key] = PartialRecompute(key)
        return _SHARED_PARTIALS[key]


# -- applying it to a model ------------------------------------------------------------------


class _CheckpointedForward:
    """A block's instance-level ``forward``: the class's forward, run through :func:`checkpoint`.

    Set on the instance (``module.forward = ...``), never on the class, so other instances and
    ``state_dict`` keys are untouched, module hooks stay outside the checkpoint (they do not run
    twice), and ``remove()`` restores the class's forward by deleting the attribute.
    """

    def __init__(self, module: nn.Module, checkpoint_fn: Callable[..., Any]) -> None:
        self.module = module
        self.checkpoint_fn = checkpoint_fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = functools.partial(type(self.module).forward, self.module, **kwargs)
        return self.checkpoint_fn(forward, *args)


@dataclass
class CheckpointingHandle:
    """What :func:`apply_checkpointing` did; ``remove()`` undoes it.

    Attributes:
        modules: the checkpointed blocks (for a transformers model: its gradient-checkpointing
            layers).
        offloader: the engine holding their inputs (None without offload); ``offloader.stats``.
        partial_recompute: the plan and counters of partial recomputation (None at fraction 0).
    """

    modules: list[nn.Module]
    offloader: ActivationOffload | None
    partial_recompute: PartialRecompute | None
    _model: nn.Module
    _transformers: bool

    def remove(self) -> None:
        """Stop checkpointing these blocks."""
        if self._transformers:
            self._model._set_gradient_checkpointing(enable=False)
        else:
            for module in self.modules:
                if isinstance(module.__dict__.get("forward"), _CheckpointedForward):
                    del module.forward
        self.modules = []


def apply_checkpointing(
    model: nn.Module,
    block_types: type[nn.Module] | Iterable[type[nn.Module]] | None = None,
    *,
    offload: bool = True,
    offload_fraction: float | PartialRecompute = 0.0,
    use_reentrant: bool = False,
    offloader: ActivationOffload | None = None,
    **checkpoint_kwargs: Any,
) -> CheckpointingHandle:
    """Checkpoint every block of ``model`` (recompute it in backward), its inputs in host memory.

    Args:
        model: any ``nn.Module``; a transformers ``PreTrainedModel`` needs no ``block_types``.
        block_types: module classes to checkpoint (e.g. ``(LlamaDecoderLayer,)``); every instance
            that is not inside another checkpointed instance is wrapped. ``None`` for a transformers
            model: its own gradient-checkpointing layers, through ``model._set_gradient_checkpointing``
            with :func:`checkpoint` as the checkpointing function (transformers then checkpoints only
            in training mode).
        offload: keep the blocks' inputs in host memory (see :func:`checkpoint`).
        offload_fraction: partial recomputation, see :class:`PartialRecompute`.
        use_reentrant: as in ``torch.utils.checkpoint``.
        offloader: the engine; default: a new one that never copies ``model``'s parameters or buffers.
        **checkpoint_kwargs: more keyword arguments for torch's checkpoint.

    Returns:
        A :class:`CheckpointingHandle` (``remove()`` undoes it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    partial = _as_partial(offload_fraction)
    if partial is not None and not isinstance(offload_fraction, PartialRecompute):
        partial = PartialRecompute(partial.offload_fraction)  # its own plans and counters
    engine = None
    if offload:
        engine = offloader if offloader is not None else ActivationOffload(DEFAULT_MIN_BYTES, keep=model)
    checkpoint_fn = functools.partial(
        checkpoint,
        offload=offload,
        use_reentrant=use_reentrant,
        offload_fraction=partial if partial is not None else 0.0,
        offloader=engine,
        **checkpoint_kwargs,
    )
    if block_types is None:
        if not (
            getattr(model, "supports_gradient_checkpointing", False)
            and hasattr(model, "_set_gradient_checkpointing")
        ):
            raise ValueError(
                f"{type(model).__name__} is not a transformers model with gradient-checkpointing layers; "
                "pass block_types=(YourBlock,) to say which modules to checkpoint"
            )
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=checkpoint_fn)
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [
            m
            for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)
        ]
        return CheckpointingHandle(blocks, engine, partial, model, True)
    types = (block_types,) if isinstance(block_types, type) else tuple(block_types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"block_types must be nn.Module subclasses, got {block_types!r}")
    blocks: list[nn.Module] = []
    if isinstance(model, types):
        _wrap(model, checkpoint_fn, blocks)
    else:
        _wrap_outermost(model, types, checkpoint_fn, blocks)
    if not blocks:
        names = ", ".join(t.__name__ for t in types)
        raise ValueError(f"no module of block_types ({names}) found in {type(model).__name__}")
    return CheckpointingHandle(blocks, engine, partial, model, False)


def _wrap_outermost(
    module: nn.Module,
    types: tuple[type[nn.Module], ...],
    checkpoint_fn: Callable[..., Any],
    out: list[nn.Module],
) -> None:
    for child in module.children():
        if isinstance(child, types):
            _wrap(child, checkpoint_fn, out)
        else:
            _wrap_outermost(child, types, checkpoint_fn, out)


def _wrap(module: nn.Module, checkpoint_fn: Callable[..., Any], out: list[nn.Module]) -> None:
    if isinstance(module.__dict__.get("forward"), _CheckpointedForward):
        raise ValueError(
            f"{type(module).__name__} is already checkpointed; call remove() on its handle first"
        )
    module.forward = _CheckpointedForward(module, checkpoint_fn)
    out.append(module)
