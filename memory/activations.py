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
        input_in_layer: the part of ``per_layer`` that *is* the layer input's storage: in fp32 the
            first RMSNorm's "fp32 copy" of its input is the input itself (``layer_input``), in a
            lower precision a separate tensor (0). A checkpointed layer's kept input and its
            recomputed tensors then share it.
        head: final norm, log-softmax and targets (after the last layer).
        fixed: input ids, rotary tables, the loss scalar.
        num_layers: how many decoder layers.
    """

    per_layer: int
    layer_input: int
    head: int
    fixed: int
    num_layers: int
    input_in_layer: int = 0

    @property
    def total(self) -> int:
        """Everything saved when nothing is checkpointed or offloaded."""
        return self.num_layers * self.per_layer + self.head + self.fixed

    def device_peak(self, mode: str) -> int:
        """Saved-tensor bytes on the device at the peak of a step under activation ``mode``.

        - ``none``: everything, at the end of the forward (:attr:`total`).
        - ``checkpoint``: every layer's input is kept; the peak is either the end of the forward
          (inputs + head) or the recomputation of the last layer in backward (inputs + one
          layer's saved tensors; the head's are freed by then, and in fp32 the layer's input is
          among them): ``L·x + fixed + max(head, per_layer - input_in_layer)``.
        - ``offload``: saved tensors leave as they are produced and come back as backward needs
          them; a bound: one layer (or the head) in use and one layer in flight.
        - ``offload_checkpoint`` (the step inside the offload context, as ``bench/offload.py``
          runs it): the recomputed layer with its input brought back, and the previous layer's
          input in flight (prefetched): ``max(head, per_layer - input_in_layer + x) + x + fixed``.

        ``tests/memory/test_estimator_modes.py`` measures each on the tiny LLaMA (with
        :class:`lowmem.memory.resident.ResidentActivations`).
        """
        x, layers = self.layer_input, self.num_layers
        recomputed = self.per_layer - self.input_in_layer
        if mode == "none":
            return self.total
        if mode == "checkpoint":
            return layers * x + self.fixed + max(self.head, recomputed)
        if mode == "offload":
            return max(self.per_layer, self.head) + self.per_layer + self.fixed
        if mode == "offload_checkpoint":
            return max(self.head, recomputed + x) + x + self.fixed
        raise ValueError(f"unknown activation mode {mode!r}")

    def host_bytes(self, mode: str) -> int:
        """Saved-tensor bytes that ``mode`` keeps in host memory (every saved tensor with ``offload``;
        the layer inputs and the head's tensors with ``offload_checkpoint``)."""
        if mode == "offload":
            return self.total
        if mode == "offload_checkpoint":
            return self.num_layers * self.layer_input + self.head
        return 0


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
        input_in_layer=tokens * h * b if b == 4 else 0,
    )
