"""The CUDA backend under Numba's simulator: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim``.

Small shapes, including shapes that are not multiples of the tile sizes (the
simulator's GEMM tile is 8 x 8 with 4-wide slices; its reductions use 4- and 8-thread
blocks), so every boundary branch of every kernel runs.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import symdl as sd
from helpers import assert_close
from test_cpu_backend import OPTIMIZERS, every_construct_loss, small_regression
from test_gradients import build_mlp, mlp_arrays

pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1"),
]


def compare(loss, params, arrays, dtype="float64", tol=1e-10):
    ref_v, ref_g = sd.value_and_grad(loss, params, backend="numpy", dtype=dtype)(**arrays)
    v, g = sd.value_and_grad(loss, params, backend="cuda", dtype=dtype)(**arrays)
    assert v == pytest.approx(ref_v, rel=tol, abs=tol)
    for k in ref_g:
        assert_close(g[k], ref_g[k], tol, atol=tol * 1e-2, what=k)


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_variants_on_ragged_shapes(ta, tb):
    """11 x 13 @ 13 x 9: no dimension is a multiple of the 8-wide tile or the 4-wide slice."""
    A = sd.param("A", (13, 11) if ta else (11, 13))
    B = sd.param("B", (9, 13) if tb else (13, 9))
    prod = (A.T if ta else A) @ (B.T if tb else B)
    x = sd.input("x", 9)
    loss = sd.total(sd.hadamard(prod, prod)) + sd.mean(x)  # a loss whose gradients need every GEMM variant
    rng = np.random.default_rng(0)
    arrays = {"A": rng.normal(size=A.value_shape), "B": rng.normal(size=B.value_shape), "x": np.ones((2, 9))}
    compare(loss, [A, B], arrays)


def test_every_construct_matches_numpy():
    loss, params = every_construct_loss()
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(7, 3)), "y": np.eye(4)[rng.integers(0, 4, 7)], "c": rng.normal(size=(7, 4)),
              "W": rng.normal(size=(3, 4)), "b": rng.normal(size=4), "V": rng.normal(size=(4, 4)) * 0.5}
    compare(loss, params, arrays)
    compare(loss, params, arrays, dtype="float32", tol=1e-4)


def test_reductions_over_ragged_rows_and_columns():
    """Column sums over 19 rows x 6 columns (blocks of 4 x 4), row log-sum-exp over 11 columns."""
    x = sd.input("x", 6); y = sd.input("y", 11)
    W = sd.param("W", (6, 11)); b = sd.param("b", 11)
    loss = sd.losses.softmax_cross_entropy(x @ W + b, y) + sd.mean(sd.softmax(x @ W))
    rng = np.random.default_rng(1)
    arrays = {"x": rng.normal(size=(19, 6)), "y": np.eye(11)[rng.integers(0, 11, 19)],
              "W": rng.normal(size=(6, 11)), "b": rng.normal(size=11)}
    compare(loss, [W, b], arrays)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_mlps_give_the_same_gradients(seed):
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(2, 7, 3)]
    acts = list(rng.choice(["tanh", "relu", "gelu", "silu", "elu"], 2))
    loss_name = ["softmax_cross_entropy", "bce_with_logits"][seed]
    loss, params, *_ = build_mlp(widths, acts, loss_name)
    compare(loss, params, mlp_arrays(loss_name, widths, params, 5, seed))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_training_steps_match_the_cpu_backend(name):
    loss, params = small_regression()
    rng = np.random.default_rng(2)
    init = {str(p.name): rng.normal(size=p.value_shape) * 0.5 for p in params}
    X, Y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    weights = {}
    for backend in ("cpu", "cuda"):
        train = sd.compile(loss, params, optimizer=sd.optim.OPTIMIZERS[name](0.05), backend=backend, dtype="float64")
        for k, v in init.items():
            train.params[k][...] = v  # on cuda: a host copy that writes itself back to the device
        losses = [train.step(x=X, y=Y) for _ in range(3)]
        weights[backend] = ({k: np.array(v) for k, v in train.params.items()}, losses,
                            {k: np.array(v) for k, v in train.state["W1"].items()})
    for k in init:
        assert_close(weights["cuda"][0][k], weights["cpu"][0][k], 1e-10, what=f"{name} {k}")
    assert weights["cuda"][1] == pytest.approx(weights["cpu"][1], rel=1e-10)
    for k in weights["cpu"][2]:
        assert_close(weights["cuda"][2][k], weights["cpu"][2][k], 1e-10, what=f"{name} state {k}")


def test_model_fit_save_and_resume_on_cuda(tmp_path):
    X, y = sd.datasets.xor(48, seed=0)
    model = sd.nn.Sequential([sd.nn.Dense(6, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.05), backend="cuda", seed=0)
    model.fit(X, y, epochs=2, batch_size=16, verbose=0)
    model.save(tmp_path / "gpu.symdl")  # weights come back from the device
    ref = sd.nn.Sequential([sd.nn.Dense(6, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
    ref.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.05), backend="cpu", seed=0)
    ref.fit(X, y, epochs=2, batch_size=16, verbose=0)
    for k, v in ref.get_weights().items():
        assert_close(model.get_weights()[k], v, 1e-5, what=k)
    loaded = sd.nn.load(tmp_path / "gpu.symdl", backend="cuda")
    assert np.array_equal(loaded.predict(X), model.predict(X))


def test_kernel_source_is_readable_and_launches_come_from_shapes():
    loss, params = small_regression()
    train = sd.compile(loss, params, optimizer=sd.optim.Adam(1e-3), backend="cuda")
    src = train.source
    assert "@cuda.jit" in src and "def gemm_tn(" in src and "def step(b, n" in src
    assert "cuda.shared.array" in src and "cuda.syncthreads()" in src
    assert "(((n) * (5) + TPB - 1) // TPB,)" in src  # the grid follows the batch size


def test_extending_recipe_new_node_matches_finite_differences():
    """docs/extending.md's node type (defined in test_architecture.py alone) on the CUDA backend."""
    from helpers import finite_difference
    from test_architecture import _row_mean_loss

    loss, W = _row_mean_loss()
    f = sd.value_and_grad(loss, [W], backend="cuda", dtype="float64")
    rng = np.random.default_rng(1)
    arrays = {"x": rng.normal(size=(5, 4)), "y": rng.normal(size=(5, 1)), "W": rng.normal(size=(4, 3))}
    assert_close(f(**arrays)[1]["W"], finite_difference(f, arrays, "W"), 1e-6, what="d/dW on cuda")


# --------------------------------------------------------------------------- issue 11: norms and dropout


@pytest.mark.parametrize("which", ["batch_norm", "layer_norm"])
def test_norms_match_numpy_and_finite_differences(which):
    from helpers import finite_difference
    from test_normalization import _arrays, _norm_net

    loss, params = _norm_net(which, 3, 5)
    arrays = _arrays(3, 5, 7, 0)
    compare(loss, params, arrays)
    f = sd.value_and_grad(loss, params, backend="cuda", dtype="float64")
    assert_close(f(**arrays)[1]["g"], finite_difference(f, arrays, "g"), 1e-6, what=f"{which} d/dg")


def test_dropout_masks_match_numpy():
    from test_normalization import _mask

    for dtype in ("float64", "float32"):
        ref = _mask("numpy", 0.5, 9, seed=4, dtype=dtype)
        assert np.array_equal(_mask("cuda", 0.5, 9, seed=4, dtype=dtype) != 0, ref != 0), dtype


def test_batch_norm_running_statistics_match_numpy():
    from symdl.graph.nodes import State
    from symdl.formulas.normalization import batch_norm_parts, running_writes

    x = sd.input("x", 3); y = sd.input("y", 3); g = sd.param("g", 3); b = sd.param("b", 3)
    parts = batch_norm_parts(x, g, b)
    stats = {}
    for backend in ("numpy", "cuda"):
        writes = running_writes(parts, State("mu1", 1, 3), State("var1", 1, 3), 0.9)
        train = sd.compile(sd.losses.mse(parts.out, y), [g, b], optimizer=sd.optim.SGD(0.1), backend=backend,
                           dtype="float64", writes=writes)
        rng = np.random.default_rng(0)
        for _ in range(3):
            train.step(x=rng.normal(size=(5, 3)), y=rng.normal(size=(5, 3)))
        stats[backend] = {k: np.array(v) for k, v in train.statistics.items()}
    for k in stats["numpy"]:
        assert_close(stats["cuda"][k], stats["numpy"][k], 1e-12, what=k)


@pytest.mark.parametrize("pool_stride", [1, None], ids=["overlapping", "disjoint"])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_conv_and_pooling_match_numpy(kind, pool_stride):
    """Every image kernel (im2col, col2im, pooling and its gradient, reshape) on odd shapes; pooling
    windows that overlap, and windows that do not (a pixel row and column left in none)."""
    x = sd.input("x", (5, 7, 2)); K = sd.param("K", (3, 2, 2, 3)); c = sd.param("c", 3)
    h = sd.tanh(sd.conv2d(x, K, stride=(2, 1), padding="same") + c)
    h = (sd.max_pool2d if kind == "max" else sd.avg_pool2d)(h, (2, 3), pool_stride)
    loss = sd.total(sd.sigmoid(sd.flatten(h)))
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(3, 5, 7, 2)), "K": rng.normal(size=(3, 2, 2, 3)), "c": rng.normal(size=3)}
    compare(loss, [K, c, x], arrays)
