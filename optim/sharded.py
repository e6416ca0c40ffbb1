r"""FSDP2 support: lowmem optimizers on row-sharded DTensor parameters (``fully_shard``).

``torch.distributed.fsdp.fully_shard`` turns each parameter into a ``DTensor`` whose rank-local
part is a block of rows (placement ``Shard(0)`` on a 1-D mesh of w ranks), and hands the
optimizer a gradient sharded the same way (after its reduce-scatter). A lowmem optimizer then
updates each rank's rows and nothing else, keeping per-rank memory proportional to 1/w:

**Plain parameters** (groups without ``rank``, and rank >= min(m, n)) get AdamW element-wise on
the local rows; the moments are local tensors of the local shape. Exactly the single-process
update, with no communication.

**Projected parameters** (GaLoreAdamW and its 8-bit preset): the projection acts on the
*unsharded* side. For a row block G_i (m_i×n) of G and a right basis Q (r×n)::

    R_i = G_i Qᵀ        is the block of rows i of R = G Qᵀ            (m_i×r)
    M_i, V_i            the rows i of GaLore's moments                  (m_i×r, 2·m·r/w per rank)
    W_i ← W_i − lr·scale·N_i Q                                          (the rows i of the update)

so with one basis Q shared by the ranks, every rank runs the single-process GaLore update on
its rows with no per-step communication of gradients or moments. Hence the rules:

- ``proj_type`` ``"std"`` / ``"reverse_std"`` / ``"right"`` all project sharded weights on the
  right; ``"left"`` and ``"full"`` would need an all-reduce of Pᵀ G every step and r×n moments
  on every rank, and are refused (ValueError naming ``proj_type``).
- **Refresh: gather, then project locally** (the default and only mode). At a refresh the
  gradient is all-gathered (``DTensor.full_tensor``, one m×n matrix at a time, freed right
  after: the same transient FSDP itself allocates to unshard a layer for forward), every rank
  computes the same basis from the same full gradient with the same code, and the rank keeps
  its slice of it. So the basis is GaLore's top-r subspace of the *whole* gradient, and a
  sharded run follows a single-process run up to rounding. The alternative, a basis per local
  row block (no gather, w different bases), changes the algorithm with the world size and
  makes checkpoints depend on it; we do not offer it.
- **The basis is sharded too**: each rank stores the columns ``[k·⌈n/w⌉, (k+1)·⌈n/w⌉)`` of Q
  (r×⌈n/w⌉) and all-gathers Q (r×n, a fraction r/m of FSDP's own per-step all-gather of W)
  for the step. State per rank for an m×n weight: (2·m·r + n·r)/w elements, against 2·m·r + n·r
  on one process (``std`` with m >= n) — exactly 1/w.
- **8-bit states** (``state_dtype="int8"``) are quantized per local tensor: a block of 256
  never straddles two ranks' rows.

**FiraAdamW and ApolloAdamW** (APOLLO-Mini included) follow the same scheme (right side, the
rows i of every moment): their channels are then the rows, so channel norms and scaling
factors are local, and the few norms over the whole matrix — Fira's ‖S‖ for the norm-growth
limiter, APOLLO's ‖s ⊙ G‖ for it and, tensor-wise (APOLLO-Mini), ‖N‖, ‖R‖, ‖G‖ — are summed
over the ranks as squared norms (:meth:`ShardedParam.reduce_sum`, an all-reduce of one scalar
each), so every rank computes the single-process factors. APOLLO's random projection Q (r×n)
depends only on n and a seed drawn from the *global* shape and ordinal, so it is the same on
every rank and regenerated locally. Its refresh reads the gradient only to postpone itself when
the gradient is not finite, so it gathers nothing: the ranks' local sums are all-reduced (one
scalar, :func:`all_finite`) and every rank takes the single-process decision, even when only one
rank's rows hold a NaN. (``proj="svd"`` computes its basis from the gathered gradient, as GaLore.)

**GaLoreAdafactor** (low-rank groups, right side, and plain groups of 1-D and 2-D tensors):
R_k = G_k Qᵀ (or G_k itself, plain) is the row block k of R, so Adafactor's row statistics r
are local; its column means c and mean(r) span every rank's rows (the local column sums, Σ r_k
and m_k in one all-reduce of n + 2 numbers, divided by m), and RMS(U) for update clipping,
RMS(W) for ``scale_parameter`` and mean(r) at a ``"project"`` refresh are whole-tensor
(squared sums and counts all-reduced). Every rank then holds the single-process c and step
size. Plain tensors of more than 2 dims (conv weights (out, in, k...)) factor over their last
two dims, as on one process: both statistics and mean(r) reduce over dims -1 and -2 for each
index of the leading dims, and FSDP2 shards dim 0, a leading dim, so they stay inside a rank's
rows and only RMS(U) and RMS(W) are all-reduced (``GaLoreAdafactor._full_rank_step``).

**Per-parameter clipping** (``max_grad_norm_per_param=c``) scales each gradient by
min(1, c / (‖G‖ + 1e-6)) with the norm of the *whole* gradient, sqrt(Σ_k ‖G_k‖²): one
all-reduce of a scalar per parameter, so every rank scales its rows by the single-process factor.

**Layer-wise stepping** (``layerwise=True``, :mod:`lowmem.optim.layerwise`). FSDP2 runs a
sharded parameter's post-accumulate-grad hooks itself: after a layer's reduce-scatter it sets
the parameter's ``.grad`` to the averaged row shard (a ``Shard(0)`` DTensor; added to the
existing one when ``.grad`` is set, which is how micro-batches accumulate without
``set_requires_gradient_sync(False)``) and calls the hooks (torch 2.13,
``fsdp/_fully_shard/_fsdp_collectives.py``, ``foreach_reduce``). The optimizer's hook then runs
the update above on the rank's rows and frees ``.grad``, so a rank holds the sharded gradient
of one layer (FSDP2's reduce-scatter output for that layer) instead of the whole model's 1/w
(measured in tests/distributed/test_fsdp.py: 2112 bytes, one 32×32 layer's half, against
8448 for step() with 4 layers). The gradient a hook gets is already averaged, so the guard
against updating from a rank's local gradient accepts it (a DTensor gradient that is not
``Shard(0)``, e.g. ``Partial``, is refused) and ``process_group`` is refused for it.

Hooks may issue collectives (the basis all-gather, the gradient gather at a refresh, the scalar
all-reduces of Fira, APOLLO (its random refresh's finiteness included), Adafactor and clipping,
the basis all-gather of a low-rank accumulation). That is safe because every rank issues them in
the same order: FSDP2 calls the hooks synchronously, on the thread running backward, from each
layer's post-backward, which runs in autograd's order over the same graph on every rank (FSDP2's
own reduce-scatters and all-gathers rely on that same order); inside a layer, in the layer's fixed
parameter order; and a window's end-of-backward flush (parameters with no gradient in its last
micro-batch) in the order their gradients first arrived. So every rank's sequence of collectives
on the mesh's group is the same interleaving of FSDP2's and the optimizer's. It needs what FSDP2
needs: the same parameters get gradients on every rank in every backward.

Accumulation, two ways: ``accumulation_steps=k`` with a reduce-scatter per micro-batch (each
backward runs the hooks; the sharded gradients accumulate in ``.grad``, GaLore's in low-rank
form; memory stays 1/w), or ``set_requires_gradient_sync(False)`` for all but the last
micro-batch with ``accumulation_steps=1`` (FSDP2 then keeps every layer's *unsharded*
gradient, w times more, and runs the hooks once; less communication). Do not combine them:
hooks do not run in a backward without gradient sync, so the optimizer's count would skip those
micro-batches. Keep FSDP2's default ``reshard_after_backward=True`` in the backward that
updates: an unsharded copy kept after backward would not see the update.

**Checkpoints.** The optimizer keeps plain local tensors in ``optimizer.state`` (the kernels
take plain tensors); ``state_dict()`` wraps the state of sharded parameters into DTensors on the
parameter's mesh (moments ``Shard(0)``, the basis ``Shard(1)``, 8-bit block scales as a (world size × blocks)
DTensor ``Shard(0)``, one row per rank padded to the largest rank's count; step counters stay
plain, equal on every rank), which is
what ``torch.distributed.checkpoint`` saves shard by shard and what
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
``set_optimizer_state_dict`` expect; ``load_state_dict`` turns them back into local tensors.
A resumed run continues bit for bit (tested). DCP reshards DTensors on load, so fp32 / fp64
states resume at another world size too (2 → 1 and 1 → 2 ranks tested: GaLore, Fira, APOLLO).
8-bit states are quantized in blocks of each rank's own rows, so they load only at the world
size that saved them: elsewhere the global shape of ``*_absmax`` differs and DCP refuses the
checkpoint with a size mismatch naming it (tested), never reading one block layout as another.
``set_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True))`` (no DCP, so no
size check) hands ``load_state_dict`` scales of another world size's rows, which
:func:`localize_state` refuses (ValueError naming the key and both world sizes; tested). DCP
checkpoints written before this layout (flat scales, global shape (world size · blocks,)) fail
DCP's size check too, naming ``*_absmax`` (no conversion is offered: resume them with the
lowmem version that wrote them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lowmem.kernels.blockwise_quant import num_blocks

if TYPE_CHECKING:
    from lowmem.optim.lowrank_base import LowRankOptimizer

__all__ = [
    "ShardedParam",
    "all_finite",
    "check_reduced_grad",
    "distribute_state",
    "global_param",
    "global_shape",
    "is_dtensor",
    "local_tensor",
    "localize_state",
    "reduce_sum_of",
    "sharded_side",
]

#: proj_type values that project a row-sharded weight on its unsharded (right) side.
RIGHT_PROJ_TYPES = ("std", "reverse_std", "right")


#: Types that are never DTensors: the common case of every optimizer step, answered without
#: touching torch.distributed (is_dtensor runs several times per parameter per step).
_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or gradient)."""
    if type(tensor) in _PLAIN_TYPES or not isinstance(tensor, Tensor) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor  # cached after the first call

    return isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """The rank-local part of a DTensor (sharing its storage), or ``tensor`` itself."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _check_row_sharded(param: Tensor, name: str = "a parameter") -> None:
    from torch.distributed.tensor import Shard

    placements = tuple(param.placements)  # type: ignore[attr-defined]
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):  # type: ignore[attr-defined]
        raise NotImplementedError(
            f"{name} is a DTensor with placements {placements} on a {param.device_mesh.ndim}-D mesh; "
            "lowmem optimizers support FSDP2's default row sharding (Shard(0) on a 1-D mesh) only; "
            "use fully_shard(..., mesh=init_device_mesh(device, (world_size,))) without "
            "shard_placement_fn, or HSDP's replicate dimension outside lowmem"
        )


def sharded_side(param: Tensor, proj_type: str) -> str:
    """The projection side of a row-sharded weight: always ``"right"`` (module docstring)."""
    _check_row_sharded(param)
    if proj_type not in RIGHT_PROJ_TYPES:
        raise ValueError(
            f"Invalid proj_type: {proj_type!r} for a row-sharded (FSDP2) weight of shape "
            f"{tuple(param.shape)}; use one of {RIGHT_PROJ_TYPES}, which project its unsharded "
            "side, so each rank projects its own rows without communication"
        )
    return "right"


class ShardedParam:
    """One FSDP2 parameter during its update, as a context manager (``with shard: ...``).

    Inside: ``local`` is the rank's block of rows (a plain tensor sharing the DTensor's storage,
    so the kernels update the parameter in place) with ``local.grad`` set to the local gradient,
    and ``state["proj_right"]`` is the whole r×n basis (all-gathered from the ranks' columns).
    On exit the rank keeps only its columns of the basis (a basis computed inside, at a refresh,
    is the same on every rank: the same full gradient and code) and ``local.grad`` is dropped,
    so no reference outlives ``zero_grad``. While inside, ``optimizer._active_shard`` is this
    object, so an optimizer's hooks reach it (:func:`reduce_sum_of`, :func:`global_param`)
    without a change to the base class's signatures.
    """

    def __init__(self, param: Tensor, state: dict[str, Any], optimizer: Any = None) -> None:
        self.param = param
        self.local: Tensor = param._local_tensor  # type: ignore[attr-defined]
        self.state = state
        self.mesh = param.device_mesh  # type: ignore[attr-defined]
        self.optimizer = optimizer

    @classmethod
    def of(
        cls, optimizer: LowRankOptimizer, param: Tensor, side: str | None, state: dict[str, Any]
    ) -> ShardedParam | None:
        """``None`` for plain tensors; for a DTensor, check that it is supported and wrap it."""
        if not is_dtensor(param):
            return None
        _check_row_sharded(param)
        _check_supported(optimizer, param, side)
        return cls(param, state, optimizer)

    def __enter__(self) -> ShardedParam:
        if self.optimizer is not None:
            self.optimizer._active_shard = self
        self.local.grad = local_tensor(self.param.grad)
        if "proj_right" in self.state:
            self.state["proj_right"] = _gather_columns(self.state["proj_right"], self.mesh, self.param.shape)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.optimizer is not None:
            self.optimizer._active_shard = None
        self.local.grad = None
        if "proj_right" in self.state:
            self.state["proj_right"] = _column_slice(self.state["proj_right"], self.mesh)

    def full_grad(self) -> Tensor:
        """The whole m×n gradient, all-gathered (at a refresh only; the caller drops it after)."""
        rows = self.param.shape[0]
        return self.param.grad.full_tensor().reshape(rows, -1)  # type: ignore[union-attr]

    def reduce_sum(self, partial: Tensor) -> Tensor:
        """``partial`` summed over the ranks of the parameter's mesh (all-reduce SUM); a new tensor.

        Every rank must call it, in the same order: it is reached from the same code path on every
        rank (each rank steps every parameter, even one with no local rows).
        """
        total = partial.clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM, group=self.mesh.get_group())
        return total


def check_reduced_grad(param: Tensor, what: str) -> None:
    """Refuse a DTensor parameter's gradient that is not FSDP2's reduced row shard.

    FSDP2 hands over ``Shard(0)`` gradients that its reduce-scatter already averaged over the
    ranks; a ``Partial`` gradient (tensor parallelism, or a sum not reduced yet) would be
    updated from as if it were the whole gradient, so it is refused, naming ``what``.
    """
    from torch.distributed.tensor import Shard

    grad = param.grad
    placements = tuple(grad.placements) if is_dtensor(grad) else None  # type: ignore[union-attr]
    if placements != (Shard(0),):
        raise NotImplementedError(
            f"{what}: the gradient of this row-sharded (DTensor) parameter is "
            f"{'a plain tensor' if placements is None else f'a DTensor with placements {placements}'}, "
            "not FSDP2's reduced row shard (Shard(0)); lowmem updates DTensor parameters from the "
            "gradients fully_shard hands over: use fully_shard(..., mesh=init_device_mesh(device, "
            "(world_size,)))"
        )


def reduce_sum_of(optimizer: Any) -> Callable[[Tensor], Tensor] | None:
    """The all-reduce sum of the parameter being updated when it is row-sharded, else None."""
    shard = getattr(optimizer, "_active_shard", None)
    return None if shard is None else shard.reduce_sum


def all_finite(optimizer: Any, grad: Tensor) -> bool:
    """Whether ``grad`` holds no NaN or inf, via its sum (non-finite whenever an element is).

    During the update of a row-sharded parameter ``grad`` is this rank's rows (m_i×n): the local
    sums (fp32 or wider) are all-reduced, one scalar, and every rank gets the answer for the whole
    gradient, so a NaN in one rank's rows makes every rank decide the same way, without the m×n
    all-gather of :meth:`ShardedParam.full_grad`. Every rank must call it (a rank with no rows
    contributes 0).
    """
    total = grad.sum(dtype=torch.promote_types(grad.dtype, torch.float32))
    reduce_sum = reduce_sum_of(optimizer)
    if reduce_sum is not None:
        total = reduce_sum(total)
    return bool(torch.isfinite(total))


def global_shape(optimizer: Any, grad: Tensor) -> tuple[int, ...]:
    """The shape of the whole gradient whose rows ``grad`` is, during a row-sharded update, else its own."""
    shard = getattr(optimizer, "_active_shard", None)
    if shard is None:
        return tuple(grad.shape)
    return (shard.param.shape[0], *grad.shape[1:])


def global_param(optimizer: Any, param: Tensor) -> Tensor:
    """The DTensor whose local rows ``param`` is, during its update (for its global shape), else ``param``."""
    shard = getattr(optimizer, "_active_shard", None)
    return shard.param if shard is not None and shard.local is param else param


def _check_supported(optimizer: LowRankOptimizer, param: Tensor, side: str | None) -> None:
    from lowmem.optim.apollo_adamw import ApolloAdamW
    from lowmem.optim.fira_adamw import FiraAdamW
    from lowmem.optim.galore_adafactor import GaLoreAdafactor
    from lowmem.optim.galore_adamw import GaLoreAdamW  # lazy: galore_adamw imports the base class
    from lowmem.optim.lowrank_adam import AdamLowRankOptimizer

    name = type(optimizer).__name__
    what = f"{name}: a row-sharded (FSDP2) parameter of shape {tuple(param.shape)}"
    if side is None and isinstance(optimizer, AdamLowRankOptimizer):
        return  # element-wise AdamW on the local rows
    if isinstance(optimizer, GaLoreAdafactor):
        # Plain groups: matrices get their column means all-reduced, vectors are element-wise, and
        # more dims (conv weights) factor over the last two dims, which never include the sharded
        # dim 0: only the RMS values span the ranks (GaLoreAdafactor._full_rank_step).
        return
    if side is not None and isinstance(optimizer, (GaLoreAdamW, FiraAdamW, ApolloAdamW)):
        return
    raise NotImplementedError(
        f"{what} in a {'low-rank' if side else 'plain'} group: {name} needs statistics over the whole "
        "matrix (factored moments) that are not implemented across ranks yet; use "
        "GaLoreAdamW / GaLoreAdamW8bit / FiraAdamW / ApolloAdamW / GaLoreAdafactor for sharded "
        "low-rank groups, "
        "any Adam-family optimizer for sharded plain groups, or this optimizer under "
        "DistributedDataParallel"
    )


def _column_bounds(columns: int, mesh: Any) -> tuple[int, int]:
    """This rank's columns under ``Shard(1)``: torch.chunk's layout, ⌈n/w⌉ each, the last ones short."""
    size = mesh.size()
    chunk = -(-columns // size)
    start = min(mesh.get_local_rank() * chunk, columns)
    return start, min(start + chunk, columns)


def _column_slice(full: Tensor, mesh: Any) -> Tensor:
    start, stop = _column_bounds(full.shape[1], mesh)
    return full[:, start:stop].contiguous()  # a copy: the full basis is freed


def _gather_columns(local: Tensor, mesh: Any, param_shape: torch.Size) -> Tensor:
    from torch.distributed.tensor import DTensor, Shard

    rows = param_shape[0]
    columns = math.prod(param_shape) // rows if rows else math.prod(param_shape[1:])
    shape = (local.shape[0], columns)
    return DTensor.from_local(
        local, mesh, [Shard(1)], run_check=False, shape=shape, stride=(columns, 1)
    ).full_tensor()


# ------------------------------------------------------------------------ state dicts
def _padded_blocks(param: Tensor, moment: Tensor) -> int:
    """Block scales per rank in a checkpoint: the count of the rank with the most rows."""
    rows_max = -(-param.shape[0] // param.device_mesh.size())  # type: ignore[attr-defined]
    per_row = moment.numel() // moment.shape[0] if moment.shape[0] else 0
    if not per_row:  # this rank holds no rows: the row width from the global moment shape
        per_row = math.prod(moment.shape[1:])
    return num_blocks(rows_max * per_row)


def _to_dtensor(local: Tensor, param: Tensor, placement: Any, shape: tuple[int, ...]) -> Tensor:
    from torch.distributed.tensor import DTensor

    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    mesh = param.device_mesh  # type: ignore[attr-defined]
    return DTensor.from_local(local, mesh, [placement], run_check=False, shape=shape, stride=stride)


def distribute_state(
    optimizer: LowRankOptimizer, state_dict: dict[str, Any], params: list[Tensor]
) -> dict[str, Any]:
    """``state_dict`` (torch.optim's, keyed by index) with sharded parameters' states as DTensors.

    New per-parameter dicts are built, so ``optimizer.state`` keeps its local tensors.
    """
    from torch.distributed.tensor import Shard

    state = dict(state_dict["state"])
    for index, param in enumerate(params):
        if index not in state or not is_dtensor(param):
            continue
        entry = dict(state[index])
        size = param.device_mesh.size()  # type: ignore[attr-defined]
        for key, value in state[index].items():
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue  # counters: equal on every rank, saved once
            if key == "proj_right":
                entry[key] = _to_dtensor(value, param, Shard(1), (value.shape[0], _columns(param)))
            elif key.endswith("_absmax"):
                blocks = _padded_blocks(param, state[index][key.removesuffix("_absmax")])
                padded = torch.zeros(1, blocks, dtype=value.dtype, device=value.device)
                padded[0, : value.numel()] = value
                # One row of scales per rank: the global shape (world size, blocks) differs between
                # world sizes, so DCP refuses a checkpoint of another world size (a size mismatch
                # naming *_absmax) instead of reading one layout of blocks as another.
                entry[key] = _to_dtensor(padded, param, Shard(0), (size, blocks))
            else:  # moments: the parameter's rows (plain groups) or the rows of R (m×r)
                entry[key] = _to_dtensor(value, param, Shard(0), (param.shape[0], *value.shape[1:]))
        state[index] = entry
    return {**state_dict, "state": state}


def _columns(param: Tensor) -> int:
    return math.prod(param.shape) // param.shape[0]


def localize_state(optimizer: LowRankOptimizer) -> None:
    """After ``load_state_dict``: DTensor state values back to the rank's local tensors.

    Raises ValueError, before converting anything, for 8-bit block scales of another world size.
    """
    entries = [
        (param, optimizer.state[param])
        for group in optimizer.param_groups
        for param in group["params"]
        if optimizer.state.get(param)
    ]
    for param, entry in entries:
        for key in [k for k in entry if k.endswith("_absmax")]:
            _check_block_rows(entry[key], param, key)
    for _, entry in entries:
        for key, value in list(entry.items()):
            if is_dtensor(value):
                entry[key] = value.to_local()
        for key in [k for k in entry if k.endswith("_absmax")]:
            codes = entry[key.removesuffix("_absmax")]
            entry[key] = entry[key].reshape(-1)[: num_blocks(codes.numel())].clone()


def _check_block_rows(scales: Tensor, param: Tensor, key: str) -> None:
    """Refuse 8-bit block scales whose rows (one per saving rank) are not this mesh's ranks'.

    DCP refuses them itself (a size mismatch); ``set_optimizer_state_dict(full_state_dict=True)``
    does not: it reshards the (saved world size, blocks) tensor onto this mesh, and taking its
    first scales would dequantize every block of this rank's rows with another layout's scales
    (measured: moments 28% off, 2 ranks → 1). A 1-D tensor is the flat layout saved before the
    per-rank rows, which carries no world size; it is read as before.
    """
    if not (is_dtensor(param) and is_dtensor(scales) and scales.dim() == 2):
        return
    saved, here = scales.shape[0], param.device_mesh.size()  # type: ignore[attr-defined]
    if saved != here:
        raise ValueError(
            f"Invalid optimizer state: {key} of a parameter of shape {tuple(param.shape)} holds 8-bit block "
            f"scales of {saved} ranks' rows, but this mesh has {here} ranks; 8-bit states are quantized in "
            "blocks of each rank's own rows and load only at the world size that saved them: resume on "
            f"{saved} ranks, or build the optimizer anew (fp32 states reshard to any world size)"
        )
