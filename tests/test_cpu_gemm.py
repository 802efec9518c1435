"""The prebuilt matrix-product kernel (``backends.cpu_gemm``): every orientation, ``alpha``,
the loop and BLAS paths, both dtypes, one buffer read twice, NaN and Inf, on one thread and
split by rows across threads (``cpu_runtime.Pool``), against NumPy."""
import itertools

import numpy as np
import pytest

import symdl as sd
from symdl.backends.cpu import gemm as cpu_gemm, runtime as cpu_runtime
from symdl.backends.formulas import float_bits, formula


THREADS = [1, 2, 3]  # 3 on a 2-core machine too: the barrier yields, nothing hangs


def gemm_row(dtype, out, a, b, trans_a, trans_b, alpha):
    """A step table of one product, split across the threads (units: its output's rows)."""
    kernel = getattr(cpu_gemm, f"gemm_{np.dtype(dtype).name}")
    row = [kernel.address, out.shape[0], 1]
    for array in (out, a, b):
        row += [array.ctypes.data, *array.shape]
    return np.array([row + [int(trans_a), int(trans_b), float_bits(alpha)]], np.int64)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("m,n,k", [(3, 4, 5), (1, 7, 1), (33, 40, 21)])  # loops; loops; BLAS
def test_every_orientation_and_alpha_matches_numpy(dtype, m, n, k, threads):
    rng = np.random.default_rng(0)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for trans_a, trans_b, alpha in itertools.product((False, True), (False, True), (1.0, -0.25)):
        a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
        out = np.full((m, n), 7.0, dtype)  # overwritten, never accumulated into
        cpu_runtime.run(gemm_row(dtype, out, a, b, trans_a, trans_b, alpha), threads)
        expected = alpha * ((a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b))
        np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * k,
                                   err_msg=f"trans_a={trans_a} trans_b={trans_b} alpha={alpha}")
    assert (m * n * k >= cpu_gemm.SMALL_GEMM) == (m == 33)  # both paths are covered


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("size", [4, 30])  # loops, BLAS
def test_one_buffer_read_twice_and_non_finite_values(size, threads):
    """``x.T @ x`` reads one buffer as both operands; NaN and Inf reach the output as in NumPy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(size + 1, size))
    x[0, 0], x[1, 1] = np.nan, np.inf
    out = np.zeros((size, size))
    cpu_runtime.run(gemm_row("float64", out, x, x, True, False, 1.0), threads)
    with np.errstate(invalid="ignore"):
        expected = x.T @ x
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(out[finite], expected[finite], rtol=1e-12)
    np.testing.assert_array_equal(out[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)])


def test_every_product_is_one_formula():
    """Orientation and alpha are constants of a use: every product of a training step shares one formula."""
    x = sd.input("x", 3); y = sd.input("y", 2); W1 = sd.param("W1", (3, 4)); W2 = sd.param("W2", (4, 2))
    program = sd.pipeline.gradient_program(sd.losses.mse(sd.tanh(x @ W1) @ W2, y), [W1, W2])[0]
    uses = [formula(k, program) for k in program.kernels if k.kind == "gemm"]
    assert len({str(u.program) for u in uses}) == 1
    assert len({tuple(u.constants[:2]) for u in uses}) >= 3  # x @ W, x.T @ δ, δ @ W.T


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpys_blas_and_scipys_blas_routes_both_match_numpy(dtype, monkeypatch):
    """The product kernel calls NumPy's ``cblas_?gemm`` where NumPy's build exports it, else
    SciPy's through Numba's ``numba_xxgemm``: both printed routes compile and agree with NumPy."""
    if cpu_gemm.numpy_blas(dtype) is None:
        pytest.skip("this NumPy build exports no 64-bit-integer cblas_?gemm")
    texts = {"numpy": cpu_gemm.gemm_ir(dtype)}
    monkeypatch.setattr(cpu_gemm, "numpy_blas", lambda dtype: None)
    texts["scipy"] = cpu_gemm.gemm_ir(dtype)
    assert "symdl_cblas_" in texts["numpy"] and "numba_xxgemm" not in texts["numpy"]
    assert "numba_xxgemm" in texts["scipy"] and "symdl_cblas_" not in texts["scipy"]
    rng = np.random.default_rng(2)
    m, n, k = 40, 33, 21
    tol = 1e-5 if dtype == "float32" else 1e-12
    for route, text in texts.items():
        name = f"symdl_gemm_{dtype}"
        kernel = cpu_runtime.Kernel(getattr(cpu_gemm, f"gemm_{dtype}").py_func, cpu_runtime.SIGNATURE,
                                    llvm=text.replace(name, f"{name}_{route}_route"))
        assert kernel.address
        for trans_a, trans_b in itertools.product((False, True), (False, True)):
            a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
            b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
            out = np.full((m, n), 7.0, dtype)
            row = gemm_row(dtype, out, a, b, trans_a, trans_b, -0.5)
            row[0, 0] = kernel.address
            cpu_runtime.run(row, 2)
            expected = -0.5 * ((a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b))
            np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * k, err_msg=f"{route} {trans_a} {trans_b}")
