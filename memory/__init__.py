"""Activation offload, offloaded checkpointing, CPU-offloaded optimizer states, memory estimator.

- :func:`offload_activations`: tensors saved for backward live in (pinned, pooled) host memory,
  copied on a side stream on CUDA; parameters and their views stay put.
- :func:`checkpoint`, :func:`apply_checkpointing`: activation checkpointing whose kept block
  inputs are offloaded; :class:`PartialRecompute` offloads part of each block's activations and
  recomputes the rest (in the spirit of MEMO, 2025).
- :class:`CPUOffloadOptimizer`: fp32 master weights and optimizer states in host memory, the
  update on the host (ZeRO-Offload's layout).
- :func:`estimate`: weights, gradients, optimizer states and activations per device, for a model
  or a built-in LLaMA preset, before anything is allocated.
- :class:`SavedTensorCounter`: count the bytes autograd saves for backward.
"""

from lowmem.memory._storage import SavedTensorCounter
from lowmem.memory.checkpoint import CheckpointingHandle, PartialRecompute, apply_checkpointing, checkpoint
from lowmem.memory.cpu_offload import CPUOffloadOptimizer
from lowmem.memory.estimator import MemoryReport, estimate
from lowmem.memory.offload import ActivationOffload, HostBufferPool, offload_activations

__all__: list[str] = [
    "ActivationOffload",
    "CPUOffloadOptimizer",
    "CheckpointingHandle",
    "HostBufferPool",
    "MemoryReport",
    "PartialRecompute",
    "SavedTensorCounter",
    "apply_checkpointing",
    "checkpoint",
    "estimate",
    "offload_activations",
]

# Token-wise recomputation and swapping (MEMO, Zhao et al. 2025) of position-wise sublayers.
from lowmem.memory.tokenwise import (
    TokenwiseHandle,
    TokenwiseStats,
    apply_tokenwise_recompute,
    split_point,
    tokenwise_checkpoint,
)

__all__ += [
    "TokenwiseHandle",
    "TokenwiseStats",
    "apply_tokenwise_recompute",
    "split_point",
    "tokenwise_checkpoint",
]
