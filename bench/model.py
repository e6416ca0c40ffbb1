"""Small LLaMA-style models for the training benchmark (transformers ``LlamaForCausalLM``).

Built from a ``LlamaConfig`` with a byte-level vocabulary of 256, so nothing is downloaded. Presets
are sized for CPUs: ``tiny`` (the default) trains 200 steps in well under a minute on 2 cores while
its 256-wide matrices are large enough that GaLore's rank 64 really compresses the optimizer state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 256


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a LLaMA decoder: width, depth, attention heads and MLP width."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int

    def to_dict(self) -> dict[str, int]:
        """The preset as plain JSON-able values."""
        return asdict(self)


PRESETS: dict[str, ModelPreset] = {
    # For tests: seconds per run.
    "micro": ModelPreset(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128),
    # Default: ~1.7M parameters, q/k/v/o 256x256 and MLP 688x256 matrices.
    "tiny": ModelPreset(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=688),
    # ~13M parameters: minutes per run on a CPU, seconds on a GPU.
    "small": ModelPreset(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1376),
}


def build_model(preset: ModelPreset, seq_len: int, seed: int) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM``; the same ``seed`` gives the same weights.

    Embeddings and the LM head are untied (as in LLaMA), attention uses PyTorch SDPA.
    """
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy import, only when training

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def language_model_loss(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of ``windows[:, :-1]`` predicting ``windows[:, 1:]``.

    Args:
        windows: int64 ``[batch, seq_len + 1]`` token ids.
    """
    logits = model(input_ids=windows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-byte loss over a fixed set of windows, every token weighted equally."""
    was_training = model.training
    model.eval()
    total = 0.0
    for chunk in windows.split(batch_size):
        total += language_model_loss(model, chunk).item() * chunk.shape[0]
    model.train(was_training)
    return total / windows.shape[0]
