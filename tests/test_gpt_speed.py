"""What the GPT step's speed-ups (issue 27) must not change: values, special values, thread counts.

* float32 ``exp`` in LLVM loops never computes a subnormal (0 below ln(FLT_MIN)), so a causal
  softmax's masked scores cost no more than the others;
* a row's log-sum-exp takes its maximum with ``maxnum`` and (float32) sums its exps in float32 lanes
  block by block: NaN, ±inf and masked rows as NumPy gives them, in float32 and float64, on one and
  two threads;
* the softmax's backward reads the forward ``P`` instead of computing ``exp`` again;
* ``ColumnCopy`` copies each row's slice with ``llvm.memcpy`` and zeroes only the other columns;
* the work estimate weighs function calls, so a softmax's loops split across the step's threads.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import sympy as sp

import symdl as sd
from helpers import assert_backend_matches_numpy, assert_close


def _numpy_and_cpu(prog, arrays, n, dtype, threads, monkeypatch):
    from symdl.backends import get
    from helpers import run_threaded

    with np.errstate(all="ignore"):
        want = get("numpy").compile_program(prog, "float64").run(
            {k: np.asarray(v, np.float64) for k, v in arrays.items()}, {}, n)
    runner = get("cpu").compile_program(prog, dtype)
    run_threaded(runner, threads, monkeypatch)
    got = runner.run({k: np.asarray(v, dtype) for k, v in arrays.items()}, {}, n)
    return {k: np.array(v, np.float64) for k, v in want.items()}, {k: np.array(v, np.float64) for k, v in got.items()}


def test_float32_exp_is_zero_below_the_normal_range_never_subnormal():
    """Below ln(FLT_MIN) = -87.34 the float32 loop's exp is exactly 0 (float32's own is subnormal
    there); above it, within 1.2e-7 relative of float64's."""
    from symdl.backends import get
    from symdl.graph.nodes import elementwise
    from symdl.ir.lowering import lower

    x = sd.input("x", 1)
    prog = lower({"y": elementwise(sp.exp, x, op="exp")})
    grid = np.concatenate([np.linspace(-120, -80, 4001), [-1e9, -87.3365, -87.3, 0.0, np.nan, -np.inf]])
    got = get("cpu").compile_program(prog, "float32").run({"x": grid.reshape(-1, 1).astype(np.float32)}, {},
                                                           len(grid))["y"].ravel().astype(np.float64)
    with np.errstate(all="ignore"):
        want = np.exp(grid.astype(np.float32).astype(np.float64))
    tiny = np.finfo(np.float32).tiny
    assert not np.any((got != 0) & (np.abs(got) < tiny)), "a subnormal result"
    normal = want >= 1.000001 * tiny
    assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 1.2e-7
    assert np.all(got[~normal & ~np.isnan(want)] <= tiny * 1.000001)
    assert np.isnan(got[np.isnan(grid)]).all() and got[grid == -np.inf][0] == 0.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_logsumexp_special_rows_match_numpy(dtype, threads, monkeypatch):
    """Rows with a NaN, +inf, -inf, every entry -inf, masked entries (-1e9) and ordinary ones: the
    LLVM loop's log-sum-exp (its max in vector lanes) is NumPy's, NaN and inf where NumPy has them."""
    from symdl.graph.nodes import RowLogSumExp
    from symdl.ir.lowering import lower

    x = sd.input("x", 150)  # not a multiple of the vector width, nor of llvm_code.LSE_BLOCK
    prog = lower({"l": RowLogSumExp(x)})
    rng = np.random.default_rng(3)
    X = rng.normal(size=(9, 150)) * 4
    X[0, 5] = np.nan
    X[1, 7] = np.inf
    X[2, 3] = -np.inf
    X[3, :] = -np.inf
    X[4, 20:] = -1e9
    X[7, 130] = np.nan  # in the last block
    X[5, :] = -1e9
    X[6, :] = 80.0
    want, got = _numpy_and_cpu(prog, {"x": X}, 9, dtype, threads, monkeypatch)
    assert np.array_equal(np.isnan(got["l"]), np.isnan(want["l"]))
    finite = np.isfinite(want["l"])
    assert np.array_equal(got["l"][~finite & ~np.isnan(want["l"])], want["l"][~finite & ~np.isnan(want["l"])])
    assert_close(got["l"][finite], want["l"][finite], 1e-6 if dtype == "float32" else 1e-13, what="logsumexp")


def test_softmax_backward_reads_the_forward_probabilities():
    """Attention's δS = P ⊙ (δP − rowsum(P ⊙ δP)) reads P's buffer: the only ``exp`` loops of the step
    are the forward softmaxes (and the loss's), none in the backward."""
    from symdl.graph.nodes import sequence_input
    from symdl.ir.kernels import Elementwise
    from symdl.ops.attention import causal, mix, scores
    from symdl.run.pipeline import gradient_program

    x = sequence_input("x", (4, 3))
    Wq, Wk = sd.param("Wq", (3, 2)), sd.param("Wk", (3, 2))
    P = sd.softmax(causal(scores(x @ Wq, x @ Wk, 4), 4))
    loss = sd.total(mix(P, x, 4))
    prog, _ = gradient_program(loss, [Wq, Wk])
    exps = [k for k in prog.kernels if isinstance(k, Elementwise) and k.body.has(sp.exp)]
    assert len(exps) == 1, [str(k) for k in exps]  # P itself
    P_buffer = exps[0].out
    backward = [k for k in prog.kernels if isinstance(k, Elementwise) and P_buffer in {o.buffer for o in k.operands}
                and k is not exps[0]]
    assert backward, "the backward reads P"


def test_softmax_gradient_still_agrees_with_finite_differences():
    """A softmax not in the forward graph (log_softmax's cross-entropy) and one that is (attention's
    P) both differentiate as before: float64 gradients against central differences."""
    from helpers import finite_difference
    from symdl.graph.nodes import sequence_input
    from symdl.ops.attention import causal, mix, scores

    x = sequence_input("x", (3, 2))
    W = sd.param("W", (2, 2))
    y = sd.input("y", 2)
    P = sd.softmax(causal(scores(x @ W, x, 3), 3))
    loss = sd.total(sd.tanh(mix(P, x, 3))) + sd.losses.softmax_cross_entropy(x @ W, sd.softmax(x))
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(2, 3, 2)), "W": rng.normal(size=(2, 2))}
    f = sd.value_and_grad(loss, [W], backend="numpy", dtype="float64")
    _, g = f(**arrays)
    num = finite_difference(f, arrays, "W")
    assert_close(g["W"], num, 1e-6, what="dL/dW")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("threads", [1, 2])
def test_column_copies_match_numpy(dtype, threads, monkeypatch):
    """A head's slice (``cols``), its placement (``place``) in the middle and at either edge, and a
    concat of four: the LLVM rows (memcpy, then the other columns zeroed) equal NumPy's, NaN kept."""
    from symdl.ir.lowering import lower
    from symdl.ops.concat import Cols, Place, concat

    x = sd.input("x", 12)
    a, b = Cols(x, 4, 7), Cols(x, 0, 12)
    prog = lower({"a": a, "b": b, "mid": Place(a, 5, 11), "left": Place(a, 0, 9), "right": Place(a, 6, 9),
                  "cat": concat(Cols(x, 0, 2), Cols(x, 9, 12), a, Cols(x, 2, 3))})
    X = np.random.default_rng(1).normal(size=(5, 12))
    X[2, 5], X[3, 0] = np.nan, np.inf
    want, got = _numpy_and_cpu(prog, {"x": X}, 5, dtype, threads, monkeypatch)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k].astype(dtype).astype(np.float64), err_msg=k)


def test_work_counts_function_calls_so_a_softmax_splits():
    """``Program.work`` counts ``exp`` as ``FUNCTION_OPS`` operations (a compare or a ``Piecewise`` as
    one), and a log-sum-exp as its two passes and an ``exp`` per entry: a 768x64 softmax's loops
    reach ``SPLIT_MIN_WORK``."""
    from symdl.backends.cpu.backend import SPLIT_MIN_WORK
    from symdl.graph.nodes import RowLogSumExp, VARS, elementwise
    from symdl.ir.kernels import FUNCTION_OPS, operation_count
    from symdl.ir.lowering import lower

    v = VARS
    assert operation_count((sp.exp(v[0] - v[1]),)) == FUNCTION_OPS + 1
    assert operation_count((sp.Piecewise((v[0], v[0] > 0), (0, True)),)) < FUNCTION_OPS
    x = sd.input("x", 64)
    prog = lower({"l": RowLogSumExp(x), "p": sd.softmax(x)})
    works = [prog.work(k, 768) for k in prog.kernels]
    assert all(w >= SPLIT_MIN_WORK for w in works), works


@pytest.mark.cudasim
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
def test_column_copy_and_logsumexp_on_the_cuda_simulator():
    """The CUDA backend (simulator) agrees with NumPy on a loss through column copies and a masked
    log-sum-exp, value and gradient."""
    assert_backend_matches_numpy(*_masked_loss(), "cuda")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_masked_loss_on_cpu_threads_matches_numpy(dtype, monkeypatch):
    loss, params, arrays = _masked_loss()
    assert_backend_matches_numpy(loss, params, arrays, "cpu", dtype=dtype, tol=1e-5 if dtype == "float32" else 1e-10,
                                 threads=(1, 2), monkeypatch=monkeypatch)


def _masked_loss():
    from symdl.graph.nodes import RowLogSumExp
    from symdl.ops.concat import Cols, Place

    x, m = sd.input("x", 6), sd.input("m", 6)
    W = sd.param("W", (6, 6))
    h = x @ W
    loss = sd.total(RowLogSumExp(h + m)) + sd.sum_squares(Place(Cols(h, 1, 4), 2, 7))
    rng = np.random.default_rng(2)
    M = np.where(rng.random((4, 6)) < 0.4, -1e9, 0.0)
    return loss, [W], {"x": rng.normal(size=(4, 6)), "m": M, "W": rng.normal(size=(6, 6))}
