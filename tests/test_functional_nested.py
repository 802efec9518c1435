"""A ``Model`` used as a layer of another model (Keras's nested models): called on a symbolic tensor, its
weights shared with the inner model, one row in the summary; gradient oracles (finite differences,
SymPy scalar proof, PyTorch autograd), save / load, and the errors."""
from __future__ import annotations

import numpy as np
import pytest

import symdl as sd
from symdl.nn import Input, Model

from helpers import assert_close

BACKENDS = ["numpy", "cpu"]


def block(d=3, name="block"):
    """x -> tanh(Dense(d + 1)) -> Dense(d): a residual branch as a model of its own."""
    x = Input(shape=(d,))
    return Model(x, sd.nn.Dense(d)(sd.nn.Dense(d + 1, activation="tanh")(x)), name=name)


def outer(inner, d=3):
    """The inner model called twice (shared) with skips: z -> z + inner(z) -> h + inner(h) -> Dense(2)."""
    z = Input(shape=(d,))
    h = inner(z) + z
    h = inner(h) + h
    return Model(z, sd.nn.Dense(2)(h))


def _compiled(d=3, backend="numpy"):
    model = outer(block(d), d)
    model.compile(loss="mse", optimizer="sgd", backend=backend, dtype="float64")
    return model


def _arrays(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.normal(size=(n, model.input_dim)), "y": rng.normal(size=(n, model.units))}
    for p in model.params:
        arrays[str(p.name)] = rng.normal(scale=0.7, size=p.value_shape)
    return arrays


def test_parameters_are_named_by_the_models_place_and_theirs():
    model = _compiled()
    assert [str(p.name) for p in model.params] == ["W1_1", "b1_1", "W1_2", "b1_2", "W4", "b4"]
    text = model.summary(print_fn=None)
    rows = {line.split()[0]: line for line in text.splitlines()[3:]}
    assert list(rows)[:4] == ["block", "add_1", "add_2", "dense_1"]  # the inner model is one row ...
    assert rows["block"].split()[1:5] == ["(n,", "3)", "31", "2"]  # ... with its 16 + 15 parameters
    assert rows["add_2"].endswith("block, add_1") and rows["dense_1"].endswith("add_2")
    assert "total params: 39" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_pytorch_autograd(backend):
    torch = pytest.importorskip("torch")
    model = _compiled()
    arrays = _arrays(model, seed=1)
    names = [str(p.name) for p in model.params]
    value, grads = sd.value_and_grad(model.loss, model.params, backend=backend, dtype="float64")(**arrays)
    T = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in names) for k, v in arrays.items()}

    def inner(h):
        return torch.tanh(h @ T["W1_1"] + T["b1_1"]) @ T["W1_2"] + T["b1_2"]

    h = inner(T["x"]) + T["x"]
    h = inner(h) + h
    loss = ((h @ T["W4"] + T["b4"] - T["y"]) ** 2).mean()
    loss.backward()
    assert value == pytest.approx(loss.item(), rel=1e-10)
    for k in names:
        assert_close(grads[k], T[k].grad.numpy(), 1e-8, what=f"{k} on {backend}")


def test_gradients_match_finite_differences():
    model = _compiled()
    report = sd.check_grad(model.loss, model.params, _arrays(model, seed=2))
    assert report.passed, str(report)


def test_gradients_proved_by_sympy_on_tiny_shapes():
    model = _compiled(1)
    proof = sd.prove(model.loss, model.params, {"n": 1})
    assert proof.proved, str(proof)


def test_weights_are_shared_with_the_inner_model():
    inner = block()
    inner.compile(loss="mse", backend="numpy", dtype="float64", seed=5)
    model = outer(inner)
    model.compile(loss="mse", optimizer=sd.optim.Adam(0.05), backend="numpy", dtype="float64")
    start = inner.get_weights()
    assert_close(model.get_weights()["W1_1"], start["W1"], 0)  # the outer model starts from the inner's weights
    X = np.random.default_rng(0).normal(size=(64, 3))
    model.fit(X, X[:, :2] * 2, epochs=2, batch_size=16, verbose=0)
    trained = model.get_weights()
    assert not np.allclose(trained["W1_1"], start["W1"])
    for a, b in [("W1", "W1_1"), ("b1", "b1_1"), ("W2", "W1_2"), ("b2", "b1_2")]:
        assert_close(inner.get_weights()[a], trained[b], 0, what=a)  # ... and gives the trained ones back
    assert_close(inner.predict(X[:5]), np.tanh(X[:5] @ trained["W1_1"] + trained["b1_1"]) @ trained["W1_2"]
                 + trained["b1_2"], 1e-12)
    model.set_weights({"b1_2": np.ones(3)})
    assert_close(inner.get_weights()["b2"], np.ones(3), 0)


def test_an_inner_model_compiled_later_starts_from_the_outer_weights_and_trains_them():
    inner = block()
    model = outer(inner)
    model.compile(loss="mse", backend="numpy", dtype="float64", seed=1)
    inner.compile(loss="mse", optimizer=sd.optim.SGD(0.1), backend="numpy", dtype="float64", seed=2)
    w = model.get_weights()
    assert_close(inner.get_weights()["W2"], w["W1_2"], 0)
    X = np.random.default_rng(1).normal(size=(32, 3))
    inner.fit(X, X * 0.5, epochs=2, verbose=0)  # training the inner model changes the outer's weights
    trained = inner.get_weights()
    assert not np.allclose(trained["W2"], w["W1_2"])
    assert_close(model.get_weights()["W1_2"], trained["W2"], 0)
    assert_close(model.get_weights()["W4"], w["W4"], 0)  # the outer model's own layers are untouched
    inner.set_weights({"b1": np.full(4, 0.5)})
    assert_close(model.get_weights()["b1_1"], np.full(4, 0.5), 0)


def test_a_nested_model_with_batch_norm_and_dropout_trains_saves_and_loads(tmp_path):
    x = Input(shape=(4,))
    h = sd.nn.Dropout(0.2)(sd.nn.BatchNormalization()(sd.nn.Dense(6, activation="relu")(x)))
    features = Model(x, h, name="features")
    z = Input(shape=(4,))
    model = Model(z, sd.nn.Dense(2)(features(z)), name="classifier")
    assert {"moving_mean1_2", "moving_var1_2"} == {str(s.name) for s in model.writes}
    X, y = sd.datasets.moons(120, seed=0)
    X = np.concatenate([X, X ** 2], axis=1)
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.03), backend="numpy", seed=1)
    model.fit(X, y, epochs=8, verbose=0)
    assert model.evaluate(X, y)["accuracy"] > 0.8
    assert "non-trainable params: 12" in model.summary(print_fn=None)
    model.save(tmp_path / "nested.symdl")
    loaded = sd.nn.load(tmp_path / "nested.symdl")
    assert type(loaded.layers[0]) is Model and loaded.layer_names[0] == "features"
    assert_close(loaded.predict(X), model.predict(X), 1e-6)


def test_errors_name_the_model_and_shapes():
    inner = block(name="res")
    with pytest.raises(ValueError, match=r"Model 'res' takes \(None, 3\), got \(None, 4\)"):
        inner(Input(shape=(4,)))
    a = Input(shape=(2,))
    two = Model(a, [sd.nn.Dense(1)(a), sd.nn.Dense(1)(a)], name="two")
    with pytest.raises(ValueError, match="Model 'two': a model with 2 outputs cannot be used as a layer"):
        two(Input(shape=(2,)))
    with pytest.raises(TypeError, match="takes one tensor"):
        inner([Input(shape=(3,)), Input(shape=(3,))])
    x = Input(shape=(3,))
    with_bn = Model(x, sd.nn.BatchNormalization()(x), name="bn")
    z = Input(shape=(3,))
    with pytest.raises(ValueError, match="Model 'bn' is called a second time"):
        Model(z, with_bn(with_bn(z)))


def test_an_unnamed_compiled_model_is_a_functional_row():
    x = Input(shape=(3,))
    inner = Model(x, sd.nn.Dense(3)(x))
    inner.compile(loss="mse", backend="numpy")  # its kind is then its loss's ("regression") ...
    z = Input(shape=(3,))
    model = Model(z, inner(inner(z)))
    assert model.layer_names == ["functional_1"]  # ... its row is still Keras's "functional_1"
    row = next(line for line in model.summary(print_fn=None).splitlines() if line.startswith("functional_1"))
    assert row.split() == ["functional_1", "(n,", "3)", "12", "1", "layer", "input_layer"]


def test_a_two_input_model_as_a_layer():
    p, q = Input(shape=(2,)), Input(shape=(2,))
    diff = Model([p, q], sd.nn.Dense(2, use_bias=False)(sd.nn.Subtract()([p, q])), name="diff")
    u, v = Input(shape=(2,), name="u"), Input(shape=(2,), name="v")
    model = Model([u, v], diff([u, v]))
    model.compile(loss="mse", backend="numpy", dtype="float64")
    U, V = np.eye(2), np.ones((2, 2))
    assert_close(model.predict([U, V]), (U - V) @ model.get_weights()["W1_2"], 1e-12)


def test_a_model_inside_sequential_saves_and_loads(tmp_path):
    x = Input(shape=(3,))
    encoder = Model(x, sd.nn.Dense(4, activation="relu")(x), name="enc")
    model = sd.nn.Sequential([encoder, sd.nn.Dense(2)], input_dim=3)
    model.compile(loss="mse", backend="numpy", dtype="float64")
    assert [str(p.name) for p in model.params] == ["W1_1", "b1_1", "W2", "b2"]
    assert model.summary(print_fn=None).splitlines()[3].split() == ["enc", "(n,", "4)", "16", "1", "layer"]
    model.save(tmp_path / "seq.symdl")
    loaded = sd.nn.load(tmp_path / "seq.symdl")
    X = np.random.default_rng(0).normal(size=(4, 3))
    assert type(loaded) is sd.nn.Sequential and type(loaded.layers[0]) is Model
    assert_close(loaded.predict(X), model.predict(X), 0)
