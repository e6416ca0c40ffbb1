"""LLaMA shapes for the memory estimator, and a parameter skeleton of them on the meta device.

The 60M-7B presets are the configurations of the GaLore paper's pre-training experiments (Zhao et
al. 2024, arXiv:2403.03507, Table of LLaMA hyperparameters; the ``configs/llama_*.json`` of its
code): untied embedding and LM head, vocabulary 32000, SwiGLU MLP, RMSNorm, no biases. 13B and 70B
are LLaMA-2's (Touvron et al. 2023, arXiv:2307.09288; 70B uses grouped-query attention with 8
key/value heads).

:func:`llama_skeleton` builds a module with exactly the parameters (names, shapes) of
``transformers.LlamaForCausalLM`` for a shape, on the meta device: nothing is allocated, and
transformers is not needed. The estimator counts weights from it and selects the projected
weights with :func:`lowmem.optim.lowrank_param_groups`, by the same module names as on the real model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LLAMA_PRESETS", "LlamaShape", "llama_shape", "llama_skeleton"]


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that fix a LLaMA decoder's parameters and activations."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int = 32000
    num_kv_heads: int | None = None  # None: as many as num_heads (no grouped-query attention)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


LLAMA_PRESETS: dict[str, LlamaShape] = {
    "llama-60m": LlamaShape(512, 1376, 8, 8),
    "llama-130m": LlamaShape(768, 2048, 12, 12),
    "llama-350m": LlamaShape(1024, 2736, 24, 16),
    "llama-1b": LlamaShape(2048, 5461, 24, 32),
    "llama-7b": LlamaShape(4096, 11008, 32, 32),
    "llama-13b": LlamaShape(5120, 13824, 40, 40),
    "llama-70b": LlamaShape(8192, 28672, 80, 64, num_kv_heads=8),
}


def llama_shape(spec: Any) -> LlamaShape:
    """A :class:`LlamaShape` from a preset name (``"llama-7b"`` or ``"7b"``), itself, or a config.

    A config is anything with ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads`` and ``vocab_size`` attributes (``transformers.LlamaConfig``).
    """
    if isinstance(spec, LlamaShape):
        return spec
    if isinstance(spec, str):
        key = spec.lower()
        key = key if key.startswith("llama-") else f"llama-{key}"
        if key not in LLAMA_PRESETS:
            raise ValueError(f"unknown model preset {spec!r}; choose one of {', '.join(LLAMA_PRESETS)}")
        return LLAMA_PRESETS[key]
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [name for name in needed if not hasattr(spec, name)]
    if missing:
        raise TypeError(
            f"cannot read a LLaMA shape from {type(spec).__name__}: it lacks {missing}; pass a preset name "
            f"({', '.join(LLAMA_PRESETS)}), a LlamaShape, a LlamaConfig or an nn.Module"
        )
    kv = getattr(spec, "num_key_value_heads", None)
    return LlamaShape(
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_hidden_layers,
        spec.num_attention_heads,
        spec.vocab_size,
        None if kv in (None, spec.num_attention_heads) else kv,
    )


class _Norm(nn.Module):
    def __init__(self, size: int, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype))


def _linear(n_in: int, n_out: int, device: torch.device | str, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype)


def llama_skeleton(shape: LlamaShape, dtype: torch.dtype = torch.bfloat16, device: str = "meta") -> nn.Module:
    """A module with ``LlamaForCausalLM``'s parameter names and shapes (no forward), on ``device``.

    ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
    ``model.layers.{i}.mlp.{gate,up,down}_proj``, ``model.layers.{i}.{input,post_attention}_layernorm``,
    ``model.norm``, ``lm_head``. On ``"meta"`` (the default) it allocates nothing.
    """
    h, kv = shape.hidden_size, shape.kv_heads * shape.head_dim

    def layer() -> nn.Module:
        block = nn.Module()
        block.self_attn = nn.Module()
        for name, n_out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            setattr(block.self_attn, name, _linear(h, n_out, device, dtype))
        block.self_attn.o_proj = _linear(h, h, device, dtype)
        block.mlp = nn.Module()
        block.mlp.gate_proj = _linear(h, shape.intermediate_size, device, dtype)
        block.mlp.up_proj = _linear(h, shape.intermediate_size, device, dtype)
        block.mlp.down_proj = _linear(shape.intermediate_size, h, device, dtype)
        block.input_layernorm = _Norm(h, device, dtype)
        block.post_attention_layernorm = _Norm(h, device, dtype)
        return block

    root = nn.Module()
    root.model = nn.Module()
    root.model.embed_tokens = nn.Embedding(shape.vocab_size, h, device=device, dtype=dtype)
    root.model.layers = nn.ModuleList(layer() for _ in range(shape.num_layers))
    root.model.norm = _Norm(h, device, dtype)
    root.lm_head = _linear(h, shape.vocab_size, device, dtype)
    return root
