"""Functional models with several inputs and outputs (Keras 3's ``Model(inputs=[a, b], outputs=[y1, y2])``):
per-output losses with weights (oracles: finite differences, SymPy scalar proof, PyTorch autograd),
fit / evaluate / predict on lists and dicts of arrays, summary, save / load, get / set_weights,
and the errors for mismatched counts, unknown names and arrays of the wrong count or shape."""
from __future__ import annotations

import numpy as np
import pytest

import symdl as sd
from symdl.nn import Input, Model

from helpers import assert_close

BACKENDS = ["numpy", "cpu"]


def two_heads(da=3, db=2, as_dict=False):
    """Inputs a, b -> h = tanh(Dense([a, b])); a regression head on h and a classifier on h + Dense(b)."""
    a, b = Input(shape=(da,), name="a"), Input(shape=(db,), name="b")
    h = sd.nn.Dense(da, activation="tanh")(sd.nn.Concatenate()([a, b]))
    score = sd.nn.Dense(1)(h)
    label = sd.nn.Dense(2)(h + sd.nn.Dense(da)(b))
    outputs = {"score": score, "label": label} if as_dict else [score, label]
    return Model({"a": a, "b": b} if as_dict else [a, b], outputs, name="heads")


WEIGHTS = [0.3, 2.0]


def _compiled(*size, backend="numpy", as_dict=False):
    model = two_heads(*size, as_dict=as_dict)
    names = model.output_names
    model.compile(loss={names[0]: "mse", names[1]: "softmax_cross_entropy"},
                  loss_weights=dict(zip(names, WEIGHTS)), optimizer="sgd", backend=backend, dtype="float64")
    return model


def _arrays(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {str(x.name): rng.normal(size=(n, int(x.shape[1]))) for x in model.xs}
    arrays["y1"] = rng.normal(size=(n, 1))
    arrays["y2"] = np.eye(2)[rng.integers(0, 2, n)]
    for p in model.params:
        arrays[str(p.name)] = rng.normal(scale=0.7, size=p.value_shape)
    return arrays


def test_names_leaves_and_parameters():
    model = _compiled()
    assert model.input_names == ["a", "b"] and model.output_names == ["dense_2", "dense_4"]
    assert [str(x.name) for x in model.xs] == ["x1", "x2"] and [str(y.name) for y in model.ys] == ["y1", "y2"]
    assert [str(p.name) for p in model.params] == ["W2", "b2", "W3", "b3", "W4", "b4", "W6", "b6"]
    keyed = _compiled(as_dict=True)
    assert keyed.output_names == ["score", "label"]


# --------------------------------------------------------------------------- gradient oracles


def _torch_loss(T):
    import torch

    h = torch.tanh(torch.cat([T["x1"], T["x2"]], dim=1) @ T["W2"] + T["b2"])
    score = h @ T["W3"] + T["b3"]
    label = (h + T["x2"] @ T["W4"] + T["b4"]) @ T["W6"] + T["b6"]
    mse = ((score - T["y1"]) ** 2).mean()
    ce = torch.nn.functional.cross_entropy(label, T["y2"].argmax(1))
    return WEIGHTS[0] * mse + WEIGHTS[1] * ce


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_losses_match_pytorch_autograd(backend):
    torch = pytest.importorskip("torch")
    model = _compiled()
    arrays = _arrays(model, n=5, seed=1)
    names = [str(p.name) for p in model.params]
    value, grads = sd.value_and_grad(model.loss, model.params, backend=backend, dtype="float64")(**arrays)
    T = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in names) for k, v in arrays.items()}
    loss = _torch_loss(T)
    loss.backward()
    assert value == pytest.approx(loss.item(), rel=1e-10)
    for k in names:
        assert_close(grads[k], T[k].grad.numpy(), 1e-8, what=f"{k} on {backend}")


def test_weighted_losses_match_finite_differences():
    model = _compiled()
    report = sd.check_grad(model.loss, model.params, _arrays(model, seed=2))
    assert report.passed, str(report)


def test_weighted_losses_proved_by_sympy_on_tiny_shapes():
    model = _compiled(2, 1)
    proof = sd.prove(model.loss, model.params, {"n": 1})
    assert proof.proved, str(proof)


def test_a_loss_weight_scales_its_outputs_gradient_only():
    """Weight 0 on the classifier: the gradient of its last layer is zero, the regression head's is not."""
    model = two_heads()
    model.compile(loss=["mse", "softmax_cross_entropy"], loss_weights=[1.0, 0.0], backend="numpy", dtype="float64")
    arrays = _arrays(model, seed=3)
    del arrays["y2"]  # the classifier's loss is not in the graph
    _, grads = sd.value_and_grad(model.loss, model.params, backend="numpy", dtype="float64")(**arrays)
    assert not grads["W6"].any() and grads["W3"].any()
    A, B, s, l = _data(40)
    model.fit([A, B], [s, l], epochs=1, verbose=0)  # its targets are checked, then not fed to the step
    assert model.evaluate([A, B], [s, l])["dense_4_loss"] > 0


# --------------------------------------------------------------------------- training and the API


def _data(n=240, seed=0):
    rng = np.random.default_rng(seed)
    A, B = rng.normal(size=(n, 3)), rng.normal(size=(n, 2))
    return A, B, np.tanh(A.sum(1) + B[:, 0]), (A[:, 0] + B[:, 1] > 0).astype(int)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fits_on_lists_and_dicts_evaluates_and_predicts(backend):
    A, B, s, l = _data()
    model = two_heads(as_dict=True)
    model.compile(loss={"score": "mse", "label": "softmax_cross_entropy"}, loss_weights={"score": 1.0, "label": 0.5},
                  optimizer=sd.optim.Adam(0.03), backend=backend, seed=0)
    before = model.evaluate({"a": A, "b": B}, {"score": s, "label": l})
    history = model.fit({"a": A, "b": B}, {"score": s, "label": l}, epochs=25, batch_size=32, verbose=0,
                        validation_data=([A[:40], B[:40]], [s[:40], l[:40]]))
    assert set(history.history) == {"loss", "score_loss", "label_loss", "label_accuracy", "val_loss", "val_score_loss",
                                    "val_label_loss", "val_label_accuracy", "lr"}
    last = {k: v[-1] for k, v in history.history.items()}  # each epoch's mean over its batches
    assert last["loss"] == pytest.approx(last["score_loss"] + 0.5 * last["label_loss"], rel=1e-5)
    after = model.evaluate([A, B], [s, l])
    assert set(after) == {"loss", "score_loss", "label_loss", "label_accuracy"}
    assert after["loss"] < 0.5 * before["loss"] and after["label_accuracy"] > 0.85
    assert after["loss"] == pytest.approx(after["score_loss"] + 0.5 * after["label_loss"], rel=1e-5)
    out = model.predict({"a": A, "b": B}, batch_size=100)  # outputs given as a dict: a dict back
    assert list(out) == ["score", "label"] and out["score"].shape == (240, 1) and out["label"].shape == (240, 2)
    w = model.get_weights()
    h = np.tanh(np.concatenate([A, B], axis=1) @ w["W2"] + w["b2"])
    assert_close(out["score"], h @ w["W3"] + w["b3"], 1e-4)
    assert_close(out["label"], (h + B @ w["W4"] + w["b4"]) @ w["W6"] + w["b6"], 1e-4)


def test_predict_returns_a_list_for_outputs_given_as_a_list():
    A, B, s, l = _data(20)
    model = _compiled()
    out = model.predict([A, B])
    assert isinstance(out, list) and [o.shape for o in out] == [(20, 1), (20, 2)]
    assert_close(model.predict({"a": A, "b": B})[1], out[1], 1e-12)


def test_summary_shows_inputs_outputs_and_what_feeds_each():
    text = _compiled().summary(print_fn=None)
    assert "Model 'heads' (inputs a (None, 3), b (None, 2))" in text
    rows = {line.split()[0]: line for line in text.splitlines()[3:]}
    assert rows["concatenate_1"].endswith("a, b") and rows["dense_3"].endswith(" b")
    assert rows["add_1"].endswith("dense_1, dense_3")  # h + Dense(b): both feed the Add
    assert rows["dense_4"].endswith("add_1") and rows["dense_2"].endswith("dense_1")
    assert "outputs: dense_2, dense_4" in text and "total params: 39" in text


@pytest.mark.parametrize("as_dict", [False, True])
def test_save_load_and_weights(tmp_path, as_dict):
    A, B, s, l = _data(60)
    model = two_heads(as_dict=as_dict)
    names = model.output_names
    weights = {names[0]: np.float32(0.5), names[1]: 2} if as_dict else [np.float32(0.5), 2]  # numbers of any kind
    model.compile(loss=["mse", "softmax_cross_entropy"], loss_weights=weights, backend="numpy", dtype="float64")
    X, Y = [A, B], [s, l]
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0)
    model.save(tmp_path / "heads.symdl")
    loaded = sd.nn.load(tmp_path / "heads.symdl")
    assert loaded.input_names == model.input_names and loaded.output_names == model.output_names
    assert loaded.loss_weights == ({names[0]: 0.5, names[1]: 2.0} if as_dict else [0.5, 2.0])
    a, b = model.predict(X), loaded.predict(X)
    for k in (range(2) if not as_dict else ["score", "label"]):
        assert_close(b[k], a[k], 1e-12)
    assert loaded.evaluate(X, Y)["loss"] == pytest.approx(model.evaluate(X, Y)["loss"], rel=1e-12)
    loaded.set_weights({k: np.zeros_like(v) for k, v in model.get_weights().items()})
    assert not np.any(loaded.predict(X)[0 if not as_dict else "score"])
    loaded.fit(X, Y, epochs=1, verbose=0)
    assert loaded.epoch == 3


def test_images_and_features_as_two_inputs():
    img, meta = Input(shape=(4, 4, 1), name="img"), Input(shape=(2,), name="meta")
    pooled = sd.nn.GlobalAveragePooling2D()(sd.nn.Conv2D(2, 3, padding="same", activation="relu")(img))
    model = Model([img, meta], sd.nn.Dense(2)(sd.nn.Concatenate()([pooled, meta])))
    model.compile(loss="softmax_cross_entropy", backend="numpy", dtype="float64")
    rng = np.random.default_rng(0)
    I, M = rng.normal(size=(8, 4, 4, 1)), rng.normal(size=(8, 2))
    model.fit([I, M], rng.integers(0, 2, 8), epochs=1, verbose=0)
    w = model.get_weights()
    torch = pytest.importorskip("torch")
    z = torch.nn.functional.conv2d(torch.tensor(I).permute(0, 3, 1, 2), torch.tensor(w["K1"]).permute(3, 2, 0, 1),
                                   torch.tensor(w["b1"]), padding=1).relu().mean(dim=(2, 3)).numpy()
    assert_close(model.predict([I, M]), np.concatenate([z, M], axis=1) @ w["W4"] + w["b4"], 1e-10)


# --------------------------------------------------------------------------- errors


def test_compile_errors_name_the_outputs():
    model = two_heads()
    with pytest.raises(ValueError, match=r"3 loss value\(s\) for 2 output\(s\) \('dense_2', 'dense_4'\)"):
        model.compile(loss=["mse", "mse", "mse"], backend="numpy")
    with pytest.raises(ValueError, match=r"loss names the output\(s\) 'score'; the model's outputs are 'dense_2', "
                                         r"'dense_4'"):
        model.compile(loss={"score": "mse", "dense_4": "mse"}, backend="numpy")
    with pytest.raises(ValueError, match=r"loss gives none for the output\(s\) 'dense_4'"):
        model.compile(loss={"dense_2": "mse"}, backend="numpy")
    with pytest.raises(ValueError, match=r"1 loss_weights value\(s\) for 2 output\(s\)"):
        model.compile(loss="mse", loss_weights=[1.0], backend="numpy")
    with pytest.raises(ValueError, match=r"loss_weights names the output\(s\) 'nope'"):
        model.compile(loss="mse", loss_weights={"nope": 1.0}, backend="numpy")
    with pytest.raises(ValueError, match="loss weight of output 'dense_4' must be a finite number >= 0"):
        model.compile(loss="mse", loss_weights=[1.0, -1.0], backend="numpy")
    with pytest.raises(ValueError, match="loss_weights must be a list or a dict for 2 outputs"):
        model.compile(loss="mse", loss_weights=2.0, backend="numpy")


def test_data_errors_name_the_inputs_outputs_and_shapes():
    A, B, s, l = _data(10)
    model = _compiled()
    DataError = sd.nn.datasets.DataError
    with pytest.raises(DataError, match=r"1 input array\(s\) for the model's 2 inputs \('a', 'b'\)"):
        model.fit([A], [s, l], verbose=0)
    with pytest.raises(DataError, match=r"the model has 2 inputs \('a', 'b'\): give a list or a dict of 2 arrays"):
        model.predict(A)
    with pytest.raises(DataError, match=r"the input arrays are keyed 'a', 'c'; the model's inputs are 'a', 'b'"):
        model.predict({"a": A, "c": B})
    with pytest.raises(DataError, match=r"\(input 'b'\): X has 3 features, the model expects 2"):
        model.predict([A, A])
    with pytest.raises(DataError, match=r"different numbers of rows: \{'a': 10, 'b': 9\}"):
        model.predict([A, B[:9]])
    with pytest.raises(DataError, match=r"3 output array\(s\) for the model's 2 outputs"):
        model.evaluate([A, B], [s, l, l])
    with pytest.raises(DataError, match=r"\(output 'dense_4'\): labels must lie in 0..1"):
        model.fit([A, B], [s, l + 5], verbose=0)
    with pytest.raises(DataError, match=r"\(output 'dense_2'\): X has 10 rows but y has 4"):
        model.fit([A, B], [s[:4], l], verbose=0)


def test_graph_errors_for_several_inputs():
    a, b, c = Input(shape=(2,), name="a"), Input(shape=(2,), name="b"), Input(shape=(2,), name="c")
    with pytest.raises(ValueError, match=r"depends on the Input 'c' \(None, 2\), which is not one of the model's "
                                         r"inputs 'a', 'b'"):
        Model([a, b], [sd.nn.Dense(1)(a), sd.nn.Add()([b, c])])
    with pytest.raises(ValueError, match=r"the input 'b' \(None, 2\) is not used by any output"):
        Model([a, b], [sd.nn.Dense(1)(a), sd.nn.Dense(1)(a)])
    with pytest.raises(ValueError, match="an Input is given twice"):
        Model([a, a], sd.nn.Dense(1)(a))
    with pytest.raises(ValueError, match="outputs is empty"):
        Model(a, [])
    with pytest.raises(ValueError, match="fit\\(cluster=...\\) trains models with one input and one output"):
        m = Model([a, b], sd.nn.Add()([a, b]))
        m.compile(loss="mse", backend="numpy")
        m.fit([np.zeros((2, 2))] * 2, np.zeros((2, 2)), cluster=object(), verbose=0)


def test_two_unnamed_inputs_get_keras_names():
    x1, x2 = Input(shape=(2,)), Input(shape=(2,))
    model = Model([x1, x2], sd.nn.Subtract()([x1, x2]))
    assert model.input_names == ["input_layer", "input_layer_1"]
    model.compile(loss="mse", backend="numpy", dtype="float64")
    P, Q = np.ones((3, 2)), np.arange(6.0).reshape(3, 2)
    assert_close(model.predict({"input_layer": P, "input_layer_1": Q}), P - Q, 0)
