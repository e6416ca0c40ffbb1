"""torch.optim replacements: low-rank projected optimizers.

- :class:`GaLoreAdamW`: AdamW with GaLore gradient low-rank projection (Zhao et al. 2024).
- :class:`FiraAdamW`: GaLore plus the norm-scaled full-rank residual (Chen et al. 2024).
- :class:`ApolloAdamW`: APOLLO / APOLLO-Mini, SGD-like memory (Zhu et al. 2024).
- :class:`GaLoreAdafactor`: Adafactor with factored second moments in the GaLore subspace.
- :class:`AdamW8bit`, :class:`GaLoreAdamW8bit`: presets with 8-bit block-wise states.
- :func:`lowrank_param_groups`: split a model into a low-rank group and a plain group.
- :func:`register_layerwise_ddp_hook`: layer-wise stepping in a DistributedDataParallel model.
- :func:`reset_momentum`: zero the momentum, re-warm the lr (Glentis et al. 2025).
"""

from lowmem.optim.adamw8bit import AdamW8bit, GaLoreAdamW8bit
from lowmem.optim.apollo_adamw import APOLLO_MINI, ApolloAdamW
from lowmem.optim.fira_adamw import FiraAdamW
from lowmem.optim.galore_adafactor import GaLoreAdafactor
from lowmem.optim.galore_adamw import GaLoreAdamW
from lowmem.optim.layerwise_ddp import register_layerwise_ddp_hook
from lowmem.optim.momentum_reset import reset_momentum
from lowmem.optim.param_groups import lowrank_param_groups

__all__ = [
    "APOLLO_MINI",
    "AdamW8bit",
    "ApolloAdamW",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "lowrank_param_groups",
    "register_layerwise_ddp_hook",
    "reset_momentum",
]
