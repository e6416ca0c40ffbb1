"""Swap matching ``nn.Linear`` layers of a model for memory-saving layers, in place.

:func:`iter_target_linears` is the one place that decides which linears a ``convert_*``
function touches; every converter in :mod:`lowmem.nn` (sparse + low-rank, low-rank, int8/fp8)
calls it, so ``target_modules`` means the same thing everywhere. Its rules follow transformers'
``optim_target_modules`` (and PEFT's ``target_modules``):

- ``None``: every ``nn.Linear`` except the output head (a module named ``lm_head``).
- ``"all-linear"``: the same.
- a string that is a regular expression and matches the whole qualified name
  (``re.fullmatch``), e.g. ``r".*\\.(q|k|v|o)_proj"``;
- otherwise a string (or each string of a list) matches when it equals the qualified name,
  equals its last component, or is a substring of the qualified name (``"attn"`` matches
  ``model.layers.0.self_attn.q_proj``).

``module_filter_fn(module, qualified_name) -> bool`` (torchao's convention) further narrows
the matches. Swapping replaces the child attribute on its parent (``setattr``), so model classes
are never monkeypatched and ``model.state_dict()`` keys change only below the swapped layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "ConversionReport",
    "convert_to_low_rank",
    "convert_to_sparse_low_rank",
    "iter_target_linears",
    "replace_module",
]

#: Names of output heads that ``None`` / ``"all-linear"`` leave dense, as transformers does:
#: the head's vocab×d matrix is usually tied to or shaped like the embedding, not a hidden linear.
OUTPUT_HEAD_NAMES = ("lm_head",)

ModuleFilter = Callable[[nn.Module, str], bool]

_REGEX_CHARS = set("*+?[](){}|^$\\")


def _name_matches(name: str, pattern: str) -> bool:
    if name == pattern or name.rsplit(".", 1)[-1] == pattern:
        return True
    if _REGEX_CHARS & set(pattern) and _full_regex_match(pattern, name):
        return True
    return pattern in name


def _full_regex_match(pattern: str, name: str) -> bool:
    """``re.fullmatch`` of ``pattern`` on ``name``; a pattern that is not a valid regex (``"a["``)
    matches nothing here, and the substring rule decides."""
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _is_output_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES


def iter_target_linears(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] | None = None,
    module_filter_fn: ModuleFilter | None = None,
) -> list[tuple[str, nn.Linear]]:
    """The ``(qualified_name, linear)`` pairs of ``model`` that a ``convert_*`` call would swap.

    Args:
        model: any module; searched with ``named_modules()`` (so each shared module once).
        target_modules: ``None`` or ``"all-linear"`` (every ``nn.Linear`` but the ``lm_head``),
            one pattern, or a list of patterns; see the module docstring for the rules. A pattern
            that names the head explicitly (``"lm_head"``) does select it.
        module_filter_fn: ``fn(module, qualified_name) -> bool``; only linears for which it
            returns True are kept.

    Only exact ``nn.Linear`` instances match, never subclasses (an already converted layer,
    an int8 linear, a LoRA wrapper), so converting twice is a no-op on converted layers.

    Returns:
        The matches in ``named_modules()`` order (possibly empty; converters raise on empty).
    """
    if isinstance(target_modules, str):
        patterns: list[str] | None = None if target_modules == "all-linear" else [target_modules]
    elif target_modules is None:
        patterns = None
    else:
        patterns = list(target_modules)
        if not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"target_modules must be a string or a list of strings, got {target_modules!r}")
        if "all-linear" in patterns:
            patterns = None
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError(f"module_filter_fn must be callable (module, name) -> bool, got {module_filter_fn!r}")
    found: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if patterns is None:
            if _is_output_head(name):
                continue
        elif not any(_name_matches(name, p) for p in patterns):
            continue
        if module_filter_fn is not None and not module_filter_fn(module, name):
            continue
        found.append((name, module))
    return found


def replace_module(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Set ``model``'s submodule at ``qualified_name`` (``"a.b.c"``) to ``new`` on its parent."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@dataclass
class ConversionReport:
    """What a ``convert_*`` call swapped: qualified names, and parameter counts before / after.

    ``params_before`` / ``params_after`` count the whole model's parameters (``numel`` of
    ``model.parameters()``, shared ones once); index buffers (the sparse support) are not
    parameters and are reported separately as ``index_bytes``.
    """

    converted: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    index_bytes: int = 0

    @property
    def param_ratio(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / self.params_before if self.params_before else float("nan")

    def __str__(self) -> str:
        return (
            f"converted {len(self.converted)} linear layers; parameters {self.params_before:,} -> "
            f"{self.params_after:,} ({100 * self.param_ratio:.1f}%), support index {self.index_bytes:,} bytes"
        )


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _convert(
    model: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    what: str,
    target_modules: str | Sequence[str] | None,
    module_filter_fn: ModuleFilter | None,
) -> ConversionReport:
    targets = iter_target_linears(model, target_modules=target_modules, module_filter_fn=module_filter_fn)
    if not targets:
        raise ValueError(
            f"{what}: no nn.Linear matched target_modules={target_modules!r}"
            f"{' and module_filter_fn' if module_filter_fn is not None else ''}; "
            "check the names with [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]"
        )
    report = ConversionReport(params_before=_num_params(model))
    # A module reachable under two names (weight sharing) is converted once and set at both.
    made: dict[int, nn.Module] = {}
    for name, linear in targets:
        new = made.get(id(linear))
        if new is None:
            new = make(linear)
            made[id(linear)] = new
        replace_module(model, name, new)
        report.converted.append(name)
    report.params_after = _num_params(model)
    report.index_bytes = sum(
        b.numel() * b.element_size()
        for m in made.values()
        for n, b in m.named_buffers()
        if n == "sparse_index"
    )
    return report


def convert_to_sparse_low_rank(
    model: nn.Module,
    rank: int | Callable[[nn.Linear], int],
    density: float = 0.03,
    *,
    alpha: float = 32.0,
    target_modules: str | Sequence[str] | None = None,
    module_filter_fn: ModuleFilter | None = None,
    init: str = "random",
    seed: int | None = None,
) -> ConversionReport:
    """Replace matching ``nn.Linear`` layers by :class:`~lowmem.nn.SparseLowRankLinear`, in place.

    Args:
        model: modified in place (child modules are swapped on their parents).
        rank: an int, or ``fn(linear) -> int`` (e.g. ``lambda l: min(l.weight.shape) // 4``).
            Clipped to ``min(out, in)`` of each layer.
        density, alpha: as :class:`~lowmem.nn.SparseLowRankLinear`.
        target_modules, module_filter_fn: which linears; see :func:`iter_target_linears`.
        init: ``"random"`` (SLTrain's from-scratch initialization, the pretrained weights are
            discarded), ``"svd"`` (truncated SVD plus the largest residual entries, approximating
            the current weights) or ``"svd-random"`` (SVD plus the residual on a random support).
        seed: base seed of the random supports; layer i uses ``seed + i`` (``None``: drawn from
            torch's global RNG, so ``torch.manual_seed`` makes conversion reproducible).

    Returns:
        A :class:`ConversionReport`. Raises ValueError when nothing matched.
    """
    from lowmem.nn.sparse_low_rank import SparseLowRankLinear

    if init not in ("random", "svd", "svd-random"):
        raise ValueError(
            f"convert_to_sparse_low_rank: init must be 'random', 'svd' or 'svd-random', got {init!r}"
        )
    counter = iter(range(1 << 62))
    base = seed

    def make(linear: nn.Linear) -> nn.Module:
        r = min(_rank_for(rank, linear), *linear.weight.shape)
        layer_seed = None if base is None else base + next(counter)
        if init == "random":
            w = linear.weight
            return SparseLowRankLinear(
                linear.in_features,
                linear.out_features,
                r,
                density,
                alpha,
                bias=linear.bias is not None,
                seed=layer_seed,
                device=w.device,
                dtype=w.dtype,
            )
        support = "largest" if init == "svd" else "random"
        return SparseLowRankLinear.from_linear(linear, r, density, alpha, support=support, seed=layer_seed)

    return _convert(model, make, "convert_to_sparse_low_rank", target_modules, module_filter_fn)


def convert_to_low_rank(
    model: nn.Module,
    rank: int | Callable[[nn.Linear], int],
    *,
    target_modules: str | Sequence[str] | None = None,
    module_filter_fn: ModuleFilter | None = None,
    init: str = "random",
) -> ConversionReport:
    """Replace matching ``nn.Linear`` layers by :class:`~lowmem.nn.LowRankLinear`, in place.

    ``init="random"`` initializes from scratch (:meth:`LowRankLinear.reset_parameters`);
    ``init="svd"`` keeps the best rank-r approximation of each current weight. Other arguments
    as :func:`convert_to_sparse_low_rank`. Returns a :class:`ConversionReport`.
    """
    from lowmem.nn.low_rank import LowRankLinear

    if init not in ("random", "svd"):
        raise ValueError(f"convert_to_low_rank: init must be 'random' or 'svd', got {init!r}")

    def make(linear: nn.Linear) -> nn.Module:
        r = min(_rank_for(rank, linear), *linear.weight.shape)
        if init == "svd":
            return LowRankLinear.from_linear(linear, r)
        w = linear.weight
        return LowRankLinear(
            linear.in_features,
            linear.out_features,
            r,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )

    return _convert(model, make, "convert_to_low_rank", target_modules, module_filter_fn)


def _rank_for(rank: int | Callable[[nn.Linear], int], linear: nn.Linear) -> int:
    value = rank(linear) if callable(rank) else rank
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"rank must be a positive int (or a function returning one), got {value!r}")
    return value
