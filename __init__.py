"""lowmem: train large models on small hardware.

Memory-efficient optimizers (``lowmem.optim``), memory-saving layers (``lowmem.nn``),
activation and optimizer offload (``lowmem.memory``), the Triton / C++ kernels behind them
(``lowmem.kernels``), and a benchmark harness (``python -m lowmem.bench``).

``import lowmem`` needs only torch: Triton, compilers and GPUs are looked for on first use.
"""

from lowmem._ops import BackendUnavailableError, backend

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "__version__", "backend"]
