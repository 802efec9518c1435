"""Oracles shared by the tests: central finite differences and random arrays."""
from __future__ import annotations

import numpy as np


def random_arrays(program_leaves, n=5, seed=0, scale=1.0):
    """Random float64 arrays for every Input/Param leaf (inputs get ``n`` rows)."""
    from symdl.graph.nodes import Input

    rng = np.random.default_rng(seed)
    out = {}
    for leaf in program_leaves:
        shape = (n, int(leaf.shape[1])) if isinstance(leaf, Input) else leaf.value_shape
        out[str(leaf.name)] = rng.normal(scale=scale, size=shape)
    return out


def finite_difference(f, arrays, name, h=1e-6):
    """Central differences of ``f(**arrays)[0]`` with respect to ``arrays[name]``."""
    base = {k: np.array(v, dtype=np.float64) for k, v in arrays.items()}
    x = base[name]
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        up = f(**base)[0]
        x[idx] = old - h
        down = f(**base)[0]
        x[idx] = old
        g[idx] = (up - down) / (2 * h)
    return g


def assert_close(actual, expected, rtol, atol=0.0, what=""):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    assert err <= rtol * scale + atol, f"{what}: max abs error {err:.3e} (scale {scale:.3e}, rtol {rtol})"


def run_threaded(runner, count: int, monkeypatch) -> None:
    """Make a CPU ``runner``'s steps run on ``count`` threads (``cpu.runtime.Pool``), every kernel
    with more than one unit split across them whatever its work; ``count`` 1: one thread, serial."""
    from symdl.backends import threads
    from symdl.backends.cpu import backend

    monkeypatch.setattr(backend, "SPLIT_MIN_WORK", 0)
    monkeypatch.setattr(threads, "get_num_threads", lambda: count)
    runner.uses_parallel = lambda n: count > 1
    runner._ready.clear()


def assert_backend_matches_numpy(loss, params, arrays, backend, dtype="float64", tol=1e-10, threads=(None,),
                                 monkeypatch=None):
    """``sd.value_and_grad`` of ``loss`` on ``backend`` equals the NumPy reference's (value and every
    gradient within ``tol``); for the CPU backend on each count of ``threads`` (``run_threaded``)."""
    import os

    import pytest

    import symdl as sd

    want_v, want = sd.value_and_grad(loss, params, backend="numpy", dtype=dtype)(**arrays)
    for count in threads:
        f = sd.value_and_grad(loss, params, backend=backend, dtype=dtype)
        if count is not None and os.environ.get("NUMBA_DISABLE_JIT") != "1":
            run_threaded(f.runner, count, monkeypatch)
        value, grads = f(**arrays)
        where = f"{backend}" + (f" on {count} thread(s)" if count is not None else "")
        assert value == pytest.approx(want_v, rel=tol, abs=tol), where
        for k in want:
            assert_close(grads[k], want[k], tol, what=f"{k}, {where}")


def recurrent_layer_loss(layer, T: int, F: int):
    """``(loss, params, x, y)``: a recurrent ``layer`` on sequences ``x`` ``(n, T, F)``, its output
    (the last step, or every step with ``return_sequences``) against targets ``y`` (mse)."""
    import symdl as sd
    from symdl.graph.nodes import sequence_input

    x = sequence_input("x", (T, F))
    built = layer.build_both(1, x, x)
    out = built.train
    width = int(out.shape[1])
    y = sequence_input("y", (T, width)) if out.shape[0] != sd.n else sd.input("y", width)
    return sd.losses.mse(out, y), built.params, x, y
