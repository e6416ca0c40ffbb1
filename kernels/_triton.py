"""Import Triton if it can be imported, so kernel files load (for their references) without it.

Triton decides at decoration time whether ``@triton.jit`` compiles for the GPU or builds an
interpreted function, from ``TRITON_INTERPRET``; set that before importing any kernel module.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # no triton wheel for this platform, or a broken install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False


def interpreting() -> bool:
    """Whether kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:

    @triton.jit
    def _rounded_for(x, ptr, EMULATE_RTNE: tl.constexpr):
        """``x`` (fp32) pre-rounded to nearest-even for storing through ``ptr`` when that is bf16.

        Triton's interpreter converts fp32 -> bf16 by truncation (round toward zero) where GPUs
        round to nearest even; under the interpreter (``EMULATE_RTNE``) round in integer
        arithmetic first so the truncating store is exact. A no-op on GPU and for other dtypes.
        """
        if EMULATE_RTNE:
            if ptr.dtype.element_ty == tl.bfloat16:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # keep NaNs NaN
        return x

else:
    _rounded_for = None

__all__ = ["HAS_TRITON", "_rounded_for", "interpreting", "tl", "triton"]
