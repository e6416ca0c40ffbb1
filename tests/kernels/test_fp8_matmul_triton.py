"""The Triton fp8 GEMM against ``fp8_matmul_ref`` (interpreter on CPU, compiled on a GPU): bit
for bit where every fp32 partial sum is exact (small-integer operands, so summation order cannot
matter), within the fp32 summation bound on Gaussian operands, every scale layout, operand pair
and output dtype, shapes off the block grid, K = 1 and K = 0, zero rows, NaN scales, strides;
and the measured choice between ``torch._scaled_mm`` and the kernel (fp8_matmul_select) with
the timings faked, since this machine has no fp8 GPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

import lowmem
from lowmem._ops import dispatch
from lowmem.kernels import fp8_matmul_select as select
from lowmem.kernels import fp8_matmul_triton
from lowmem.kernels._triton import triton
from lowmem.kernels.fp8_matmul import fp8_matmul_ref, fp8_supported
from lowmem.kernels.fp8_quantize import quantize_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SHAPES = [(1, 1, 1), (7, 33, 1), (33, 7, 100), (67, 71, 130), (1, 257, 16), (257, 1, 17), (65, 129, 63)]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PAIRS = [(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2)]  # forward; dY x W; X^T-side gradient
LAYOUTS = ["tensor", "row", "row-tensor"]  # scale_a kind - scale_b kind


def _kernel(device: torch.device):
    if device.type == "cuda" and not fp8_supported(device):
        pytest.skip("the Triton fp8 GEMM needs fp8 tensor cores (sm89+) when compiled")
    with lowmem.backend("triton"):
        return dispatch("fp8_matmul", device)


def _scales(m: int, n: int, layout: str, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    sa = torch.rand((m, 1) if layout != "tensor" else (), generator=gen) * 1e-2 + 1e-3
    sb = torch.rand((1, n) if layout == "row" else (), generator=gen) * 1e-2 + 1e-3
    return sa.to(device), sb.to(device)


def _small_ints(shape, dtype, gen: torch.Generator, device) -> torch.Tensor:
    # |v| <= 8: exact in e4m3 and e5m2; products <= 64 and K <= 130 keep every fp32 partial sum
    # an exactly representable integer, so any summation order gives the same bits.
    return torch.randint(-8, 9, shape, generator=gen).float().to(dtype).to(device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_bit_exact_where_sums_are_exact(m: int, n: int, k: int, layout: str, device: torch.device) -> None:
    # Every (shape, layout) runs all output dtypes; the operand pair rotates with the case so
    # each pair meets each layout across the shapes (the interpreter is slow: ~0.1 s per call).
    case = SHAPES.index((m, n, k)) + LAYOUTS.index(layout)
    a_dtype, b_dtype = PAIRS[case % len(PAIRS)]
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a = _small_ints((m, k), a_dtype, gen, device)
    b = _small_ints((n, k), b_dtype, gen, device).t()  # a weight's (K, N) view, column-major
    sa, sb = _scales(m, n, layout, gen, device)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=torch.bfloat16)
    for i, out_dtype in enumerate(OUT_DTYPES):
        bias_i = bias if (case + i) % 2 else None
        got = _kernel(device)(a, b, sa, sb, bias_i, out_dtype)
        want = fp8_matmul_ref(a, b, sa, sb, bias_i, out_dtype)
        assert got.dtype == out_dtype and got.shape == (m, n)
        if device.type == "cpu":  # interpreter: the same fp32 epilogue, bit for bit
            assert torch.equal(got, want), (a_dtype, b_dtype, out_dtype, bias_i is not None)
        else:  # the GPU compiler may contract the epilogue into an FMA: one rounding apart
            rtol = 2.0**-7 if out_dtype != torch.float32 else 2.0**-20
            torch.testing.assert_close(got, want, rtol=rtol, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("a_dtype", "b_dtype"), PAIRS)
@pytest.mark.parametrize(("m", "n", "k"), [(67, 129, 200)])
def test_gaussian_operands_within_the_fp32_summation_bound(m, n, k, a_dtype, b_dtype, layout, device) -> None:
    """Each fp8 x fp8 product is exact in fp32, so kernel and reference differ only by the order
    of K fp32 additions: |got - ref| <= 2 * K * 2**-24 * (|a| @ |b|) * |sa * sb| (two orders,
    each within the standard bound), plus one rounding of the output dtype (the two fp32 values
    can straddle a rounding boundary of bf16/fp16). On a GPU the fp8 MMA sums each K-tile at
    reduced precision (~14 bits, fp8_matmul_triton's docstring), so the bound there is mag * 2**-9
    (not yet run on hardware)."""
    gen = torch.Generator().manual_seed(k + m)
    x = torch.randn(m, k, generator=gen).to(device)
    w = torch.randn(n, k, generator=gen).to(device)
    rowwise = layout != "tensor"
    a, sa = quantize_fp8(x, a_dtype, 1 if rowwise else None)
    wq, ws = quantize_fp8(w, b_dtype, 1 if layout == "row" else None)
    b, sb = wq.t(), ws.t()
    bias = torch.randn(n, generator=gen).to(device)
    mag = (a.double().abs() @ b.double().abs()) * (sa.double() * sb.double()).abs()
    for out_dtype in OUT_DTYPES:
        got = _kernel(device)(a, b, sa, sb, bias, out_dtype).double()
        want = fp8_matmul_ref(a, b, sa, sb, bias, out_dtype).double()
        eps_out = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[out_dtype]
        sum_err = 2 * k * 2.0**-24 if device.type == "cpu" else 2.0**-9
        bound = sum_err * mag + 2 * eps_out * want.abs() + 1e-30
        assert bool(((got - want).abs() <= bound).all()), f"{out_dtype}: {(got - want).abs().max().item()}"


def test_zero_rows_nan_scales_strides_and_empty_sums(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 70, generator=gen).to(device)
    x[4] = 0.0  # an all-zero token: row scale 0, output exactly the bias
    x[9, 3] = float("nan")  # a NaN token: row scale NaN, output row NaN
    w = torch.randn(30, 70, generator=gen).to(device)
    bias = torch.randn(30, generator=gen).to(device)
    a, sa = quantize_fp8(x, E4M3, 1)
    wq, ws = quantize_fp8(w, E4M3, 1)
    got = _kernel(device)(a, wq.t(), sa, ws.t(), bias, torch.float32)
    assert torch.equal(got[4].cpu(), bias.cpu())
    assert bool(got[9].isnan().all())
    rows = [i for i in range(20) if i != 9]
    assert bool(torch.isfinite(got[rows]).all())
    # Strided operands: a sliced view of a and a row-major (contiguous) b.
    big = _small_ints((40, 90), E4M3, gen, device)
    a_view, b_rm = big[::2, 5:75], _small_ints((70, 33), E4M3, gen, device)
    one = torch.ones((), device=device)
    assert torch.equal(
        _kernel(device)(a_view, b_rm, one, one).cpu(), fp8_matmul_ref(a_view, b_rm, one, one).cpu()
    )
    # K = 0: the empty sum is 0; bias added; a NaN scale still gives NaN, as in the reference.
    a0, b0 = torch.zeros(3, 0, dtype=E4M3, device=device), torch.zeros(0, 4, dtype=E4M3, device=device)
    got0 = _kernel(device)(a0, b0, one, one, bias[:4], torch.bfloat16)
    assert torch.equal(got0.cpu(), fp8_matmul_ref(a0, b0, one, one, bias[:4], torch.bfloat16).cpu())
    nan = torch.full((), float("nan"), device=device)
    assert bool(_kernel(device)(a0, b0, nan, one).isnan().all())
    assert _kernel(device)(a0[:0], b0, one, one).shape == (0, 4)


def test_strided_bias(device: torch.device) -> None:
    """A bias that is a strided view (every other element of a longer vector) is read by its
    elements, not as if it were contiguous."""
    gen = torch.Generator().manual_seed(4)
    a, b = _small_ints((5, 8), E4M3, gen, device), _small_ints((8, 6), E4M3, gen, device)
    bias = torch.randn(12, generator=gen).to(device)[::2]
    one = torch.ones((), device=device)
    got = _kernel(device)(a, b, one, one, bias, torch.float32)
    assert torch.equal(got.cpu(), fp8_matmul_ref(a, b, one, one, bias, torch.float32).cpu())


def test_autotuning_is_keyed_by_the_m_bucket_not_the_exact_m() -> None:
    """Variable token counts (dynamic padding) give a new exact M nearly every step; the GPU
    autotuner (~1 s per new key) must key on M's power-of-two bucket, as fp8_matmul_select does."""
    assert "M" not in fp8_matmul_triton._fp8_matmul_kernel_tuned.keys
    assert "M_BUCKET" in fp8_matmul_triton._fp8_matmul_kernel_tuned.keys


def test_bad_arguments(device: torch.device) -> None:
    a = torch.zeros(4, 8, dtype=E4M3, device=device)
    one = torch.ones((), device=device)
    kernel = _kernel(device)
    with pytest.raises(ValueError, match="fp8"):
        kernel(a.float(), a.t(), one, one)
    with pytest.raises(ValueError, match="need a"):
        kernel(a, a, one, one)
    with pytest.raises(ValueError, match="out_dtype"):
        kernel(a, a.t(), one, one, None, torch.float64)
    with pytest.raises(ValueError, match="scale_b"):
        kernel(a, a.t(), one, torch.ones(4, 1, device=device))


def test_dispatch_auto_and_forced(device: torch.device) -> None:
    """CPU: the reference (the kernel only when forced, under the interpreter); CUDA: the
    measured choice, the Triton kernel when forced."""
    auto = select.fp8_matmul_fastest if device.type == "cuda" else fp8_matmul_ref
    assert dispatch("fp8_matmul", device) is auto
    with lowmem.backend("triton"):
        assert dispatch("fp8_matmul", device).__module__ == "lowmem.kernels.fp8_matmul_triton"


class _FakeBackends:
    """Stand-ins for cuBLASLt and the Triton kernel (both compute the reference) with fixed
    per-call timings, so the selection logic runs on a CPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, scaled_mm_ms: float, triton_ms: float | None) -> None:
        self.calls: list[str] = []
        self.measured = 0
        monkeypatch.setattr(select, "fp8_supported", lambda device: True)
        monkeypatch.setattr(select, "_capturing", lambda: False)
        monkeypatch.setattr(select, "_CHOICE", {})
        monkeypatch.setattr(select, "_MEASURED", {})

        def scaled_mm(*args):
            self.calls.append("scaled_mm")
            return fp8_matmul_ref(*args)

        def triton(*args):
            if triton_ms is None:
                raise RuntimeError("fp8 dot is not supported on this target")
            self.calls.append("triton")
            return fp8_matmul_ref(*args)

        def median_ms(fn):
            self.measured += 1
            fn()
            return {"scaled_mm": scaled_mm_ms, "triton": triton_ms}[self.calls[-1]]

        monkeypatch.setattr(select, "fp8_matmul_scaled_mm", scaled_mm)
        monkeypatch.setattr(select, "_triton_fp8_matmul", lambda: triton)
        monkeypatch.setattr(select, "_median_ms", median_ms)


def _problem(m: int, n: int, k: int):
    gen = torch.Generator().manual_seed(m + n + k)
    a = _small_ints((m, k), E4M3, gen, "cpu")
    b = _small_ints((k, n), E4M3, gen, "cpu")
    return a, b, torch.ones(()), torch.ones(())


def test_select_measures_once_per_bucket_and_uses_the_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeBackends(monkeypatch, scaled_mm_ms=2.0, triton_ms=1.0)
    a, b, sa, sb = _problem(100, 48, 64)
    out = select.fp8_matmul_fastest(a, b, sa, sb)
    assert torch.equal(out, fp8_matmul_ref(a, b, sa, sb))
    assert fake.measured == 2 and fake.calls[-1] == "triton"
    fake.calls.clear()
    select.fp8_matmul_fastest(*_problem(120, 40, 60))  # same power-of-two bucket: no new measurement
    assert fake.measured == 2 and fake.calls == ["triton"]
    select.fp8_matmul_fastest(*_problem(300, 48, 64))  # another bucket of M: measured again
    assert fake.measured == 4
    (choice,) = [v for key, v in select.fp8_matmul_choices().items() if key[7] == 128]
    assert choice == {"choice": "triton", "scaled_mm_ms": 2.0, "triton_ms": 1.0}


@pytest.mark.parametrize(("triton_ms", "reason"), [(2.0, "tie"), (None, "triton fails")])
def test_select_prefers_scaled_mm_on_ties_and_failures(monkeypatch, triton_ms, reason: str) -> None:
    fake = _FakeBackends(monkeypatch, scaled_mm_ms=2.0, triton_ms=triton_ms)
    select.fp8_matmul_fastest(*_problem(16, 16, 16))
    assert fake.calls[-1] == "scaled_mm", reason
    (entry,) = select.fp8_matmul_choices().values()
    assert entry["choice"] == "scaled_mm"
    if triton_ms is None:
        assert "not supported" in entry["triton_error"]


def test_select_forced_cuda_and_graph_capture_skip_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeBackends(monkeypatch, scaled_mm_ms=2.0, triton_ms=1.0)
    with lowmem.backend("cuda"):  # "cuda" = the vendor library, never measured
        select.fp8_matmul_fastest(*_problem(16, 16, 16))
    monkeypatch.setattr(select, "_capturing", lambda: True)
    select.fp8_matmul_fastest(*_problem(16, 16, 16))  # no timing inside a CUDA graph capture
    assert fake.calls == ["scaled_mm", "scaled_mm"] and fake.measured == 0
    assert select.fp8_matmul_choices() == {}


def test_select_without_fp8_tensor_cores_is_the_reference() -> None:
    a, b, sa, sb = _problem(5, 7, 9)
    assert torch.equal(select.fp8_matmul_fastest(a, b, sa, sb), fp8_matmul_ref(a, b, sa, sb))


def test_select_key_includes_the_operand_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's dX GEMM (b = W, not K-major: copied first) and a K-major GEMM of the same
    sizes cost differently, so they are measured apart."""
    fake = _FakeBackends(monkeypatch, scaled_mm_ms=2.0, triton_ms=1.0)
    a, b, sa, sb = _problem(100, 48, 64)  # b (K, N) row-major: not K-major
    select.fp8_matmul_fastest(a, b, sa, sb)
    select.fp8_matmul_fastest(a, b.t().contiguous().t(), sa, sb)  # the same sizes, b K-major
    assert fake.measured == 4
    assert sorted(key[-2:] for key in select.fp8_matmul_choices()) == [(True, False), (True, True)]


def test_select_under_graph_capture_runs_triton_only_if_already_autotuned(monkeypatch) -> None:
    """A bucket that chose Triton, called during CUDA-graph capture with a key the autotuner has
    not seen (it would benchmark and synchronize inside the capture): cuBLASLt instead."""
    fake = _FakeBackends(monkeypatch, scaled_mm_ms=2.0, triton_ms=1.0)
    problem = _problem(16, 16, 16)
    select.fp8_matmul_fastest(*problem)  # eager: measured, Triton chosen
    fake.calls.clear()
    asked: list[tuple] = []
    tuned = {"value": False}

    def autotuned(*args):
        asked.append(args)
        return tuned["value"]

    monkeypatch.setattr(select, "_capturing", lambda: True)
    monkeypatch.setattr(select, "_triton_autotuned", autotuned)
    select.fp8_matmul_fastest(*problem)
    tuned["value"] = True
    select.fp8_matmul_fastest(*problem)
    assert fake.calls == ["scaled_mm", "triton"] and fake.measured == 2
    assert len(asked) == 2 and asked[0][0] is problem[0]


def test_autotuned_rebuilds_the_autotuners_own_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """``autotuned`` must build exactly the key Triton's ``Autotuner.run`` caches. A real
    autotuner over the kernel (two configs, pruned to one so nothing is benchmarked on this CPU)
    runs the GPU launch path once under the interpreter; afterwards ``autotuned`` says yes for
    that problem and for another M in its bucket, no for another N, scale kind or output dtype."""
    cfg = dict(fp8_matmul_triton._INTERPRETER_CONFIG)
    configs = [
        triton.Config(cfg, num_warps=4, num_stages=1),
        triton.Config({**cfg, "GROUP_M": 4}, num_warps=4),
    ]
    tuner = triton.autotune(
        configs=configs,
        key=fp8_matmul_triton._TUNE_KEY,
        prune_configs_by={"early_config_prune": lambda configs, nargs, **kw: configs[:1]},
    )(fp8_matmul_triton._fp8_matmul_kernel)
    monkeypatch.setattr(fp8_matmul_triton, "_fp8_matmul_kernel_tuned", tuner)
    monkeypatch.setattr(fp8_matmul_triton, "interpreting", lambda: False)  # take the GPU launch path
    gen = torch.Generator().manual_seed(5)
    a, b = _small_ints((20, 24), E4M3, gen, "cpu"), _small_ints((24, 9), E5M2, gen, "cpu")
    sa, sb = torch.ones(20, 1), torch.ones(())
    bias = torch.randn(9, generator=gen).to(torch.bfloat16)
    args = (a, b, sa, sb, bias, torch.float32)  # fp32 out: exact without the interpreter's RTNE fix
    assert not fp8_matmul_triton.autotuned(*args)
    got = fp8_matmul_triton.fp8_matmul(*args)
    assert len(tuner.cache) == 1
    assert torch.equal(got, fp8_matmul_ref(*args))  # small integers: exact
    assert fp8_matmul_triton.autotuned(*args)
    assert fp8_matmul_triton.autotuned(a[:17], b, sa[:17], sb, bias)  # M 17..32: one bucket
    assert not fp8_matmul_triton.autotuned(a, b[:, :8], sa, sb, bias)
    assert not fp8_matmul_triton.autotuned(a, b, torch.ones(()), sb, bias)
    assert not fp8_matmul_triton.autotuned(a, b, sa, sb, bias, torch.bfloat16)
    assert not fp8_matmul_triton.autotuned(a, b, sa, sb, None)


def test_measurement_runs_on_the_operands_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA events and synchronize() act on the current device: the measurement runs inside
    ``on_device`` of ``a``, so tensors on cuda:1 are timed on cuda:1."""
    fake = _FakeBackends(monkeypatch, scaled_mm_ms=2.0, triton_ms=1.0)
    inside: list[torch.device] = []
    measured_inside: list[bool] = []

    @contextlib.contextmanager
    def on_device(t):
        inside.append(t.device)
        yield
        inside.append(None)

    def median_ms(fn):
        measured_inside.append(bool(inside) and inside[-1] is not None)
        fn()
        return {"scaled_mm": 2.0, "triton": 1.0}[fake.calls[-1]]

    monkeypatch.setattr(select, "on_device", on_device)
    monkeypatch.setattr(select, "_median_ms", median_ms)
    a, b, sa, sb = _problem(8, 8, 8)
    select.fp8_matmul_fastest(a, b, sa, sb)
    assert inside == [a.device, None] and measured_inside == [True, True]


def test_measurement_is_eager_under_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo does not trace the measurement (CUDA events, synchronize, the dict of choices):
    ``_measure`` is ``torch.compiler.disable``-d, so a compiled caller runs it eagerly, once per
    bucket, and gets the reference's result."""
    assert getattr(select._measure, "_torchdynamo_disable", False)
    fake = _FakeBackends(monkeypatch, scaled_mm_ms=2.0, triton_ms=1.0)
    torch._dynamo.reset()
    compiled = torch.compile(select.fp8_matmul_fastest, backend="eager")
    a, b, sa, sb = _problem(12, 8, 8)
    for _ in range(2):
        assert torch.equal(compiled(a, b, sa, sb), fp8_matmul_ref(a, b, sa, sb))
    assert fake.measured == 2 and fake.calls[-1] == "triton"
    torch._dynamo.reset()


def test_forced_triton_below_sm89_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LOWMEM_BACKEND=triton`` on an sm80 GPU reaches the Triton GEMM, which cannot compile an
    fp8 dot there: a ValueError naming sm89+ and the reference, not Triton's compile error."""
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(fp8_matmul_triton, "fp8_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"sm89\+.*sm80.*fp8_matmul_ref"):
        fp8_matmul_triton._require_fp8_tensor_cores(cuda0)
    fp8_matmul_triton._require_fp8_tensor_cores(torch.device("cpu"))  # the interpreter: allowed
    monkeypatch.setattr(fp8_matmul_triton, "fp8_supported", lambda device: True)
    fp8_matmul_triton._require_fp8_tensor_cores(cuda0)  # sm89+: allowed
    # The launcher checks the operands' device before anything else.
    checked: list[torch.device] = []
    monkeypatch.setattr(fp8_matmul_triton, "_require_fp8_tensor_cores", checked.append)
    a, b, sa, sb = _problem(3, 4, 5)
    fp8_matmul_triton.fp8_matmul(a, b, sa, sb)
    assert checked == [a.device]
