"""The loader of compiled C++ ops: cached builds named by a source hash, and clear reasons (plus
one warning) when an op cannot be built, which dispatch turns into a fallback to the reference."""

from __future__ import annotations

import pytest
import torch

from lowmem import _ops
from lowmem.kernels import _cpp


def test_build_name_hashes_source_and_flags() -> None:
    a = _cpp._build_name("adamw8bit", b"int x;")
    assert a.startswith("lowmem_adamw8bit_") and len(a) == len("lowmem_adamw8bit_") + 12
    assert a == _cpp._build_name("adamw8bit", b"int x;")
    assert a != _cpp._build_name("adamw8bit", b"int y;")


def test_flags() -> None:
    flags = _cpp.cxx_flags()
    for flag in ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"):
        assert flag in flags


def test_missing_compiler_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = _cpp._why_not_buildable()
    assert reason is not None and "no C++ compiler found" in reason and "set CXX" in reason


def test_missing_source_raises_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cpp, "_FAILED", {})
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference"):
        with pytest.raises(_cpp.CppOpUnavailableError, match=r"no_such_op\.cpp is missing"):
            _cpp.load_cpp_op("no_such_op")
    with pytest.raises(_cpp.CppOpUnavailableError):  # remembered: no second build, no second warning
        _cpp.load_cpp_op("no_such_op")


def test_unbuildable_op_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """An op whose cpp module fails to import: dispatch records why and uses the reference."""
    _ops.register_op(
        "test_unbuildable",
        ref="lowmem.kernels.adamw8bit:adamw8bit_ref",
        cpp="lowmem.kernels.no_such_module:op",
    )
    try:
        reason = _ops.unavailable_reason("test_unbuildable", "cpp", "cpu", torch.float32)
        assert reason is not None and "no_such_module" in reason
        assert _ops.choose_backend("test_unbuildable", "cpu") == "ref"
    finally:
        del _ops._REGISTRY["test_unbuildable"]


def test_loaded_op_is_cached() -> None:
    assert _cpp.load_cpp_op("adamw8bit") is _cpp.load_cpp_op("adamw8bit")
    assert hasattr(torch.ops.lowmem, "adamw8bit")
