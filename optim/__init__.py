"""torch.optim replacements: low-rank projected optimizers.

- :class:`GaLoreAdamW`: AdamW with GaLore gradient low-rank projection (Zhao et al. 2024).
- :func:`lowrank_param_groups`: split a model into a low-rank group and a plain group.
"""

from lowmem.optim.galore_adamw import GaLoreAdamW
from lowmem.optim.param_groups import lowrank_param_groups

__all__ = ["GaLoreAdamW", "lowrank_param_groups"]
