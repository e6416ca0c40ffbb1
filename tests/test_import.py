"""`import lowmem` needs only torch: Triton and transformers load on first use, and without
Triton every op still runs on CPU through its reference."""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_is_light():
    out = _run(
        """
        import sys
        import lowmem, lowmem.optim, lowmem.nn, lowmem.memory, lowmem.bench
        heavy = [m for m in ("triton", "transformers", "galore_torch", "bitsandbytes") if m in sys.modules]
        print("heavy:", heavy)
        """
    )
    assert "heavy: []" in out


def test_everything_runs_on_cpu_without_triton():
    out = _run(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError, as on a machine without it
        import os
        os.environ.pop("LOWMEM_BACKEND", None)
        import torch
        import lowmem
        from lowmem import _ops
        from lowmem.optim import GaLoreAdamW
        w = torch.nn.Parameter(torch.randn(12, 10))
        b = torch.nn.Parameter(torch.randn(12))
        opt = GaLoreAdamW([{"params": [w], "rank": 3}, {"params": [b]}], lr=0.1)
        for _ in range(3):
            w.grad, b.grad = torch.randn(12, 10), torch.randn(12)
            opt.step()
        assert torch.isfinite(w).all() and torch.isfinite(b).all()
        print("reason:", _ops.unavailable_reason("adamw", "triton", "cuda"))
        try:
            with lowmem.backend("triton"):
                _ops.dispatch("adamw", "cpu")
        except lowmem.BackendUnavailableError as exc:
            print("forced:", exc)
        """
    )
    assert "reason: " in out and ("triton is not importable" in out or "no CUDA device" in out)
    assert "forced: backend 'triton' was requested" in out
