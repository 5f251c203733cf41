"""Every Triton kernel against its torch reference: compiled on a GPU, else on the CPU in Triton's interpreter
(TRITON_INTERPRET=1, set in conftest.py)."""
import math

import pytest
import torch

from course_lib import kernels as K

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(1, 2), (3, 1, 8, 8), (5, 3, 7, 5), (2, 4, 33, 33)]  # batch 1; 105 and 8,712 elements per sample
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output the kernels allocate starts as NaN, so an element a kernel forgets to write fails the test."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))


def _close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.isfinite(got).all(), "an output element was never written"
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target", K.TARGETS)
def test_q_sample_kernel_matches_reference(shape, dtype, target):
    g = torch.Generator().manual_seed(0)
    ab = torch.linspace(0.9999, 0.001, 100, dtype=torch.float64)
    x0, eps = torch.randn(shape, generator=g).to(DEVICE, dtype), torch.randn(shape, generator=g).to(DEVICE, dtype)
    t = torch.randint(0, 100, (shape[0],), generator=g).to(DEVICE)
    want = K.q_sample(x0, eps, t, ab.sqrt(), (1 - ab).sqrt(), target, impl="torch")
    got = K.q_sample(x0, eps, t, ab.sqrt(), (1 - ab).sqrt(), target, impl="triton")
    _close(got[0], want[0], dtype)
    if target is not None:
        _close(got[1], want[1], dtype)


def test_q_sample_reference_is_the_closed_form_and_non_contiguous_input_is_handled():
    g = torch.Generator().manual_seed(1)
    ab = torch.rand(50, generator=g, dtype=torch.float64)
    x0 = torch.randn(4, 6, 3, generator=g).transpose(1, 2).to(DEVICE)  # not contiguous
    eps = torch.randn(4, 3, 6, generator=g).to(DEVICE)
    t = torch.tensor([0, 49, 7, 7], device=DEVICE)
    x_t, v = K.q_sample(x0, eps, t, ab.sqrt(), (1 - ab).sqrt(), "v", impl="triton")
    a = ab[t.cpu()].sqrt().float().view(-1, 1, 1).to(DEVICE)
    s = (1 - ab[t.cpu()]).sqrt().float().view(-1, 1, 1).to(DEVICE)
    torch.testing.assert_close(x_t, a * x0 + s * eps)
    torch.testing.assert_close(v, a * eps - s * x0)
    with pytest.raises(ValueError, match="t must be in"):
        K.q_sample(x0, eps, torch.tensor([0, 50, 1, 1], device=DEVICE), ab.sqrt(), (1 - ab).sqrt())
    with pytest.raises(ValueError, match="one integer step per sample"):
        K.q_sample(x0, eps, torch.tensor([0, 1], device=DEVICE), ab.sqrt(), (1 - ab).sqrt())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("terms", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 1023, 1025, 5000])
def test_lincomb_kernel(terms, n, dtype):
    g = torch.Generator().manual_seed(n + terms)
    ts = [torch.randn(n, generator=g).to(DEVICE, dtype) for _ in range(terms)]
    coefs = torch.randn(terms, generator=g).tolist()
    _close(K.lincomb(coefs, ts, impl="triton"), K.lincomb_reference(coefs, ts), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sampler_steps_triton_vs_reference(shape, dtype):
    g = torch.Generator().manual_seed(2)
    x, d, xe, dn, old = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(5))
    s, s_next, s_prev = 3.0, 1.7, 5.5
    cases = [(K.euler_step, (x, d, s, s_next)), (K.ddim_step, (x, d, s, s_next)),
             (K.heun_correct, (x, d, xe, dn, s, s_next)), (K.heun_correct_linear, (x, d, xe, dn, s, s_next)),
             (K.dpmpp_2m_step, (x, d, old, s, s_next, s_prev)),
             (K.dpmpp_2m_step, (x, d, None, s, s_next, None))]
    for fn, args in cases:
        _close(fn(*args, impl="triton"), fn(*args, impl="torch"), dtype)


def test_euler_and_ddim_are_the_same_update():
    g = torch.Generator().manual_seed(3)
    x, d = torch.randn(2, 1000, generator=g, dtype=torch.float64), torch.randn(2, 1000, generator=g, dtype=torch.float64)
    torch.testing.assert_close(K.euler_step(x.float(), d.float(), 2.0, 0.5), K.ddim_step(x.float(), d.float(), 2.0, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, groups, affine", [((1, 32, 8, 8), 8, True), ((3, 16, 5, 7), 4, False),
                                                   ((2, 12, 33, 33), 3, True), ((4, 6), 2, True)])
def test_group_norm_silu_kernel(shape, groups, affine, dtype):
    g = torch.Generator().manual_seed(4)
    norm = torch.nn.GroupNorm(groups, shape[1], affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(generator=g)
            norm.bias.normal_(generator=g)
    norm = norm.to(DEVICE, dtype)
    x = (3 * torch.randn(shape, generator=g) + 1).to(DEVICE, dtype)
    with torch.no_grad():
        _close(K.group_norm_silu(x, norm, impl="triton"), K.group_norm_silu_reference(x, norm), dtype)


def test_dispatch_uses_the_reference_on_cpu_or_with_gradients(monkeypatch):
    monkeypatch.setattr(K, "_tk", lambda: pytest.fail("the Triton kernel was launched"))
    x = torch.randn(3, 4)
    assert not K.use_triton("auto", x)
    K.euler_step(x, x, 1.0, 0.5)
    K.group_norm_silu(x, torch.nn.GroupNorm(2, 4))  # weights require grad: the reference
    assert not K.use_triton("auto", x.requires_grad_())
    assert not K.use_triton("torch", x)
    with pytest.raises(ValueError, match="impl must be"):
        K.use_triton("cuda", x)


def test_bad_inputs_get_clear_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="must match"):
        K.lincomb((1, 2), (x, torch.randn(4, 3)))
    with pytest.raises(TypeError, match="floating-point"):
        K.lincomb((1, 2), (x.long(), x.long()))
    with pytest.raises(TypeError, match="float32, bfloat16"):
        K.lincomb((1, 2), (x.double(), x.double()), impl="triton")
    with pytest.raises(ValueError, match="2 to 4"):
        K.lincomb((1,), (x,))
    with pytest.raises(ValueError, match="target"):
        K.q_sample(x, x, torch.zeros(3, dtype=torch.long), torch.ones(5), torch.zeros(5), target="score")
    with pytest.raises(TypeError, match="GroupNorm"):
        K.group_norm_silu(x, torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="sigma_next"):
        K.dpmpp_2m_step(x, x, None, 1.0, 0.0, None)
    assert math.isfinite(float(K.ddim_step(x, x, 1.0, 1e-3).sum()))


def test_bench_kernels_records_and_correctness_part(tmp_path):
    from course_lib.bench import kernels as B

    checked = B.check_kernels(DEVICE)
    assert {r["op"] for r in checked} == {"q_sample_v", "ddim_step", "heun_correct", "dpmpp_2m_step", "group_norm_silu"}
    assert all(r["max_error"] < 1e-4 for r in checked), checked
    timed = B.bench_ops(torch.device("cpu"), (1,), ["eager"], progress=lambda s: None)
    assert all(set(r) == set(B.RECORD_KEYS) for r in timed)
    copy = next(r for r in timed if r["op"] == "copy" and r["size"] == 1 << 20)
    for r in timed:
        if r["op"] != "copy":
            assert r["ms"] > 0 and r["gbps"] > 0 and r["max_error"] == 0
            assert r["fraction_of_copy_bw"] == pytest.approx(r["gbps"] / copy["gbps"])
    (tmp_path / "k.json").write_text("[]")
    with pytest.raises(ValueError, match="--force"):
        B.main_kernels(tmp_path / "k.json", quick=True)


def test_reaches_is_the_size_from_which_a_kernel_stays_above_the_fraction():
    from course_lib.bench import kernels as B

    def rec(mb, frac, impl="triton"):
        return {"op": "ddim_step", "impl": impl, "size": mb << 20, "ms": 1.0, "fraction_of_copy_bw": frac}

    rows = [rec(1, 0.5), rec(4, 0.9), rec(16, 0.7), rec(64, 0.85), rec(256, 0.95), rec(256, 0.1, "eager")]
    assert B.reaches(rows, "ddim_step", "triton", 0.8) == 64  # the dip at 16 MB counts, the 4 MB peak does not
    assert B.reaches(rows, "ddim_step", "triton", 0.99) is None
    assert B.reaches(rows, "ddim_step", "eager", 0.05) == 256
    lines = B.summary_lines([{**r, "gbps": 1.0, "samples_per_s": None} for r in rows])
    assert "ddim_step: triton at 80% of copy or more from 64 MB up" in lines


def test_the_shipped_runs_name_their_machine_and_software():
    import json
    from pathlib import Path

    from course_lib.bench import kernels as B

    data = Path(__file__).resolve().parents[1] / "data"
    for name, device in (("bench_kernels.json", "cpu"), ("bench_kernels_gpu.json", "cuda")):
        records = json.loads((data / name).read_text())
        assert {r["device"] for r in records} == {device} and len({r["machine"] for r in records}) == 1
        software = records[0]["software"]
        assert software["torch"] and all(r["software"] == software for r in records)
        if device == "cuda":  # the GPU run: Triton timed, and the versions that made it named
            assert software["cuda"] and software["driver"] and software["triton"]
            assert {r["impl"] for r in records if r["ms"] is not None} >= {"eager", "compile", "triton"}
            assert any(r["impl"] == "graph" and r["samples_per_s"] for r in records)
    assert B.software_versions(torch.device("cpu"))["torch"] == torch.__version__
