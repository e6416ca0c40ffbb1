"""``AdamW8bit`` and ``GaLoreAdamW8bit``: presets of GaLoreAdamW with 8-bit block-wise states.

Precision is a constructor option of every lowmem optimizer (``state_dtype``); these names only
change its default to ``"int8"``, so code written for bitsandbytes' ``AdamW8bit`` or
galore-torch's ``GaLoreAdamW8bit`` ports by changing the import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from lowmem.optim.galore_adamw import GaLoreAdamW

__all__ = ["AdamW8bit", "GaLoreAdamW8bit"]


class GaLoreAdamW8bit(GaLoreAdamW):
    """:class:`GaLoreAdamW` with ``state_dtype="int8"``: 8-bit block-wise moments (Dettmers et al.
    2022) for the low-rank moments of projected weights and for every plain parameter.

    State per m×n projected weight (m >= n, rank r): 2·m·r bytes of codes plus 8 bytes per 256
    codes, the n×r basis, and the counters; per plain parameter with p elements: 2·p + 8·⌈p/256⌉
    bytes (fp32 moments for tensors under ``min_8bit_size``). All other arguments: as
    :class:`GaLoreAdamW`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_dtype: str | None = "int8",
        **options: Any,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, state_dtype=state_dtype, **options)


class AdamW8bit(GaLoreAdamW8bit):
    """``torch.optim.AdamW`` with 8-bit block-wise states: about 2.03 bytes of state per parameter
    instead of 8 (Dettmers et al. 2022, arXiv:2110.02861).

    Each step is one fused pass per tensor: dequantize both moments, the AdamW update in fp32
    (torch.optim.AdamW's eps placement and decay order), requantize with the block's new absmax.
    It runs as an OpenMP + SIMD C++ kernel on CPU (built on first use) and a Triton kernel on
    CUDA. Pass param groups without ``rank`` (with ``rank`` this is :class:`GaLoreAdamW8bit`).
    """
