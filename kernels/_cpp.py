"""Build and load the compiled C++ CPU ops of ``csrc/`` on first use.

Each op lives in one source file, ``csrc/<name>.cpp``, which defines its schema and CPU
implementation in the ``lowmem`` torch library namespace (``TORCH_LIBRARY_FRAGMENT(lowmem, m)``).
:func:`load_cpp_op` compiles it with ``torch.utils.cpp_extension.load`` (ninja and a C++
compiler; flags ``-O3 -march=native -fopenmp -ffp-contract=off -fno-math-errno``) into torch's
extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) under
``lowmem_<name>_<hash>``, the hash covering the source, the flags and the torch version, so an
edited source or a new torch never loads a stale build; later processes load the cached library
in milliseconds. ``-march=native`` tunes the build to this CPU: a cache directory shared between
machines of different CPU generations would need ``TORCH_EXTENSIONS_DIR`` set per machine.

When the op cannot be built (no compiler, no ninja, a failed compile) :func:`load_cpp_op` warns
once and raises :class:`CppOpUnavailableError` with the reason; ``lowmem._ops`` imports the
op's launcher module lazily, records that reason, and dispatches to the reference instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["CSRC", "CXX_FLAGS", "CppOpUnavailableError", "cxx_flags", "load_cpp_op"]

#: Where the C++ sources live (shipped in the wheel as package data).
CSRC = Path(__file__).resolve().parent.parent / "csrc"
CXX_FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")
#: GCC only: its generic tuning (what -march=native gets on CPUs newer than the compiler) never
#: emits vector gathers, and table lookups are the core of the 8-bit kernels (measured on a
#: Sapphire Rapids core: quantizing costs 2.5x more with the gathers emulated).
GCC_FLAGS = ("-mtune-ctrl=use_gather",)
LD_FLAGS = ("-fopenmp",)


class CppOpUnavailableError(RuntimeError):
    """A compiled C++ op could not be built or loaded; the message says why and how to fix it."""


_LOADED: dict[str, Callable[..., Any]] = {}
_FAILED: dict[str, str] = {}


def _compiler() -> str | None:
    # torch.utils.cpp_extension compiles with $CXX, else `c++`.
    return shutil.which(os.environ.get("CXX", "c++"))


@functools.cache
def _is_gcc() -> bool:
    compiler = _compiler()
    if compiler is None:
        return False
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in out and "clang" not in out.lower()


def cxx_flags() -> list[str]:
    """The compile flags for this machine's compiler."""
    return [*CXX_FLAGS, *(GCC_FLAGS if _is_gcc() else ())]


def _build_name(name: str, source: bytes) -> str:
    digest = hashlib.sha256()
    for part in (source, " ".join(cxx_flags() + list(LD_FLAGS)).encode(), torch.__version__.encode()):
        digest.update(part)
        digest.update(b"\0")
    return f"lowmem_{name}_{digest.hexdigest()[:12]}"


def _why_not_buildable() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    if _compiler() is None:
        return (
            f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r}); install g++ or "
            "clang++, or set CXX"
        )
    if not is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension needs it): pip install ninja"
    return None


def load_cpp_op(name: str) -> Callable[..., Any]:
    """``torch.ops.lowmem.<name>``, built from ``csrc/<name>.cpp`` if this process has not yet.

    Raises:
        CppOpUnavailableError: the source is missing, or there is no compiler or ninja, or the
            build failed (the message includes the compiler's error). Warns once per op.
    """
    if name in _LOADED:
        return _LOADED[name]
    if name not in _FAILED:
        try:
            _LOADED[name] = _build_and_load(name)
            return _LOADED[name]
        except CppOpUnavailableError as exc:
            _FAILED[name] = str(exc)
        except Exception as exc:  # a compiler error surfaces as RuntimeError / CalledProcessError
            _FAILED[name] = f"building csrc/{name}.cpp failed: {exc}"
        warnings.warn(
            f"lowmem: compiled C++ op {name!r} is unavailable, using the PyTorch reference: {_FAILED[name]}",
            RuntimeWarning,
            stacklevel=2,
        )
    raise CppOpUnavailableError(_FAILED[name])


def _build_and_load(name: str) -> Callable[..., Any]:
    source_path = CSRC / f"{name}.cpp"
    if not source_path.is_file():
        raise CppOpUnavailableError(f"{source_path} is missing from this installation")
    reason = _why_not_buildable()
    if reason is not None:
        raise CppOpUnavailableError(reason)
    from torch.utils.cpp_extension import load

    load(
        name=_build_name(name, source_path.read_bytes()),
        sources=[str(source_path)],
        extra_cflags=cxx_flags(),
        extra_ldflags=list(LD_FLAGS),
        is_python_module=False,  # the library registers torch.ops.lowmem.<name> when loaded
        verbose=False,
    )
    return getattr(torch.ops.lowmem, name)
