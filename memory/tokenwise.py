"""Token-wise recomputation and swapping of position-wise sublayers, in the spirit of MEMO (2025).

MEMO (Zhao et al. 2025, "MEMO: Fine-grained Tensor Management For Ultra-long Context LLM
Training") splits each layer's activations *by token*: those of a fraction ``α`` of the tokens are
swapped to host memory, the rest are recomputed in backward. ``α`` trades host memory and host
bandwidth (``α`` of the activations cross the bus twice) against recompute FLOPs (``1 - α`` of the
layer's forward runs again), and unlike the by-op knob of :class:`~lowmem.memory.PartialRecompute`
it is linear in both.

Where it is valid: a *position-wise* function ``f`` (an MLP, a norm, a projection) maps each token
independently, so ``f(x) = cat(f(x[:k]), f(x[k:]))`` along the token dimension. Here:

- the first ``k = ⌊α·T + ½⌋`` tokens run ``f`` with their saved tensors packed by an
  :class:`~lowmem.memory.ActivationOffload` engine (host memory);
- the other ``T - k`` run under :func:`lowmem.memory.checkpoint`: only their input is kept (in host
  memory through the same engine) and ``f`` reruns on them in backward;
- the outputs are concatenated (``cat`` saves nothing for backward).

The input crosses to host once: both halves are views of one storage, and the engine moves a
storage once. Attention mixes tokens (token ``t`` needs the keys and values of every earlier
token), so it is **not** split here: :func:`apply_tokenwise_recompute` wraps only the module types
it is given (the MLPs of a LLaMA); everything else runs as it would without it — saved on the
device, or in host memory when the step runs inside an ``offload_activations()`` context.

Numerics: the forward of each token is the same computation on fewer rows. CPU GEMM libraries give
bitwise the same rows for a row subset of three or more rows (measured with MKL/oneDNN in
``tests/memory/test_tokenwise.py``), not for one or two (a matrix-vector path). Weight gradients
are sums over tokens, computed as two partial sums added together instead of one: they differ from
the unsplit gradient by rounding (relative max difference ~1e-7 in fp32). Functions that draw
random numbers (dropout) draw them per half, so they differ from the unsplit function's draws, and
recomputation replays the same draws (torch's checkpoint restores the RNG state).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowmem.memory.checkpoint import _CheckpointedForward, _default_offloader, checkpoint
from lowmem.memory.offload import DEFAULT_MIN_BYTES, ActivationOffload

__all__ = [
    "TokenwiseHandle",
    "TokenwiseStats",
    "apply_tokenwise_recompute",
    "split_point",
    "tokenwise_checkpoint",
]


@dataclass
class TokenwiseStats:
    """Tokens (positions along the token dimension, summed over calls) each half handled.

    ``saved_tokens``: run with saved tensors kept (offloaded with ``offload=True``);
    ``recomputed_tokens``: run under checkpointing, recomputed in backward.
    """

    calls: int = 0
    saved_tokens: int = 0
    recomputed_tokens: int = 0


def _check_fraction(offload_fraction: float) -> float:
    if isinstance(offload_fraction, bool) or not isinstance(offload_fraction, (int, float)):
        raise ValueError(f"offload_fraction must be a number in [0, 1], got {offload_fraction!r}")
    if not 0.0 <= float(offload_fraction) <= 1.0:
        raise ValueError(f"offload_fraction must be a number in [0, 1], got {offload_fraction!r}")
    return float(offload_fraction)


def split_point(offload_fraction: float, tokens: int) -> int:
    """How many leading tokens keep their activations: ``⌊offload_fraction · tokens + ½⌋``."""
    return min(tokens, math.floor(_check_fraction(offload_fraction) * tokens + 0.5))


def _token_dim(x: Any, token_dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (the per-token input), got {type(x).__name__}")
    if isinstance(token_dim, bool) or not isinstance(token_dim, int):
        raise ValueError(f"token_dim must be an int, got {token_dim!r}")
    if x.dim() == 0 or not -x.dim() <= token_dim < x.dim():
        raise ValueError(
            f"token_dim={token_dim} is out of range for an input of shape {tuple(x.shape)}; pass the "
            "dimension that indexes tokens (1 for [batch, seq, hidden])"
        )
    return token_dim % x.dim()


def _checked(out: Any, dim: int, tokens: int, rank: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"token-wise recomputation needs a function that returns one tensor, got {type(out).__name__}"
        )
    if out.dim() != rank or out.shape[dim] != tokens:
        raise ValueError(
            f"token-wise recomputation needs a position-wise function: its output must keep the token "
            f"dimension {dim} (input tokens {tokens}, output shape {tuple(out.shape)})"
        )
    return out


def _rows(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """Tokens ``start:start+length`` of ``x``, contiguous.

    A contiguous slice stays a view (with batch 1 both halves are views of ``x``'s storage, which
    the engine copies once for both). A strided one (batch > 1, tokens on dim 1) is copied here
    once: every linear layer would otherwise make, and save, its own contiguous copy.
    """
    part = x.narrow(dim, start, length)
    return part if part.is_contiguous() else part.contiguous()


def tokenwise_checkpoint(
    function: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    offload_fraction: float,
    token_dim: int = 1,
    offload: bool = True,
    offloader: ActivationOffload | None = None,
    stats: TokenwiseStats | None = None,
) -> torch.Tensor:
    """``function(x)`` with the activations of the first ``offload_fraction`` of tokens offloaded and
    the rest recomputed in backward (MEMO's token-wise recomputation and swapping, see the module
    docstring).

    Args:
        function: a position-wise function of one tensor (each token's output depends on that token
            only: MLP, norm, projection). Not attention.
        x: the input, any shape and floating dtype, tokens along ``token_dim`` (``T`` of them).
        offload_fraction: ``α`` in ``[0, 1]``: the first ``⌊α·T + ½⌋`` tokens keep their saved tensors
            (in host memory with ``offload``); the rest are recomputed. ``0``: plain (offloaded)
            checkpointing; ``1``: plain offload, no recomputation.
        token_dim: the dimension of ``x`` (and of the output) that indexes tokens.
        offload: keep the saved tensors and the recomputed half's input in host memory through
            ``offloader``; ``False``: both stay on the device (token-wise selective recomputation).
        offloader: the :class:`ActivationOffload` engine; default: the one :func:`checkpoint` shares.
        stats: a :class:`TokenwiseStats` to add this call's token counts to.

    Returns:
        ``function(x)``: same shape as ``function`` gives, the halves joined along ``token_dim``.
        Outside autograd (``torch.no_grad``) the function runs once on the whole input.
    """
    fraction = _check_fraction(offload_fraction)
    dim = _token_dim(x, token_dim)
    if not torch.is_grad_enabled():
        return function(x)
    tokens = x.shape[dim]
    k = split_point(fraction, tokens)
    engine = (offloader if offloader is not None else _default_offloader()) if offload else None
    parts: list[torch.Tensor] = []
    if k > 0:
        # Only the leading rows: their saved tensors go to host as they are produced.
        with engine if engine is not None else contextlib.nullcontext():
            parts.append(_checked(function(_rows(x, dim, 0, k)), dim, k, x.dim()))
    if k < tokens:
        rest = _rows(x, dim, k, tokens - k)
        out = checkpoint(function, rest, offload=offload, offloader=engine)
        parts.append(_checked(out, dim, tokens - k, x.dim()))
    if stats is not None:
        stats.calls += 1
        stats.saved_tokens += k
        stats.recomputed_tokens += tokens - k
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


# -- applying it to a model ------------------------------------------------------------------


class _TokenwiseForward:
    """A module's instance-level ``forward`` that runs the class's forward token-wise (see
    :class:`~lowmem.memory.checkpoint._CheckpointedForward` for why on the instance)."""

    def __init__(self, module: nn.Module, run: Callable[..., torch.Tensor]) -> None:
        self.module = module
        self.run = run

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) != 1:
            raise TypeError(
                f"token-wise {type(self.module).__name__} takes exactly one positional tensor (the "
                f"per-token input), got {len(args)}; pass other arguments by keyword"
            )
        forward = functools.partial(type(self.module).forward, self.module, **kwargs)
        return self.run(forward, args[0])


@dataclass
class TokenwiseHandle:
    """What :func:`apply_tokenwise_recompute` did; ``remove()`` undoes it.

    Attributes:
        modules: the wrapped modules.
        offloader: the engine holding their saved tensors and kept inputs (None without offload).
        stats: token counts over every call (:class:`TokenwiseStats`).
    """

    modules: list[nn.Module]
    offloader: ActivationOffload | None
    offload_fraction: float
    stats: TokenwiseStats = field(default_factory=TokenwiseStats)

    def remove(self) -> None:
        """Restore the modules' class forward."""
        for module in self.modules:
            if isinstance(module.__dict__.get("forward"), _TokenwiseForward):
                del module.forward
        self.modules = []


def apply_tokenwise_recompute(
    model: nn.Module,
    module_types: type[nn.Module] | Iterable[type[nn.Module]],
    *,
    offload_fraction: float,
    token_dim: int = 1,
    offload: bool = True,
    offloader: ActivationOffload | None = None,
) -> TokenwiseHandle:
    """Run every ``module_types`` instance in ``model`` through :func:`tokenwise_checkpoint`.

    For a transformers LLaMA pass ``module_types=(LlamaMLP,)``: the MLP (gate, up, SiLU, product,
    down) is position-wise and holds most of a layer's activations (``4·i`` of about ``4·i + 8·h``
    values per token). Attention and the norms are left alone; wrap the training step in the same
    ``offloader`` (``with handle.offloader: loss = ...``) to move their activations to host as well.

    Args:
        model: any ``nn.Module``.
        module_types: position-wise module classes; instances are wrapped where they are found
            (an instance inside another wrapped instance is not wrapped again).
        offload_fraction, token_dim, offload: see :func:`tokenwise_checkpoint`.
        offloader: the engine; default: a new one that never copies ``model``'s parameters.

    Returns:
        A :class:`TokenwiseHandle` (``remove()`` undoes it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fraction = _check_fraction(offload_fraction)
    if isinstance(token_dim, bool) or not isinstance(token_dim, int):
        raise ValueError(f"token_dim must be an int, got {token_dim!r}")
    types = (module_types,) if isinstance(module_types, type) else tuple(module_types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"module_types must be nn.Module subclasses, got {module_types!r}")
    engine = None
    if offload:
        engine = offloader if offloader is not None else ActivationOffload(DEFAULT_MIN_BYTES, keep=model)
    handle = TokenwiseHandle([], engine, fraction)
    run = functools.partial(
        tokenwise_checkpoint,
        offload_fraction=fraction,
        token_dim=token_dim,
        offload=offload,
        offloader=engine,
        stats=handle.stats,
    )
    found: list[nn.Module] = []
    _collect_outermost(model, types, found)
    if not found:
        names = ", ".join(t.__name__ for t in types)
        raise ValueError(f"no module of module_types ({names}) found in {type(model).__name__}")
    for module in found:
        current = module.__dict__.get("forward")
        if isinstance(current, (_TokenwiseForward, _CheckpointedForward)):
            raise ValueError(
                f"{type(module).__name__} already has a checkpointed or token-wise forward; call remove() "
                "on its handle first"
            )
    for module in found:
        module.forward = _TokenwiseForward(module, run)
        handle.modules.append(module)
    return handle


def _collect_outermost(module: nn.Module, types: tuple[type[nn.Module], ...], out: list[nn.Module]) -> None:
    if isinstance(module, types):
        out.append(module)
        return
    for child in module.children():
        _collect_outermost(child, types, out)
