"""``python -m lowmem.env``: what this machine offers lowmem, and which backend each op uses.

Prints torch / triton / CUDA versions, whether compiled C++ ops are available, and for every
registered op the backend that dispatch would choose on CPU and on CUDA, with the reason each
other backend was rejected. Run it first when a kernel is not being used where you expected.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys

import torch

from lowmem import _ops


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"
    return triton.__version__


def report() -> str:
    """The environment report as text."""
    lines = [
        f"lowmem     {__import__('lowmem').__version__}",
        f"python     {sys.version.split()[0]} ({platform.machine()})",
        f"torch      {torch.__version__}",
        f"triton     {_triton_version()}",
        f"CUDA       {torch.version.cuda or 'none (CPU build)'}; "
        + (
            f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
            if torch.cuda.is_available()
            else "no CUDA device visible"
        ),
        f"compiler   {shutil.which('c++') or shutil.which('g++') or 'none found'}",
        "C++ ops    "
        + (
            ", ".join(op for op in _ops.registered_ops() if _ops.unavailable_reason(op, "cpp", "cpu") is None)
            or "none available"
        )
        + " (csrc/: adamw8bit; adam_direction's is torch's own fused kernel)",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}  "
        f"LOWMEM_BACKEND={os.environ.get('LOWMEM_BACKEND', '') or '(auto)'}",
        "",
    ]
    for device in ("cpu", "cuda"):
        lines.append(f"ops on {device}:")
        for op in _ops.registered_ops():
            try:
                chosen = _ops.choose_backend(op, device)
            except _ops.BackendUnavailableError as exc:
                chosen = f"ERROR: {exc}"
            lines.append(f"  {op:<16} -> {chosen}")
            for backend_name, reason in _ops.explain(op, device).items():
                if reason is not None:
                    lines.append(f"      {backend_name:<7} rejected: {reason}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
