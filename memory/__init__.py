"""Activation offload, offloaded checkpointing, CPU-offloaded optimizer states, memory estimator.

Nothing is exported yet: these arrive with their own issue.
"""

__all__: list[str] = []
