"""Convolution and pooling (issue 10): every node against finite differences, PyTorch autograd,
SymPy's scalar calculus, and every backend against the NumPy reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import symdl as sd
from helpers import assert_close, finite_difference
from symdl.ops.conv import conv_geometry, image_shape
from symdl.graph.nodes import ShapeMismatch
from symdl.ir.kernels import check


def _conv_net(H, W, C, kh, kw, F, stride, padding, pool=None, pool_kind="max"):
    x = sd.input("x", (H, W, C)); K = sd.param("K", (kh, kw, C, F)); c = sd.param("c", F)
    h = sd.tanh(sd.conv2d(x, K, stride=stride, padding=padding) + c)
    if pool:
        h = (sd.max_pool2d if pool_kind == "max" else sd.avg_pool2d)(h, *pool)
    loss = sd.total(sd.sigmoid(sd.flatten(h)) * 0.5) + sd.mean(sd.hadamard(h, h))
    return loss, x, K, c


def _arrays(H, W, C, kh, kw, F, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, H, W, C)), "K": rng.normal(size=(kh, kw, C, F)) * 0.5,
            "c": rng.normal(size=F) * 0.1}


CASES = [  # (H, W, C, kh, kw, F, stride, padding, pool)
    (5, 6, 2, 3, 3, 3, 1, "same", ((2, 2), None)),
    (7, 5, 1, 3, 2, 2, 2, "same", ((2, 1), (1, 1))),
    (6, 7, 3, 2, 3, 2, (2, 1), "valid", ((3, 2), (2, 2))),
    (5, 5, 2, 3, 3, 2, 2, 1, ((2, 2), 1)),
    (4, 6, 2, 1, 1, 3, 1, (1, 2), None),
    (6, 6, 1, 4, 4, 2, 2, "same", ((2, 2), None)),  # "same" with more padding at the bottom/right
]


@pytest.mark.parametrize("pool_kind", ["max", "avg"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-k{c[3]}{c[4]}-s{c[6]}-{c[7]}")
def test_every_node_matches_finite_differences(case, pool_kind):
    H, W, C, kh, kw, F, stride, padding, pool = case
    loss, x, K, c = _conv_net(H, W, C, kh, kw, F, stride, padding, pool, pool_kind)
    f = sd.value_and_grad(loss, [K, c, x], backend="numpy", dtype="float64")
    check(f.program)
    arrays = _arrays(H, W, C, kh, kw, F)
    _, grads = f(**arrays)
    assert grads["K"].shape == (kh, kw, C, F) and grads["x"].shape == (2, H, W, C)
    for name in ("K", "c", "x"):
        assert_close(grads[name], finite_difference(f, arrays, name), 1e-6, what=name)


@pytest.mark.slow
def test_scalar_sympy_differentiation_on_a_tiny_shape():
    """Patches, col2im, avg-pool and flatten against SymPy's scalar derivatives (``sd.prove``)."""
    x = sd.input("x", (3, 3, 1)); K = sd.param("K", (2, 2, 1, 1))
    loss = sd.total(sd.flatten(sd.avg_pool2d(sd.conv2d(x, K, stride=2, padding=1), 2, 1)) ** 2)
    assert sd.prove(loss, [K, x], {"n": 1}).proved


# --------------------------------------------------------------------------- PyTorch oracle

torch = pytest.importorskip("torch")
F_ = torch.nn.functional


def _torch_same_pad(H, kh, sh):
    OH = -(-H // sh)
    total = max((OH - 1) * sh + kh - H, 0)
    return total // 2, total - total // 2


def _torch_reference(xv, kv, cv, stride, padding, pool):
    x = torch.tensor(np.ascontiguousarray(xv.transpose(0, 3, 1, 2)), requires_grad=True)  # NHWC -> NCHW
    k = torch.tensor(np.ascontiguousarray(kv.transpose(3, 2, 0, 1)), requires_grad=True)  # (kh, kw, ci, co) -> (co, ci, kh, kw)
    c = torch.tensor(cv, requires_grad=True)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    xin = x
    if padding == "same":
        (t, b), (l, r) = _torch_same_pad(xv.shape[1], kv.shape[0], sh), _torch_same_pad(xv.shape[2], kv.shape[1], sw)
        xin, pad = F_.pad(x, (l, r, t, b)), 0
    else:
        pad = 0 if padding == "valid" else padding
    z = torch.tanh(F_.conv2d(xin, k, c, stride=(sh, sw), padding=pad))
    kind, size, pstride = pool
    h = (F_.max_pool2d if kind == "max" else F_.avg_pool2d)(z, size, stride=pstride or size)
    loss = (torch.sigmoid(h.permute(0, 2, 3, 1).reshape(len(xv), -1)) * 0.5).sum()
    loss.backward()
    return loss.item(), {"x": x.grad.numpy().transpose(0, 2, 3, 1), "K": k.grad.numpy().transpose(2, 3, 1, 0),
                         "c": c.grad.numpy()}


@settings(max_examples=12, deadline=None)
@given(H=st.integers(3, 7), W=st.integers(3, 7), C=st.integers(1, 3), F=st.integers(1, 3), kh=st.integers(1, 3),
       kw=st.integers(1, 3), stride=st.sampled_from([1, 2, (1, 2), (2, 1)]),
       padding=st.sampled_from(["valid", "same", 1, (1, 0)]), kind=st.sampled_from(["max", "avg"]),
       size=st.sampled_from([1, 2, (2, 1)]), pstride=st.sampled_from([None, 1]), seed=st.integers(0, 99))
def test_conv_and_pooling_match_pytorch_autograd(H, W, C, F, kh, kw, stride, padding, kind, size, pstride, seed):
    x = sd.input("x", (H, W, C)); K = sd.param("K", (kh, kw, C, F)); c = sd.param("c", F)
    try:
        z = sd.tanh(sd.conv2d(x, K, stride=stride, padding=padding) + c)
        h = (sd.max_pool2d if kind == "max" else sd.avg_pool2d)(z, size, pstride)
    except ShapeMismatch:
        return  # a window larger than the image: refused at build time (tested below)
    loss = sd.total(sd.sigmoid(sd.flatten(h)) * 0.5)
    arrays = _arrays(H, W, C, kh, kw, F, n=3, seed=seed)
    value, grads = sd.value_and_grad(loss, [K, c, x], backend="numpy")(**arrays)
    ref_value, ref = _torch_reference(arrays["x"], arrays["K"], arrays["c"], stride, padding, (kind, size, pstride))
    assert value == pytest.approx(ref_value, rel=1e-10)
    for name in ref:
        assert_close(grads[name], ref[name], 1e-8, what=name)


@pytest.mark.parametrize("stride", [1, 2], ids=["overlapping", "disjoint"])
def test_max_pool_ties_go_to_the_first_arg_max_as_in_pytorch(stride):
    x = sd.input("x", (4, 4, 1))
    loss = sd.total(sd.max_pool2d(x, 2, stride) * 1.0)
    X = np.zeros((1, 4, 4, 1)); X[0, 1:3, 1:3, 0] = 1.0  # ties everywhere
    X[0, 0, 2:, 0] = 1.0  # a window whose maximum is tied at its first two pixels
    xt = torch.tensor(X.transpose(0, 3, 1, 2), requires_grad=True)
    F_.max_pool2d(xt, 2, stride=stride).sum().backward()
    for backend in ("numpy", "cpu"):
        _, g = sd.value_and_grad(loss, [x], backend=backend)(x=X)
        assert_close(g["x"], xt.grad.numpy().transpose(0, 2, 3, 1), 0, what=backend)


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_cpu_backend_matches_numpy(dtype, tol):
    for case, kind in ((CASES[1], "max"), (CASES[2], "avg"), (CASES[3], "max")):
        H, W, C, kh, kw, F, stride, padding, pool = case
        loss, x, K, c = _conv_net(H, W, C, kh, kw, F, stride, padding, pool, kind)
        arrays = _arrays(H, W, C, kh, kw, F, n=3)
        ref_v, ref = sd.value_and_grad(loss, [K, c, x], backend="numpy", dtype=dtype)(**arrays)
        v, got = sd.value_and_grad(loss, [K, c, x], backend="cpu", dtype=dtype)(**arrays)
        assert v == pytest.approx(ref_v, rel=tol)
        for name in ref:
            assert_close(got[name], ref[name], tol, what=f"{name} {case}")


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("pool", [(2, None), ((3, 2), None), (2, 3)], ids=["remainder", "3x2", "gaps"])
def test_cpu_disjoint_pooling_matches_numpy(kind, pool):
    """Windows that do not overlap (each pixel in one window at most) take their own code path:
    a 7x7 image leaves a last row and column in no window, stride 3 leaves gaps between windows."""
    loss, x, K, c = _conv_net(7, 7, 2, 1, 1, 3, 1, "valid", pool, kind)
    arrays = _arrays(7, 7, 2, 1, 1, 3, n=3)
    for dtype, tol in (("float64", 1e-12), ("float32", 2e-5)):
        ref_v, ref = sd.value_and_grad(loss, [K, c, x], backend="numpy", dtype=dtype)(**arrays)
        f = sd.value_and_grad(loss, [K, c, x], backend="cpu", dtype=dtype)
        f(**arrays)
        f.runner.workspace.get(3).flat[...] = np.nan  # every entry must be written, none left from before
        v, got = f(**arrays)
        assert v == pytest.approx(ref_v, rel=tol)
        for name in ref:
            assert_close(got[name], ref[name], tol, what=f"{name} {dtype}")


@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_threaded_step_matches_numpy(threads, monkeypatch):
    """Every image loop and product split across the step's threads."""
    from helpers import run_threaded

    H, W, C, kh, kw, F = 12, 12, 3, 3, 3, 8
    loss, x, K, c = _conv_net(H, W, C, kh, kw, F, 1, "same", ((2, 2), None), "max")
    arrays = _arrays(H, W, C, kh, kw, F, n=64)
    ref_v, ref = sd.value_and_grad(loss, [K, c, x], backend="numpy")(**arrays)
    f = sd.value_and_grad(loss, [K, c, x], backend="cpu")
    assert "prange" not in f.source and "for i in range(_begin, _end):" in f.source
    run_threaded(f.runner, threads, monkeypatch)
    v, got = f(**arrays)
    assert f.runner._ready[64][0][:, 2].sum() > 10  # most kernels were split
    assert v == pytest.approx(ref_v, rel=1e-12)
    for name in ref:
        assert_close(got[name], ref[name], 1e-12, what=name)


def test_training_step_on_images_decreases_the_loss():
    x = sd.input("x", (6, 6, 1)); y = sd.input("y", 3)
    K = sd.param("K", (3, 3, 1, 4)); c = sd.param("c", 4); W = sd.param("W", (3 * 3 * 4, 3)); b = sd.param("b", 3)
    h = sd.max_pool2d(sd.relu(sd.conv2d(x, K, padding="same") + c), 2)
    loss = sd.losses.softmax_cross_entropy(sd.flatten(h) @ W + b, y)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 6, 6, 1)); Y = np.eye(3)[rng.integers(0, 3, 16)]
    for backend in ("numpy", "cpu"):
        train = sd.compile(loss, [K, c, W, b], optimizer=sd.optim.Adam(0.05), backend=backend, dtype="float64")
        assert train.params["K"].shape == (3, 3, 1, 4)
        first = train.step(x=X, y=Y)
        for _ in range(30):
            last = train.step(x=X, y=Y)
        assert last < 0.5 * first


# --------------------------------------------------------------------------- shapes and errors


def test_shapes_follow_keras():
    x = sd.input("x", (8, 8, 1)); K = sd.param("K", (3, 3, 1, 16))
    assert image_shape(sd.conv2d(x, K, padding="same")) == (8, 8, 16)
    assert image_shape(sd.conv2d(x, K)) == (6, 6, 16)
    assert image_shape(sd.conv2d(x, K, stride=2, padding="same")) == (4, 4, 16)
    assert image_shape(sd.max_pool2d(sd.conv2d(x, K, padding="same"), 2)) == (4, 4, 16)
    assert image_shape(sd.avg_pool2d(sd.conv2d(x, K), 3, 2)) == (2, 2, 16)
    assert sd.flatten(sd.max_pool2d(x, 2)).shape == (sd.n, 16)
    g = conv_geometry((7, 7, 1), (4, 4), 2, "same", "t")  # TF: pad 3 in all, 1 top/left, 2 bottom/right
    assert (g.OH, g.OW, g.pt, g.pl) == (4, 4, 1, 1)


def test_bad_shapes_give_clear_errors():
    x = sd.input("x", (8, 8, 3)); K = sd.param("K", (3, 3, 1, 4)); flat = sd.input("f", 10)
    with pytest.raises(ShapeMismatch, match=r"kernel K \(3, 3, 1, 4\) expects 1 input channels.*has 3"):
        sd.conv2d(x, K)
    with pytest.raises(ShapeMismatch, match="not an image batch"):
        sd.conv2d(flat, K)
    with pytest.raises(ShapeMismatch, match=r"9x9 window with stride \(1, 1\) and padding 'valid' does not fit .* 8x8"):
        sd.conv2d(x, sd.param("K2", (9, 9, 3, 1)))
    with pytest.raises(ValueError, match="padding must be"):
        sd.conv2d(x, sd.param("K3", (3, 3, 3, 1)), padding="full")
    with pytest.raises(TypeError, match=r"kernel must be sd.param\(name, \(kh, kw, c_in, c_out\)\)"):
        sd.conv2d(x, sd.param("W", (27, 4)))
    with pytest.raises(ShapeMismatch, match="max_pool2d.*does not fit"):
        sd.max_pool2d(x, 9)
    with pytest.raises(ValueError, match="image shape is"):
        sd.input("bad", (8, 8))
    loss = sd.total(sd.max_pool2d(x, 2) * 1.0)
    f = sd.value_and_grad(loss, [x], backend="numpy")
    with pytest.raises(sd.validate.ArrayError if hasattr(sd, "validate") else ValueError,
                       match=r"expected images \(n, 8, 8, 3\)"):
        f(x=np.ones((2, 8, 8)))


def test_formulas_read_as_im2col_products():
    loss, x, K, c = _conv_net(5, 5, 1, 3, 3, 2, 1, "same", ((2, 2), None))
    g = sd.grad(loss, [K, c])
    assert str(g[K]).startswith("patches(x).T*")
    assert "route_max(" in str(g[K])
    assert r"\operatorname{patches}\left(x\right)" in sd.latex(g[K])


# --------------------------------------------------------------------------- Keras layers


def test_sequential_cnn_summary_fit_predict_and_save_load(tmp_path):
    X, y = sd.datasets.digits(images=True)
    assert X.shape == (1797, 8, 8, 1)
    model = sd.nn.Sequential([sd.nn.Conv2D(4, 3, padding="same", activation="relu"), sd.nn.MaxPooling2D(2),
                              sd.nn.Conv2D(6, (2, 3), strides=(1, 2), activation="tanh"), sd.nn.AveragePooling2D(1),
                              sd.nn.Flatten(), sd.nn.Dense(10)], input_shape=(8, 8, 1))
    text = model.summary(print_fn=None)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:-1]}
    assert rows["conv2d_1"][:5] == ["(n,", "8,", "8,", "4)", "40"] and rows["max_pooling2d_1"][-1] == "0"
    assert rows["conv2d_2"][:5] == ["(n,", "3,", "1,", "6)", "150"] and rows["flatten_1"][:2] == ["(n,", "18)"]
    model.compile(optimizer=sd.optim.Adam(1e-2), backend="numpy", dtype="float64")
    assert model.train_step.params["K1"].shape == (3, 3, 1, 4)
    model.fit(X[:256], y[:256], epochs=2, batch_size=64, verbose=0)
    out = model.predict(X[:20])
    assert out.shape == (20, 10)
    path = tmp_path / "cnn.symdl"
    model.save(path)
    again = sd.nn.load(path)
    assert_close(again.predict(X[:20]), out, 1e-12)
    assert "patches(x).T*δ1" in model.formulas()
    with pytest.raises(sd.datasets.DataError, match=r"expects images \(n, 8, 8, 1\)"):
        model.predict(X[:5].reshape(5, 64))
    with pytest.raises(ValueError, match="put sd.nn.Flatten"):
        sd.nn.Sequential([sd.nn.Conv2D(2, 3), sd.nn.Dense(10)], input_shape=(8, 8, 1))


def test_explain_names_the_conv_layer_and_defines_its_symbols():
    x = sd.input("x", (6, 6, 1)); K = sd.param("K", (3, 3, 1, 2)); c = sd.param("c", 2)
    W = sd.param("W", (18, 3)); b = sd.param("b", 3); y = sd.input("y", 3)
    h = sd.avg_pool2d(sd.relu(sd.conv2d(x, K, padding="same") + c), 2)
    text = str(sd.explain(sd.losses.softmax_cross_entropy(sd.flatten(h) @ W + b, y), [K, c, W, b]))
    assert "Z1 = patches(x)*K + c" in text and "Z2 = flatten(avgpool(A1))*W + b" in text
    assert "δ1 = (spread(unflatten(δ2*W.T)))⊙1[Z1 > 0]" in text
    assert "∂L/∂K = patches(x).T*δ1" in text and "∂L/∂c = sum_rows(δ1)" in text
    assert "⋆" in text and "spread(G)" in text


def test_prove_sees_through_max_pooling():
    """``sd.prove`` checks a gradient through ``route_max`` (max-pool's adjoint has a scalar view:
    each pixel collects the windows whose first arg-max it is)."""
    x = sd.input("x", (2, 2, 1)); y = sd.input("y", 1); K = sd.param("K", (1, 1, 1, 1)); W = sd.param("W", (1, 1))
    loss = sd.losses.mse(sd.flatten(sd.max_pool2d(sd.conv2d(x, K), 2)) @ W, y)
    assert sd.prove(loss, [K, W])
