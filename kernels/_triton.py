"""Import Triton if it can be imported, so kernel files load (for their references) without it.

Triton decides at decoration time whether ``@triton.jit`` compiles for the GPU or builds an
interpreted function, from ``TRITON_INTERPRET``; set that before importing any kernel module.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # no triton wheel for this platform, or a broken install
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "tl", "triton"]
