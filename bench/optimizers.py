"""The optimizer registry of the training benchmark: name -> factory(model, settings) -> optimizer.

Every factory gets the same :class:`OptimizerSettings` (lr, weight decay, betas, eps, GaLore
options), so optimizers differ only in their algorithm. Entries whose package is missing report why
through ``unavailable_reason`` and are skipped by the harness with a printed note.

- ``adamw``: ``torch.optim.AdamW`` over all parameters, the baseline.
- ``galore``: ``lowmem.optim.GaLoreAdamW`` (Zhao et al. 2024, "GaLore: Memory-Efficient LLM
  Training by Gradient Low-Rank Projection"), low-rank groups from
  ``lowmem.optim.lowrank_param_groups``.
- ``galore-torch``: the authors' ``galore_torch.GaLoreAdamW`` with the same two groups. It is
  built on the legacy HuggingFace AdamW: weight decay is applied after the update (torch's AdamW
  applies it before), its eps default is 1e-6 (we pass ours), its ``step`` is a Python int and its
  projector a Python object in the state.
- ``fira`` / ``fira-package``: ``lowmem.optim.FiraAdamW`` (Chen et al. 2024) and the authors'
  ``fira.FiraAdamW``, same groups, rank, gap and scale (fira's ``alpha``).
- ``apollo`` / ``apollo-torch``: ``lowmem.optim.ApolloAdamW`` with channel-wise scaling (Zhu et
  al. 2024) and the authors' ``apollo_torch.APOLLOAdamW``, same rank, gap, scale 1, random projection.
- ``apollo-mini``: ``ApolloAdamW`` with ``APOLLO_MINI`` (rank 1, tensor-wise, scale 128).
- ``adamw8bit`` / ``galore8bit``: ``lowmem.optim.AdamW8bit`` and ``GaLoreAdamW8bit`` (8-bit
  block-wise states, Dettmers et al. 2022), at their fp32 counterparts' learning rates;
  ``bnb-adamw8bit``: ``bitsandbytes.optim.AdamW8bit`` (its CPU path is slow; times show it).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: The LLaMA linear layers whose weights get low-rank optimizer states (embeddings and the LM head
#: stay full-rank, as in the GaLore paper).
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class OptimizerSettings:
    """Hyperparameters shared by every optimizer of one benchmark run.

    ``projector`` and ``on_refresh`` are passed to lowmem's GaLore only when set, so its own
    defaults apply otherwise; galore-torch has neither option and ignores them.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    rank: int = 64
    update_proj_gap: int = 50
    scale: float = 0.25
    proj_type: str = "std"
    projector: str | None = None
    on_refresh: str | None = None
    seed: int = 0
    target_modules: tuple[str, ...] = field(default=LLAMA_TARGET_MODULES)
    #: lowmem optimizers only (the ``layerwise`` technique): update inside backward, clip per parameter.
    layerwise: bool = False
    max_grad_norm_per_param: float | None = None


def _layerwise_kwargs(s: OptimizerSettings) -> dict[str, Any]:
    if not s.layerwise:
        return {}
    return {"layerwise": True, "max_grad_norm_per_param": s.max_grad_norm_per_param}


Factory = Callable[[nn.Module, OptimizerSettings], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerEntry:
    """One registry entry: how to build the optimizer and how to tell it cannot be built here."""

    name: str
    description: str
    factory: Factory
    unavailable_reason: Callable[[], str | None]
    #: Peak lr used when the command line sets none: each method at its own best on the default
    #: benchmark (see DEFAULT_LRS), since a shared lr would favour whichever method it suits.
    default_lr: float


def split_lowrank_params(
    model: nn.Module, target_modules: tuple[str, ...]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(lowrank, other)``: weights of ``nn.Linear`` modules whose last name part is a target, and
    every other parameter. This is the selection ``lowmem.optim.lowrank_param_groups`` makes; the
    galore-torch entry uses it so both GaLores project exactly the same matrices."""
    targets = set(target_modules)
    lowrank = [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    chosen = {id(p) for p in lowrank}
    other = [p for p in model.parameters() if id(p) not in chosen]
    return lowrank, other


def _build_adamw(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay
    )


def _build_lowmem_galore(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    from lowmem.optim import GaLoreAdamW, lowrank_param_groups

    options: dict[str, Any] = {
        "update_proj_gap": s.update_proj_gap,
        "scale": s.scale,
        "proj_type": s.proj_type,
        "seed": s.seed,
    }
    if s.projector is not None:
        options["projector"] = s.projector
    if s.on_refresh is not None:
        options["on_refresh"] = s.on_refresh
    groups = lowrank_param_groups(model, target_modules=list(s.target_modules), rank=s.rank, **options)
    return GaLoreAdamW(
        groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, **_layerwise_kwargs(s)
    )


def _lowmem_groups(model: nn.Module, s: OptimizerSettings, **overrides: Any) -> list[dict[str, Any]]:
    """lowmem's two param groups with the run's low-rank settings (``overrides`` win)."""
    from lowmem.optim import lowrank_param_groups

    options: dict[str, Any] = {"update_proj_gap": s.update_proj_gap, "proj_type": s.proj_type, "seed": s.seed}
    options.update(overrides)
    rank = options.pop("rank", s.rank)
    return lowrank_param_groups(model, target_modules=list(s.target_modules), rank=rank, **options)


def _build_lowmem_fira(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    from lowmem.optim import FiraAdamW

    extra = {k: v for k, v in (("projector", s.projector), ("on_refresh", s.on_refresh)) if v is not None}
    groups = _lowmem_groups(model, s, scale=s.scale, **extra)
    return FiraAdamW(
        groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, **_layerwise_kwargs(s)
    )


def _build_lowmem_apollo(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    from lowmem.optim import ApolloAdamW

    # APOLLO's own scale semantics (√scale multiplies the update; 1 for channel-wise APOLLO).
    groups = _lowmem_groups(model, s, scale=1.0, scale_type="channel")
    return ApolloAdamW(
        groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, **_layerwise_kwargs(s)
    )


def _build_lowmem_apollo_mini(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    from lowmem.optim import APOLLO_MINI, ApolloAdamW

    groups = _lowmem_groups(model, s, **APOLLO_MINI)
    return ApolloAdamW(
        groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, **_layerwise_kwargs(s)
    )


def _build_lowmem_adamw8bit(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    from lowmem.optim import AdamW8bit

    return AdamW8bit(
        model.parameters(),
        lr=s.lr,
        betas=s.betas,
        eps=s.eps,
        weight_decay=s.weight_decay,
        **_layerwise_kwargs(s),
    )


def _build_lowmem_galore8bit(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    from lowmem.optim import GaLoreAdamW8bit

    extra = {k: v for k, v in (("projector", s.projector), ("on_refresh", s.on_refresh)) if v is not None}
    groups = _lowmem_groups(model, s, scale=s.scale, **extra)
    return GaLoreAdamW8bit(
        groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay, **_layerwise_kwargs(s)
    )


def _build_bnb_adamw8bit(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(
        model.parameters(), lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay
    )


def _build_fira_package(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    import fira

    lowrank, other = split_lowrank_params(model, s.target_modules)
    groups = [
        {
            "params": lowrank,
            "rank": s.rank,
            "update_proj_gap": s.update_proj_gap,
            "alpha": s.scale,
            "proj_type": s.proj_type,
        },
        {"params": other},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fira's legacy-HF-AdamW deprecation notice
        return fira.FiraAdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)


def _build_apollo_torch(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    import apollo_torch

    lowrank, other = split_lowrank_params(model, s.target_modules)
    groups = [
        {
            "params": lowrank,
            "rank": s.rank,
            "update_proj_gap": s.update_proj_gap,
            "scale": 1.0,
            "scale_type": "channel",
            "proj": "random",
            "proj_type": s.proj_type,
        },
        {"params": other},
    ]
    return apollo_torch.APOLLOAdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)


def _build_galore_torch(model: nn.Module, s: OptimizerSettings) -> torch.optim.Optimizer:
    import galore_torch

    lowrank, other = split_lowrank_params(model, s.target_modules)
    groups = [
        {
            "params": lowrank,
            "rank": s.rank,
            "update_proj_gap": s.update_proj_gap,
            "scale": s.scale,
            "proj_type": s.proj_type,
        },
        {"params": other},
    ]
    with warnings.catch_warnings():
        # The legacy HF AdamW warns that it is deprecated on every construction.
        warnings.simplefilter("ignore", FutureWarning)
        return galore_torch.GaLoreAdamW(
            groups, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay
        )


def _always_available() -> str | None:
    return None


def _lowmem_galore_missing() -> str | None:
    try:
        optim = importlib.import_module("lowmem.optim")
    except ImportError as error:  # pragma: no cover - lowmem.optim is part of this package
        return f"lowmem.optim failed to import: {error}"
    missing = [n for n in ("GaLoreAdamW", "lowrank_param_groups") if not hasattr(optim, n)]
    return f"lowmem.optim has no {', '.join(missing)} yet" if missing else None


def _galore_torch_missing() -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module("galore_torch")
    except Exception as error:  # ImportError, or a broken optional dependency (bitsandbytes)
        return f"galore_torch is not importable ({type(error).__name__}: {error}); pip install galore-torch"
    return None


def _package_missing(module: str, pip_name: str) -> Callable[[], str | None]:
    def reason() -> str | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(module)
        except Exception as error:  # ImportError, or a broken optional dependency
            return f"{module} is not importable ({type(error).__name__}: {error}); pip install {pip_name}"
        return None

    return reason


#: Peak learning rates, tuned on the default ``train`` benchmark (tiny preset, 200 steps, mean
#: validation loss over seeds 0-2). AdamW: 1e-3 (2.145) beat 5e-4 (2.155) and 2e-3 (2.208).
#: lowmem GaLore (its scale 0.25 shrinks the step): 1.2e-2 (1.887) beat 6e-3 (1.901) and 2e-2
#: (1.896). galore-torch gets GaLore's lr, so the two are compared at equal settings.
#: lowmem Fira: 6e-3 (1.845) beat 3e-3 (1.944) and 1.2e-2 (1.861). APOLLO (channel, rank 64,
#: scale 1): 4e-3 (1.932) beat 1e-3 (2.158), 2e-3 (2.038) and 8e-3 (2.021). APOLLO-Mini: 3e-3
#: (2.158) beat 1e-3 (2.244), 2e-3 (2.164) and 4e-3 (2.176). apollo-torch gets APOLLO's (1.936
#: there vs our 1.932). The fira package at its own best: 3e-3 (1.920) beat 6e-3 (2.040) and 1.2e-2
#: (2.210). The 8-bit rows get their fp32 counterparts' rates.
DEFAULT_LRS = {
    "adamw": 1e-3,
    "galore": 1.2e-2,
    "galore-torch": 1.2e-2,
    "fira": 6e-3,
    "fira-package": 3e-3,
    "apollo": 4e-3,
    "apollo-torch": 4e-3,
    "apollo-mini": 3e-3,
    "adamw8bit": 1e-3,
    "galore8bit": 1.2e-2,
    "bnb-adamw8bit": 1e-3,
}

REGISTRY: dict[str, OptimizerEntry] = {
    entry.name: entry
    for entry in (
        OptimizerEntry("adamw", "torch.optim.AdamW", _build_adamw, _always_available, DEFAULT_LRS["adamw"]),
        OptimizerEntry(
            "galore",
            "lowmem.optim.GaLoreAdamW",
            _build_lowmem_galore,
            _lowmem_galore_missing,
            DEFAULT_LRS["galore"],
        ),
        OptimizerEntry(
            "galore-torch",
            "galore_torch.GaLoreAdamW (authors' code)",
            _build_galore_torch,
            _galore_torch_missing,
            DEFAULT_LRS["galore-torch"],
        ),
        OptimizerEntry(
            "fira",
            "lowmem.optim.FiraAdamW",
            _build_lowmem_fira,
            _always_available,
            DEFAULT_LRS["fira"],
        ),
        OptimizerEntry(
            "fira-package",
            "fira.FiraAdamW (authors' code)",
            _build_fira_package,
            _package_missing("fira", "fira"),
            DEFAULT_LRS["fira-package"],
        ),
        OptimizerEntry(
            "apollo",
            "lowmem.optim.ApolloAdamW (channel-wise)",
            _build_lowmem_apollo,
            _always_available,
            DEFAULT_LRS["apollo"],
        ),
        OptimizerEntry(
            "apollo-mini",
            "lowmem.optim.ApolloAdamW (APOLLO-Mini: rank 1, tensor-wise, scale 128)",
            _build_lowmem_apollo_mini,
            _always_available,
            DEFAULT_LRS["apollo-mini"],
        ),
        OptimizerEntry(
            "apollo-torch",
            "apollo_torch.APOLLOAdamW (authors' code, channel-wise)",
            _build_apollo_torch,
            _package_missing("apollo_torch", "apollo-torch"),
            DEFAULT_LRS["apollo-torch"],
        ),
        OptimizerEntry(
            "adamw8bit",
            "lowmem.optim.AdamW8bit (8-bit block-wise states)",
            _build_lowmem_adamw8bit,
            _always_available,
            DEFAULT_LRS["adamw8bit"],
        ),
        OptimizerEntry(
            "galore8bit",
            "lowmem.optim.GaLoreAdamW8bit",
            _build_lowmem_galore8bit,
            _always_available,
            DEFAULT_LRS["galore8bit"],
        ),
        OptimizerEntry(
            "bnb-adamw8bit",
            "bitsandbytes.optim.AdamW8bit",
            _build_bnb_adamw8bit,
            _package_missing("bitsandbytes", "bitsandbytes"),
            DEFAULT_LRS["bnb-adamw8bit"],
        ),
    )
}

#: The rows of ``python -m lowmem.bench train`` with no ``--optimizers``: AdamW, one row per lowmem
#: family (GaLore with the authors' code beside it, Fira, APOLLO-Mini, 8-bit GaLore) and one
#: layer technique (SLTrain), sized so 3 seeds finish in under 10 minutes on 2 CPU cores.
#: ``--optimizers all`` runs every registry entry (see ``--list`` for techniques).
DEFAULT_OPTIMIZERS = (
    "adamw",
    "galore",
    "galore-torch",
    "fira",
    "apollo-mini",
    "galore8bit",
    "adamw+sltrain",
)


#: Entries that are lowmem optimizers and so take ``layerwise=True``.
LAYERWISE_CAPABLE = ("galore", "fira", "apollo", "apollo-mini", "adamw8bit", "galore8bit")


def build_optimizer(name: str, model: nn.Module, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """Build registry entry ``name`` for ``model``; KeyError names the known entries, ValueError
    a layer-wise request for an optimizer that has no layer-wise mode."""
    if name not in REGISTRY:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(REGISTRY)}")
    if settings.layerwise and name not in LAYERWISE_CAPABLE:
        raise ValueError(
            f"{name} has no layer-wise mode; the layerwise technique needs one of "
            f"{', '.join(LAYERWISE_CAPABLE)}"
        )
    return REGISTRY[name].factory(model, settings)
