"""The dispatch point: automatic choice, overrides, dtype routing and the reasons it gives."""

import pytest
import torch

import lowmem
from lowmem import _ops
from lowmem.env import report


def test_cpu_ops_use_cpp_where_registered_else_the_reference():
    for op in _ops.registered_ops():
        expected = "cpp" if "cpp" in _ops._REGISTRY[op].impls else "ref"
        assert _ops.choose_backend(op, "cpu") == expected
    assert _ops.choose_backend("adam_direction", "cpu") == "cpp"
    assert _ops.dispatch("adamw", "cpu").__name__ == "adamw_ref"


def test_context_manager_forces_and_restores():
    with lowmem.backend("ref"):
        assert _ops.forced_backend() == "ref"
        with lowmem.backend("triton"):
            assert _ops.forced_backend() == "triton"
        assert _ops.forced_backend() == "ref"
    assert _ops.forced_backend() is None


def test_forcing_an_unavailable_backend_says_why():
    with lowmem.backend("cpp"), pytest.raises(lowmem.BackendUnavailableError, match="no cpp implementation"):
        _ops.dispatch("adamw", "cpu")
    with lowmem.backend("cpp"), pytest.raises(lowmem.BackendUnavailableError, match="run on CPU tensors"):
        _ops.dispatch("adam_direction", "cuda")
    with lowmem.backend("cuda"), pytest.raises(lowmem.BackendUnavailableError, match="no cuda impl"):
        _ops.dispatch("adamw", "cpu")


def test_triton_rejects_dtypes_it_does_not_support():
    with lowmem.backend("triton"), pytest.raises(lowmem.BackendUnavailableError, match="not float64"):
        _ops.dispatch("adamw", "cpu", torch.float64)
    reason = _ops.unavailable_reason("lowrank_update", "triton", "cpu", torch.float64)
    assert reason is not None and "float32, bfloat16, float16" in reason


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = _ops.unavailable_reason("adamw", "triton", "cpu")
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _ops.unavailable_reason("adamw", "triton", "cpu") is None


def test_environment_variable_override(monkeypatch):
    monkeypatch.setenv("LOWMEM_BACKEND", "ref")
    assert _ops.choose_backend("adamw", "cpu") == "ref"
    monkeypatch.setenv("LOWMEM_BACKEND", "cpp")
    with pytest.raises(lowmem.BackendUnavailableError, match="'cpp' was requested"):
        _ops.choose_backend("adamw", "cpu")
    monkeypatch.setenv("LOWMEM_BACKEND", "fast")
    with pytest.raises(ValueError, match="LOWMEM_BACKEND='fast'"):
        _ops.choose_backend("adamw", "cpu")
    # The context manager wins over the environment.
    with lowmem.backend("ref"):
        assert _ops.choose_backend("adamw", "cpu") == "ref"


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown backend"):
        with lowmem.backend("gpu"):
            pass
    with pytest.raises(KeyError, match="unknown op"):
        _ops.unavailable_reason("no_such_op", "ref", "cpu")
    with pytest.raises(ValueError, match="'ref' implementation is required"):
        _ops.register_op("broken", triton="x:y")
    with pytest.raises(ValueError, match="unknown backends"):
        _ops.register_op("broken", ref="x:y", metal="x:z")


def test_cuda_order_and_per_op_preference(monkeypatch):
    """With a CUDA device, fused Adam goes to Triton while lowrank_update prefers cuBLAS (ref)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _ops.choose_backend("adamw", "cuda", torch.float32) == "triton"
    assert _ops.choose_backend("adamw", "cuda", torch.float64) == "ref"
    assert _ops.choose_backend("lowrank_update", "cuda", torch.bfloat16) == "ref"
    with lowmem.backend("triton"):
        assert _ops.choose_backend("lowrank_update", "cuda", torch.bfloat16) == "triton"


def test_cuda_backends_rejected_without_a_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in _ops.unavailable_reason("adamw", "triton", "cuda")
    assert _ops.choose_backend("adamw", "cuda") == "ref"


def test_a_broken_implementation_is_a_reason_not_a_crash():
    _ops.register_op(
        "test_broken_op", ref="lowmem.kernels.adamw:adamw_ref", triton="lowmem.no_such_module:fn"
    )
    try:
        reason = _ops.unavailable_reason("test_broken_op", "triton", "cpu")
        if _ops._interpreting():
            assert reason is not None and "importing lowmem.no_such_module:fn failed" in reason
        assert _ops.choose_backend("test_broken_op", "cpu") == "ref"
    finally:
        del _ops._REGISTRY["test_broken_op"]


def test_env_report_names_every_op_and_backend_choice():
    text = report()
    assert f"torch      {torch.__version__}" in text
    for op in _ops.registered_ops():
        assert f"  {op:<16} -> {_ops.choose_backend(op, 'cpu')}" in text
    assert "rejected:" in text


def test_dispatch_follows_overrides_after_caching(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ref = _ops.dispatch("adamw", "cpu", torch.float32)
    assert ref.__name__ == "adamw_ref"
    with lowmem.backend("triton"):
        assert _ops.dispatch("adamw", "cpu", torch.float32).__name__ == "adamw"
    monkeypatch.setenv("LOWMEM_BACKEND", "triton")
    assert _ops.dispatch("adamw", "cpu", torch.float32).__name__ == "adamw"
    monkeypatch.delenv("LOWMEM_BACKEND")
    assert _ops.dispatch("adamw", "cpu", torch.float32) is ref
