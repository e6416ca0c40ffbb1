"""Import Triton if it can be imported, so kernel files load (for their references) without it.

Triton decides at decoration time whether ``@triton.jit`` compiles for the GPU or builds an
interpreted function, from ``TRITON_INTERPRET``; set that before importing any kernel module.
"""

from __future__ import annotations

import contextlib
import os

import torch

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


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context manager to wrap a kernel launch in: ``t``'s CUDA device made current.

    Triton launches on the *current* CUDA device and its current stream, not on the device of
    the tensors it is given; with ``t`` on ``cuda:1`` while ``cuda:0`` is current (one process
    driving several GPUs, e.g. a pipeline split) the kernel would run on the wrong GPU.
    ``torch.cuda.device(t.device)`` makes ``t``'s device (so its current stream) the launch
    target. A no-op for tensors on other devices (CPU tensors under the interpreter) and in a
    process that sees one GPU, where the current device can only be ``t``'s: launches are a hot
    path (an optimizer step makes one per weight), so they skip the device exchange there.
    """
    if t.device.type == "cuda" and torch.cuda.device_count() > 1:  # the count is cached by torch
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


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

    @triton.jit
    def _grouped_tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Row and column offsets (int64) of this program's output tile, in grouped order.

        Programs are numbered along groups of ``GROUP_M`` tile rows, so neighbouring programs
        share rows of the left operand and it stays in L2 (Triton's matmul tutorial ordering).
        int64: m*n (or stride*index) of a large matrix exceeds 2**31.
        """
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (pid // num_pid_in_group) * GROUP_M
        group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
        pid_n = (pid % num_pid_in_group) // group_size_m
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_m, offs_n

else:
    _rounded_for = None
    _grouped_tile_offsets = None

__all__ = ["HAS_TRITON", "_grouped_tile_offsets", "_rounded_for", "interpreting", "on_device", "tl", "triton"]
