"""Split a model's parameters into a low-rank group and a plain group."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn


def lowrank_param_groups(
    model: nn.Module, target_modules: Sequence[str] | str, rank: int, **group_options: Any
) -> list[dict[str, Any]]:
    """Param groups for a low-rank optimizer: matched ``nn.Linear`` weights get ``rank``.

    A module matches when one of ``target_modules`` is a substring of its qualified name
    (galore-torch's rule, e.g. ``["attn", "mlp"]`` or ``["q_proj", "v_proj"]``). The first group
    holds the 2-D weights of matched ``nn.Linear`` modules with ``rank`` and ``group_options``
    (``update_proj_gap``, ``scale``, ``proj_type``, ``projector``, ``on_refresh``, ``seed``,
    or any other group key such as ``lr``); the second holds every other trainable parameter
    (biases, norms, embeddings, unmatched layers). Shared (tied) parameters appear once.

    Warns, naming them, about entries of ``target_modules`` that matched no ``nn.Linear``;
    raises ValueError if none matched at all.

    Example::

        groups = lowrank_param_groups(model, ["attn", "mlp"], rank=128, update_proj_gap=200)
        opt = lowmem.optim.GaLoreAdamW(groups, lr=1e-2)
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not target_modules:
        raise ValueError(
            "lowrank_param_groups: target_modules is empty; name at least one module, e.g. ['attn', 'mlp']"
        )
    matched_targets: set[str] = set()
    lowrank: list[nn.Parameter] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        hits = [t for t in target_modules if t in module_name]
        if not hits or not module.weight.requires_grad or id(module.weight) in seen:
            continue
        matched_targets.update(hits)
        seen.add(id(module.weight))
        lowrank.append(module.weight)
    unmatched = [t for t in target_modules if t not in matched_targets]
    if not lowrank:
        raise ValueError(
            f"lowrank_param_groups: no nn.Linear module name contains any of {list(target_modules)}; "
            "check the names with [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]"
        )
    if unmatched:
        warnings.warn(
            f"lowrank_param_groups: target_modules {unmatched} matched no nn.Linear module", stacklevel=2
        )
    rest = []
    for param in model.parameters():  # parameters() already yields each shared tensor once
        if param.requires_grad and id(param) not in seen:
            rest.append(param)
    groups: list[dict[str, Any]] = [{"params": lowrank, "rank": rank, **group_options}]
    if rest:
        groups.append({"params": rest})
    return groups
