"""Analytic model of the tensors a LLaMA decoder saves for backward (the estimator's activations).

Counted as the bytes of distinct storages that autograd holds at the end of the forward pass
(what ``torch.autograd.graph.saved_tensors_hooks`` sees, parameters excluded), for
``transformers.LlamaForCausalLM`` with SDPA attention and a cross-entropy loss on fp32 logits.
With T = batch·seq tokens, b the activation dtype's size, h the width, i the MLP width, a the
heads, k = kv_heads·head_dim, each decoder layer saves, per token::

    2 RMSNorms   2 · (4h + 4 + 2·b·h)   fp32 copy of the input (the residual stream; in fp32 the
                                       input itself), fp32 rsqrt per token, the normalized input
                                       and the weight-scaled output in b
    attention    b·(2h + 2k) + 4a       rotated q (h) and k (k), v (k), the attention output (h);
                                       the fp32 log-sum-exp per head (fused attention: no S×S matrix)
    SwiGLU MLP   4·b·i                  gate and up outputs, silu(gate), their product

and the model once: the final RMSNorm (4h + 4 + 2·b·h per token), the fp32 log-softmax of the
logits (4·V per token), the int64 input ids and targets (8 + 8 per token), the rotary cos and sin
tables (2 · seq · head_dim · b) and the loss's fp32 scalar. ``tests/memory/test_estimator.py``
checks the sum against a saved-tensor count on the tiny LLaMA of ``lowmem.bench.model``.

Not counted: tensors alive only transiently (the logits before the loss, activation gradients
during backward, workspace of the attention kernel), allocator rounding and fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowmem.memory.presets import LlamaShape

__all__ = ["ActivationBytes", "llama_activation_bytes"]


@dataclass(frozen=True)
class ActivationBytes:
    """Saved-for-backward bytes of one forward pass, split where the activation modes need it.

    Attributes:
        per_layer: one decoder layer's saved tensors.
        layer_input: one decoder layer's input (what checkpointing keeps per layer).
        head: final norm, log-softmax and targets (after the last layer).
        fixed: input ids, rotary tables, the loss scalar.
        num_layers: how many decoder layers.
    """

    per_layer: int
    layer_input: int
    head: int
    fixed: int
    num_layers: int

    @property
    def total(self) -> int:
        """Everything saved when nothing is checkpointed or offloaded."""
        return self.num_layers * self.per_layer + self.head + self.fixed


def llama_activation_bytes(
    shape: LlamaShape, batch_size: int, seq_len: int, dtype_bytes: int
) -> ActivationBytes:
    """The saved-tensor bytes of one training forward pass of a LLaMA (see the module docstring)."""
    tokens = batch_size * seq_len
    h, i, b = shape.hidden_size, shape.intermediate_size, dtype_bytes
    kv = shape.kv_heads * shape.head_dim
    norm = 4 * h + 4 + 2 * b * h
    per_token = 2 * norm + b * (2 * h + 2 * kv) + 4 * shape.num_heads + 4 * b * i
    head = tokens * (norm + 4 * shape.vocab_size + 8)
    fixed = 8 * batch_size * (seq_len + 1) + 2 * seq_len * shape.head_dim * b + 4
    return ActivationBytes(
        per_layer=tokens * per_token,
        layer_input=tokens * h * b,
        head=head,
        fixed=fixed,
        num_layers=shape.num_layers,
    )
