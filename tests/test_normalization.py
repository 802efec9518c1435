"""Issue 11: batch norm, layer norm and dropout: values and gradients against PyTorch, finite
differences and SymPy's scalar calculus, running statistics against ``BatchNorm1d``, and
dropout's masks (identity at rate 0, mask x upstream, kept fraction, reproducibility)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

import symdl as sd
from helpers import assert_close, finite_difference
from symdl.graph.nodes import ShapeMismatch
from symdl.formulas.normalization import batch_norm_parts, running_writes
from symdl.graph.nodes import State

NORMS = {"batch_norm": sd.batch_norm, "layer_norm": sd.layer_norm}


def _norm_net(which, features, width):
    x = sd.input("x", features); y = sd.input("y", width)
    W = sd.param("W", (features, width)); g = sd.param("g", width); b = sd.param("b", width)
    loss = sd.losses.mse(sd.tanh(NORMS[which](x @ W, g, b, eps=1e-5)), y)
    return loss, [W, g, b]


def _arrays(features, width, rows, seed):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(rows, features)), "y": rng.normal(size=(rows, width)),
            "W": rng.normal(size=(features, width)), "g": rng.normal(size=width), "b": rng.normal(size=width)}


def _torch_reference(which, arrays):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in arrays.items()}
    z = t["x"] @ t["W"]
    if which == "batch_norm":
        h = F.batch_norm(z, None, None, t["g"], t["b"], training=True, eps=1e-5)
    else:
        h = F.layer_norm(z, (z.shape[1],), t["g"], t["b"], eps=1e-5)
    loss = F.mse_loss(torch.tanh(h), t["y"])
    loss.backward()
    return loss.item(), {k: t[k].grad.numpy() for k in ("W", "g", "b")}


@pytest.mark.parametrize("which", sorted(NORMS))
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_norm_matches_pytorch_autograd(which, backend, seed):
    rng = np.random.default_rng(100 + seed)
    features, width, rows = (int(v) for v in rng.integers(2, 9, size=3))
    loss, params = _norm_net(which, features, width)
    arrays = _arrays(features, width, rows + 1, seed)
    value, grads = sd.value_and_grad(loss, params, backend=backend, dtype="float64")(**arrays)
    ref_value, ref_grads = _torch_reference(which, arrays)
    assert value == pytest.approx(ref_value, rel=1e-8, abs=1e-12)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k], 1e-8, what=f"{which} d/d{k} on {backend}")


@pytest.mark.parametrize("which", sorted(NORMS))
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_norm_matches_finite_differences(which, backend):
    loss, params = _norm_net(which, 3, 4)
    arrays = _arrays(3, 4, 6, 7)
    f = sd.value_and_grad(loss, params, backend=backend, dtype="float64")
    grads = f(**arrays)[1]
    for p in ("W", "g", "b"):
        assert_close(grads[p], finite_difference(f, arrays, p), 1e-6, what=f"{which} d/d{p} on {backend}")


@pytest.mark.parametrize("which", sorted(NORMS))
def test_norm_gradient_equals_sympy_scalar_derivatives(which):
    """Tiny shapes: every entry of the loss expanded into scalars and differentiated by SymPy."""
    x = sd.input("x", 2); y = sd.input("y", 2)
    g = sd.param("g", 2); b = sd.param("b", 2)
    loss = sd.losses.mse(NORMS[which](x, g, b, eps=0.5), y)
    proof = sd.prove(loss, [g, b])
    assert proof, str(proof)


def test_running_statistics_equal_torch_batchnorm1d():
    torch = pytest.importorskip("torch")
    features, momentum, eps = 3, 0.9, 1e-3
    x = sd.input("x", features); y = sd.input("y", features)
    g = sd.param("g", features); b = sd.param("b", features)
    parts = batch_norm_parts(x, g, b, eps=eps)
    mean, var = State("moving_mean1", 1, features), State("moving_var1", 1, features)
    train = sd.compile(sd.losses.mse(parts.out, y), [g, b], optimizer=sd.optim.SGD(0.1), backend="cpu",
                       dtype="float64", writes=running_writes(parts, mean, var, momentum),
                       initial={"moving_var1": np.ones(features)})
    bn = torch.nn.BatchNorm1d(features, eps=eps, momentum=1 - momentum, dtype=torch.float64)
    rng = np.random.default_rng(0)
    for k in range(5):
        xb = rng.normal(loc=k, scale=1 + k, size=(4 + k, features))
        train.step(x=xb, y=rng.normal(size=xb.shape))
        bn(torch.tensor(xb))
    assert_close(train.statistics["moving_mean1"], bn.running_mean.numpy(), 1e-12, what="running mean")
    assert_close(train.statistics["moving_var1"], bn.running_var.numpy(), 1e-12, what="running var")



@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_image_running_statistics_equal_torch_batchnorm2d(backend):
    """On images (n·h·w, c) the statistics are per channel over n·h·w values, and the running variance
    is unbiased over those (1024/1023 for 16 images of 8x8, not 16/15): BatchNorm2d's running_var."""
    torch = pytest.importorskip("torch")
    momentum, eps = 0.8, 1e-3
    x = sd.nn.Input(shape=(8, 8, 3))
    bn_layer = sd.nn.BatchNormalization(momentum=momentum, epsilon=eps)
    model = sd.nn.Model(x, sd.nn.Dense(2)(sd.nn.GlobalAveragePooling2D()(bn_layer(sd.nn.Conv2D(4, 3)(x)))))
    model.compile(loss="mse", optimizer=sd.optim.SGD(0.05), backend=backend, dtype="float64", seed=0)
    w = model.get_weights()
    conv = torch.nn.Conv2d(3, 4, 3, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(4, eps=eps, momentum=1 - momentum, dtype=torch.float64)
    dense = torch.nn.Linear(4, 2, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w["K1"]).permute(3, 2, 0, 1)); conv.bias.copy_(torch.tensor(w["b1"]))
        dense.weight.copy_(torch.tensor(w["W4"]).T); dense.bias.copy_(torch.tensor(w["b4"]))
    opt = torch.optim.SGD([*conv.parameters(), *bn.parameters(), *dense.parameters()], lr=0.05)
    rng = np.random.default_rng(0)
    for k in range(4):
        X, Y = rng.normal(loc=k, scale=1 + k, size=(16, 8, 8, 3)), rng.normal(size=(16, 2))
        model.train_step.step(x=X, y=Y)
        opt.zero_grad()
        out = dense(bn(conv(torch.tensor(X).permute(0, 3, 1, 2))).mean(dim=(2, 3)))
        ((out - torch.tensor(Y)) ** 2).mean().backward()
        opt.step()
    stats = model.train_step.statistics
    assert_close(stats["moving_mean2"], bn.running_mean.numpy(), 1e-10, what="running mean")
    assert_close(stats["moving_var2"], bn.running_var.numpy(), 1e-10, what="running var")
    assert_close(model.get_weights()["gamma2"], bn.weight.detach().numpy(), 1e-10, what="γ after 4 steps")
    bn.eval()
    X = rng.normal(size=(5, 8, 8, 3))
    with torch.no_grad():
        expected = dense(bn(conv(torch.tensor(X).permute(0, 3, 1, 2))).mean(dim=(2, 3))).numpy()
    assert_close(model.predict(X), expected, 1e-10, what="predict with the running statistics")

def _bn_model(rate=0.0, bn=True):
    layers = [sd.nn.Dense(8, use_bias=False)] + ([sd.nn.BatchNormalization(momentum=0.9)] if bn else [])
    layers += [sd.nn.Activation("relu")] + ([sd.nn.Dropout(rate)] if rate else []) + [sd.nn.Dense(2)]
    return sd.nn.Sequential(layers, input_dim=2)


def test_predict_uses_the_running_statistics():
    X, y = sd.datasets.xor(64, seed=0)
    model = _bn_model()
    model.compile(optimizer=sd.optim.Adam(0.01), backend="cpu", dtype="float64", seed=0)
    model.fit(X, y, epochs=2, batch_size=16, verbose=0)
    w, stats = model.get_weights(), model.train_step.statistics
    z = X @ w["W1"]
    h = np.maximum(w["gamma2"] * (z - stats["moving_mean2"]) / np.sqrt(stats["moving_var2"] + 1e-3) + w["beta2"], 0)
    assert_close(model.predict(X), h @ w["W4"] + w["b4"], 1e-10, what="predict")
    assert not np.allclose(stats["moving_var2"], 1.0)  # the step wrote them
    text = model.summary(print_fn=None)
    assert "non-trainable params: 16" in text and "trainable params: 50" in text


def test_batch_norm_state_survives_a_checkpoint():
    X, y = sd.datasets.xor(64, seed=0)
    model = _bn_model(rate=0.25)
    model.compile(optimizer=sd.optim.Adam(0.01), backend="numpy", dtype="float64", seed=3)
    model.fit(X, y, epochs=1, batch_size=16, verbose=0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bn.symdl")
        model.save(path)
        loaded = sd.nn.load(path)
    for k, v in model.train_step.statistics.items():
        assert np.array_equal(loaded.train_step.statistics[k], v), k
    assert np.array_equal(loaded.predict(X), model.predict(X))
    assert [type(l).__name__ for l in loaded.layers] == [type(l).__name__ for l in model.layers]


# --------------------------------------------------------------------------- dropout


def _dropout_probe(rate, size=6, key=1):
    """``L = Σ c ⊙ dropout(x W)``: with ``x = I``, ``∂L/∂W = mask/(1-rate) ⊙ c`` entry by entry."""
    x = sd.input("x", size); c = sd.input("c", size); W = sd.param("W", (size, size))
    return sd.total(sd.hadamard(c, sd.dropout(x @ W, rate, key=key))), W


def _mask(backend, rate, size=6, seed=0, dtype="float64"):
    loss, W = _dropout_probe(rate, size)
    f = sd.value_and_grad(loss, [W], backend=backend, dtype=dtype, seed=seed)
    return f(x=np.eye(size), c=np.ones((size, size)), W=np.ones((size, size)))[1]["W"] * (1 - rate)


def test_dropout_rate_zero_is_exactly_the_identity():
    h = sd.tanh(sd.input("x", 3) @ sd.param("W", (3, 3)))
    assert sd.dropout(h, 0) is h and sd.dropout(h, 0.0) == h


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_dropout_gradient_is_mask_times_upstream(backend):
    rate, size = 0.4, 6
    loss, W = _dropout_probe(rate, size)
    f = sd.value_and_grad(loss, [W], backend=backend, dtype="float64", seed=11)
    mask = _mask(backend, rate, size, seed=11)
    assert set(np.unique(mask)) <= {0.0, 1.0} and 0 < mask.sum() < mask.size
    rng = np.random.default_rng(0)
    c, w = rng.normal(size=(size, size)), rng.normal(size=(size, size))
    value, grads = f(x=np.eye(size), c=c, W=w)
    assert_close(grads["W"], mask * c / (1 - rate), 1e-14, what="gradient")
    assert value == pytest.approx(np.sum(mask * c * w) / (1 - rate), rel=1e-12)
    assert np.array_equal(f(x=np.eye(size), c=c, W=w)[1]["W"], grads["W"])  # a fixed mask per seed
    assert not np.array_equal(_mask(backend, rate, size, seed=12), mask)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_keeps_one_minus_rate_of_the_entries(rate):
    size = 64
    kept = _mask("numpy", rate, size).mean()
    std = np.sqrt(rate * (1 - rate) / size**2)
    assert abs(kept - (1 - rate)) < 3 * std, (kept, 1 - rate)


def test_dropout_masks_are_identical_on_every_backend():
    ref = _mask("numpy", 0.5, 9, seed=4)
    for backend, dtype in (("cpu", "float64"), ("cpu", "float32"), ("numpy", "float32")):
        assert np.array_equal(_mask(backend, 0.5, 9, seed=4, dtype=dtype) != 0, ref != 0), (backend, dtype)


def test_dropout_inference_is_the_network_without_dropout():
    X, y = sd.datasets.xor(64, seed=0)
    model = _bn_model(rate=0.5, bn=False)
    model.compile(optimizer=sd.optim.Adam(0.01), backend="cpu", dtype="float64", seed=0)
    model.fit(X, y, epochs=2, batch_size=16, verbose=0)
    plain = _bn_model(bn=False)
    plain.compile(backend="cpu", dtype="float64")
    weights = model.get_weights()
    plain.set_weights({"W1": weights["W1"], "W3": weights["W4"], "b3": weights["b4"]})
    first = model.predict(X)
    assert np.array_equal(model.predict(X), first)
    assert_close(first, plain.predict(X), 1e-12, what="inference")
    assert model.evaluate(X, y)["loss"] == pytest.approx(plain.evaluate(X, y)["loss"], rel=1e-12)


def test_a_resumed_run_draws_the_same_masks():
    X, y = sd.datasets.xor(64, seed=1)

    def fresh():
        model = _bn_model(rate=0.5)
        model.compile(optimizer=sd.optim.Adam(0.01), backend="cpu", dtype="float64", seed=5)
        return model

    straight = fresh()
    straight.fit(X, y, epochs=2, batch_size=16, verbose=0)
    first = fresh()
    first.fit(X, y, epochs=1, batch_size=16, verbose=0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.symdl")
        first.save(path)
        resumed = sd.nn.load(path)
    resumed.fit(X, y, epochs=1, batch_size=16, verbose=0)
    for k, v in straight.get_weights().items():
        assert_close(resumed.get_weights()[k], v, 1e-13, what=k)
    other = fresh()
    other.train_step.seed = 6  # the same start and batches, other masks
    other.fit(X, y, epochs=2, batch_size=16, verbose=0)
    assert not np.allclose(other.get_weights()["W5"], straight.get_weights()["W5"])


# --------------------------------------------------------------------------- errors


def test_bad_arguments_name_the_thing_and_the_shapes():
    z = sd.input("z", 4)
    g, b, g3 = sd.param("g", 4), sd.param("b", 4), sd.param("g3", 3)
    for rate in (-0.1, 1.0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="rate must be a number in \\[0, 1\\)"):
            sd.dropout(z, rate)
    for eps in (0, -1e-5, "1e-5"):
        with pytest.raises(ValueError, match="eps must be a number > 0"):
            sd.batch_norm(z, g, b, eps=eps)
    with pytest.raises(ShapeMismatch, match=r"layer_norm of z \(n, 4\): gamma .* 4 features .* g3 of shape \(3,\)"):
        sd.layer_norm(z, g3, b)
    with pytest.raises(ShapeMismatch, match=r"beta must be a vector parameter"):
        sd.batch_norm(z, g, sd.param("B", (4, 4)))
    with pytest.raises(ValueError, match="Dropout: rate"):
        sd.nn.Dropout(1.0)
    with pytest.raises(ValueError, match="momentum"):
        sd.nn.BatchNormalization(momentum=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        sd.nn.LayerNormalization(epsilon=0)
