"""``Reshape`` and ``ZeroPadding2D`` (Keras semantics on NHWC images held as rows), their values and
gradient oracles (finite differences, SymPy scalar proof, PyTorch autograd), and ``a @ Wa + b @ Wb``
(``Add`` of two bias-free Dense layers) lowering and training."""
from __future__ import annotations

import numpy as np
import pytest

import symdl as sd
from symdl.nn import Input, Model

from helpers import assert_close

BACKENDS = ["numpy", "cpu"]


def padded_net(d=4):
    """Features -> Reshape to images -> ZeroPadding2D -> Conv2D (valid) -> Reshape to features -> Dense."""
    x = Input(shape=(d * d,))
    h = sd.nn.Reshape((d, d, 1))(x)
    h = sd.nn.ZeroPadding2D(((1, 0), (2, 1)))(h)
    h = sd.nn.Conv2D(2, 2, activation="tanh")(h)
    return Model(x, sd.nn.Dense(2)(sd.nn.Reshape((-1,))(h)))


def _arrays(model, n=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.normal(size=(n, model.input_dim)), "y": rng.normal(size=(n, model.units))}
    for p in model.params:
        arrays[str(p.name)] = rng.normal(scale=0.7, size=p.value_shape)
    return arrays


def _torch_padded(T, d):
    import torch

    F = torch.nn.functional
    h = T["x"].reshape(-1, d, d, 1).permute(0, 3, 1, 2)
    h = F.pad(h, (2, 1, 1, 0))  # (left, right, top, bottom)
    h = torch.tanh(F.conv2d(h, T["K3"].permute(3, 2, 0, 1), T["b3"]))
    return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) @ T["W5"] + T["b5"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_gradients_match_pytorch(backend):
    torch = pytest.importorskip("torch")
    model = padded_net()
    model.compile(loss="mse", backend=backend, dtype="float64")
    assert [str(p.name) for p in model.params] == ["K3", "b3", "W5", "b5"]
    arrays = _arrays(model, seed=1)
    names = [str(p.name) for p in model.params]
    value, grads = sd.value_and_grad(model.loss, model.params, backend=backend, dtype="float64")(**arrays)
    T = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in names) for k, v in arrays.items()}
    out = _torch_padded(T, 4)
    loss = ((out - T["y"]) ** 2).mean()
    loss.backward()
    assert value == pytest.approx(loss.item(), rel=1e-10)
    for k in names:
        assert_close(grads[k], T[k].grad.numpy(), 1e-8, what=f"{k} on {backend}")
    model.set_weights({k: arrays[k] for k in names})
    assert_close(model.predict(arrays["x"]), out.detach().numpy(), 1e-10)


def test_gradients_match_finite_differences():
    model = padded_net()
    model.compile(loss="mse", backend="numpy", dtype="float64")
    report = sd.check_grad(model.loss, model.params, _arrays(model, seed=2))
    assert report.passed, str(report)
    x = model.x  # the input's gradient runs through crop2d and flatten's adjoint
    report = sd.check_grad(model.loss, [x], _arrays(model, seed=3))
    assert report.passed, str(report)


def test_gradients_proved_by_sympy_on_tiny_shapes():
    x = Input(shape=(4,))
    h = sd.nn.ZeroPadding2D((1, 0))(sd.nn.Reshape((2, 2, 1))(x))
    model = Model(x, sd.nn.Dense(2)(sd.nn.Reshape((8,))(sd.nn.Conv2D(1, 2, padding="same")(h))))
    model.compile(loss="mse", backend="numpy", dtype="float64")
    proof = sd.prove(model.loss, model.params, {"n": 1})
    assert proof.proved, str(proof)
    assert "zero_pad2d(unflatten(x))" in model.formulas()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reshape_between_features_and_images_is_keras_row_major(backend):
    x = Input(shape=(2, 3, 4))
    a = sd.nn.Reshape((4, 3, 2))(x)
    b = sd.nn.Reshape((24,))(a)
    model = Model(x, sd.nn.Concatenate()([b, sd.nn.Flatten()(x)]))
    assert a.shape == (4, 3, 2) and b.shape == (24,)
    model.compile(loss="mse", backend=backend, dtype="float64")
    X = np.arange(48.0).reshape(2, 2, 3, 4)
    assert_close(model.predict(X), np.concatenate([X.reshape(2, -1)] * 2, axis=1), 0)


@pytest.mark.parametrize("padding, pads", [(2, ((2, 2), (2, 2))), ((1, 3), ((1, 1), (3, 3))),
                                           (((0, 1), (2, 0)), ((0, 1), (2, 0)))])
def test_zero_padding_takes_keras_forms(padding, pads):
    x = Input(shape=(3, 2, 2))
    y = sd.nn.ZeroPadding2D(padding)(x)
    assert y.shape == (3 + sum(pads[0]), 2 + sum(pads[1]), 2)
    model = Model(x, sd.nn.Flatten()(y))
    model.compile(loss="mse", backend="numpy", dtype="float64")
    X = np.random.default_rng(0).normal(size=(2, 3, 2, 2))
    assert_close(model.predict(X), np.pad(X, ((0, 0), *pads, (0, 0))).reshape(2, -1), 0)


def test_saved_and_loaded(tmp_path):
    model = padded_net()
    model.compile(loss="mse", backend="numpy", dtype="float64")
    model.save(tmp_path / "pad.symdl")
    loaded = sd.nn.load(tmp_path / "pad.symdl")
    X = np.random.default_rng(4).normal(size=(3, 16))
    assert_close(loaded.predict(X), model.predict(X), 0)
    assert [type(l).__name__ for l in loaded.layers][:3] == ["Reshape", "ZeroPadding2D", "Conv2D"]


def test_errors_name_the_layer_and_shapes():
    with pytest.raises(ValueError, match=r"Reshape layer: cannot reshape \(None, 12\) into \(None, 5\): 12 values"):
        sd.nn.Reshape((5,))(Input(shape=(12,)))
    with pytest.raises(ValueError, match="target_shape must be"):
        sd.nn.Reshape((2, 6))
    with pytest.raises(ValueError, match="target_shape must be"):
        sd.nn.Reshape((-1, -1, 3))
    with pytest.raises(ValueError, match=r"ZeroPadding2D layer: needs images \(None, h, w, c\), got \(None, 4\)"):
        sd.nn.ZeroPadding2D(1)(Input(shape=(4,)))
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        sd.nn.ZeroPadding2D(-1)


@pytest.mark.cudasim
@pytest.mark.skipif(__import__("os").environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
def test_padding_on_the_cuda_simulator():
    model = padded_net(3)
    model.compile(loss="mse", backend="numpy", dtype="float64")
    arrays = _arrays(model, n=2, seed=5)
    ref_v, ref_g = sd.value_and_grad(model.loss, model.params, backend="numpy", dtype="float64")(**arrays)
    v, g = sd.value_and_grad(model.loss, model.params, backend="cuda", dtype="float64")(**arrays)
    assert v == pytest.approx(ref_v, rel=1e-10)
    for k in ref_g:
        assert_close(g[k], ref_g[k], 1e-10, what=k)


# --------------------------------------------------------------------------- a sum of products


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_of_two_bias_free_dense_layers_lowers_and_trains(backend):
    """``a @ Wa + b @ Wb`` (issue 26 saw ``lowering: no rule for MatAdd``): values, gradients, training."""
    torch = pytest.importorskip("torch")
    a, b = Input(shape=(3,), name="a"), Input(shape=(2,), name="b")
    summed = sd.nn.Add()([sd.nn.Dense(4, use_bias=False)(a), sd.nn.Dense(4, use_bias=False)(b)])
    model = Model([a, b], sd.nn.Dense(1)(sd.nn.Activation("tanh")(summed)))
    model.compile(loss="mse", optimizer=sd.optim.Adam(0.05), backend=backend, dtype="float64")
    assert str(model.output) == "tanh(x1*W1 + x2*W2)*W5 + b5"  # a SymPy MatAdd of two products
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(64, 3)), rng.normal(size=(64, 2))
    target = np.tanh(A[:, :1] - B[:, 1:]) * 0.8
    w = model.get_weights()
    T = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
    out = torch.tanh(torch.tensor(A) @ T["W1"] + torch.tensor(B) @ T["W2"]) @ T["W5"] + T["b5"]
    loss = ((out - torch.tensor(target)) ** 2).mean()
    loss.backward()
    value, grads = sd.value_and_grad(model.loss, model.params, backend=backend, dtype="float64")(
        x1=A, x2=B, y=target, **w)
    assert value == pytest.approx(loss.item(), rel=1e-10)
    for k in grads:
        assert_close(grads[k], T[k].grad.numpy(), 1e-8, what=k)
    before = model.evaluate([A, B], target)["loss"]
    model.fit([A, B], target, epochs=30, batch_size=16, verbose=0)
    assert model.evaluate([A, B], target)["loss"] < 0.2 * before
