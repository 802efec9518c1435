"""Token models through ``sd.nn.Model`` (issue 27): what a Keras user writes for a per-token classifier.

``Input(shape=(T,), dtype="int32")`` ids ``(n, T)``, integer targets ``(n, T)`` (or one-hot ``(n, T, V)``),
``fit`` / ``evaluate`` / ``predict`` (``(n, T, V)``), batches of whole sequences, errors before anything
compiles, seeded weights, checkpoints and ONNX export. Oracle: the same model in PyTorch
(``nn.Embedding`` + positions + ``Linear`` + GELU + ``LayerNorm``, weights copied): the same loss and
gradients (float64, 1e-8) and the same weights after one SGD step of ``fit``.
"""
from __future__ import annotations

import numpy as np
import pytest

import symdl as sd
from helpers import assert_close
from symdl.nn.datasets import DataError

V, T, D = 7, 4, 3  # vocabulary, sequence length, width


def _model(V=V, T=T, D=D, out=None):
    inp = sd.nn.Input(shape=(T,), dtype="int32")
    h = sd.nn.TokenAndPositionEmbedding(V, T, D)(inp)
    h = sd.nn.LayerNormalization()(sd.nn.Dense(D, activation="gelu")(h))
    return sd.nn.Model(inp, sd.nn.Dense(out or V)(h))


def _data(n=6, seed=0, V=V, T=T):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, V, size=(n, T)).astype(np.int32)
    return X, np.roll(X, 1, axis=1)  # predict the previous token (the first: the last)


def _random_weights(model, seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(scale=0.7, size=v.shape) for k, v in model.get_weights().items()}


# --------------------------------------------------------------------------- the Keras path


def test_fit_evaluate_predict_with_integer_targets_per_token():
    model = _model()
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.AdamW(1e-3), backend="numpy", dtype="float64")
    X, Y = _data(n=24)
    history = model.fit(X, Y, epochs=2, batch_size=12, verbose=0)
    assert len(history["loss"]) == 2 and 0 <= history["accuracy"][-1] <= 1
    out = model.predict(X)
    assert out.shape == (24, T, V)
    logs = model.evaluate(X, Y)
    # the loss is PyTorch's CrossEntropyLoss on (n·T, V): the mean over every token
    z = out.reshape(-1, V)
    logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    assert logs["loss"] == pytest.approx(-logp[np.arange(z.shape[0]), Y.ravel()].mean(), rel=1e-10)
    assert logs["accuracy"] == pytest.approx(np.mean(out.argmax(-1) == Y))
    one_hot = model.evaluate(X, np.eye(V)[Y])
    assert one_hot["loss"] == pytest.approx(logs["loss"], rel=1e-12) and one_hot["accuracy"] == logs["accuracy"]
    history = model.fit(X, Y, epochs=1, batch_size=6, validation_split=0.25, verbose=0)
    assert {"val_loss", "val_accuracy"} <= set(history.history)
    model.fit(X[:12], Y[:12], epochs=1, validation_data=(X[12:], Y[12:]), verbose=0)


def test_batches_are_whole_sequences():
    """``batch_size`` counts sequences: predicting in chunks of 5 gives what one chunk gives."""
    model = _model()
    model.compile(backend="numpy", dtype="float64")
    X, Y = _data(n=13)
    assert_close(model.predict(X, batch_size=5), model.predict(X), 1e-12)
    assert model.evaluate(X, Y, batch_size=4)["loss"] == pytest.approx(model.evaluate(X, Y)["loss"], rel=1e-12)


def test_a_fit_on_a_tiny_generated_task_lowers_the_loss():
    """Each token's successor (mod V): learnable per token (no attention mixes tokens here)."""
    model = _model(D=16)
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.02), backend="numpy")
    X, _ = _data(n=96, seed=3)
    Y = (X + 1) % V
    before = model.evaluate(X, Y)["loss"]
    model.fit(X, Y, epochs=15, batch_size=16, verbose=0)
    after = model.evaluate(X, Y)
    assert after["loss"] < 0.5 * before and after["accuracy"] > 0.9


def test_cpu_backend_trains_as_numpy_does():
    X, Y = _data(n=10)
    runs = []
    for backend in ("numpy", "cpu"):
        model = _model()
        model.compile(optimizer=sd.optim.Adam(0.01), backend=backend, dtype="float64")
        model.fit(X, Y, epochs=2, batch_size=4, verbose=0)
        runs.append((model.get_weights(), model.predict(X)))
    for k in runs[0][0]:
        assert_close(runs[1][0][k], runs[0][0][k], 1e-10, what=k)
    assert_close(runs[1][1], runs[0][1], 1e-10)


def test_sequential_with_an_int_input():
    X, Y = _data(n=8)
    model = sd.nn.Sequential([sd.nn.Input(shape=(T,), dtype="int32"), sd.nn.Embedding(V, 8), sd.nn.Dense(V)])
    model.compile(backend="numpy")
    model.fit(X, Y, epochs=1, batch_size=4, verbose=0)
    assert model.predict(X).shape == (8, T, V)
    assert "(n, 4, 8)" in model.summary(print_fn=None) and "dtype=int32" in model.summary(print_fn=None)
    with pytest.raises(ValueError, match="not both"):
        sd.nn.Sequential([sd.nn.Input(shape=(T,), dtype="int32"), sd.nn.Embedding(V, 8)], input_dim=4)


def test_per_token_regression_targets():
    """mse on a sequence output (n, T, d): targets (n, T, d), or (n, T) when d is 1."""
    inp = sd.nn.Input(shape=(T,), dtype="int32")
    model = sd.nn.Model(inp, sd.nn.Dense(2)(sd.nn.Embedding(V, 3)(inp)))
    model.compile(loss="mse", backend="numpy", dtype="float64")
    X, _ = _data(n=5)
    target = np.random.default_rng(0).normal(size=(5, T, 2))
    out = model.predict(X)
    assert model.evaluate(X, target)["loss"] == pytest.approx(np.mean((out - target) ** 2), rel=1e-12)
    model.fit(X, target, epochs=1, verbose=0)
    with pytest.raises(DataError, match=r"y must have shape \(n, 4, 2\) per token, got \(5, 4\)"):
        model.fit(X, target[..., 0], verbose=0)
    one = sd.nn.Model(inp, sd.nn.Dense(1)(sd.nn.Embedding(V, 3)(inp)))
    one.compile(loss="mse", backend="numpy", dtype="float64")
    assert one.evaluate(X, target[..., 0])["loss"] == pytest.approx(one.evaluate(X, target[..., :1])["loss"])


# --------------------------------------------------------------------------- bad input


def test_bad_data_is_a_clear_error_before_anything_compiles():
    model = _model()
    model.compile(backend="cpu")
    X, Y = _data(n=4)
    bad = X.copy()
    bad[2, 1] = V
    with pytest.raises(DataError, match=r"TokenAndPositionEmbedding layer 1: token id 7 at X\[2, 1\] is outside "
                                        r"\[0, 7\)"):
        model.fit(bad, Y, verbose=0)
    with pytest.raises(DataError, match="outside"):
        model.predict(-X)
    with pytest.raises(DataError, match=r"X has shape \(4, 3\); the model reads token ids \(n, 4\)"):
        model.fit(X[:, :3], Y, verbose=0)
    with pytest.raises(DataError, match=r"expected an integer array \(n, 4\), got float64"):
        model.predict(X.astype(np.float64))
    with pytest.raises(DataError, match=r"y must be labels \(n, 4\) or one-hot \(n, 4, 7\) per token, got shape "
                                        r"\(4, 7\)"):
        model.fit(X, np.eye(V)[Y[:, 0]], verbose=0)
    with pytest.raises(DataError, match=r"labels must lie in 0..6"):
        model.evaluate(X, Y + V)
    with pytest.raises(DataError, match=r"X has 4 rows but y has 3"):
        model.fit(X, Y[:3], verbose=0)
    assert model.train_step.last_n is None and not model._forward  # no step ran, no forward program was built


# --------------------------------------------------------------------------- weights


def test_initial_weights_follow_the_compile_seed():
    a, b, c = _model(), _model(), _model()
    a.compile(backend="numpy", seed=0); b.compile(backend="numpy", seed=0); c.compile(backend="numpy", seed=1)
    wa, wb, wc = a.get_weights(), b.get_weights(), c.get_weights()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k
    for k in ("embeddings1", "position_embeddings1", "W2"):
        assert not np.array_equal(wa[k], wc[k]), k
    assert np.abs(wa["embeddings1"]).max() <= 0.05  # Keras's RandomUniform(-0.05, 0.05)


def test_save_load_and_safetensors_round_trip(tmp_path):
    model = _model()
    model.compile(optimizer=sd.optim.Adam(0.01), backend="numpy")
    X, Y = _data(n=6)
    model.fit(X, Y, epochs=1, batch_size=3, verbose=0)
    model.save(tmp_path / "m.symdl")
    again = sd.nn.load(tmp_path / "m.symdl")
    assert np.array_equal(again.predict(X), model.predict(X))
    again.fit(X, Y, epochs=1, batch_size=3, verbose=0)
    model.fit(X, Y, epochs=1, batch_size=3, verbose=0)
    assert_close(again.predict(X), model.predict(X), 1e-6)
    model.save_weights(tmp_path / "w.safetensors")
    fresh = _model()
    fresh.compile(backend="numpy", seed=5)
    fresh.load_weights(tmp_path / "w.safetensors")
    assert np.array_equal(fresh.predict(X), model.predict(X))


def test_onnx_export_forward_and_gradients(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model()
    model.compile(optimizer=sd.optim.SGD(0.1), backend="numpy")
    X, Y = _data(n=5)
    model.set_weights({k: v.astype(np.float32) for k, v in _random_weights(model).items()})
    model.export(tmp_path / "m.onnx", format="onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (ids,), (out,) = session.get_inputs(), session.get_outputs()
    assert (ids.name, ids.type, ids.shape) == ("input_layer", "tensor(int64)", ["batch", T])
    assert out.shape == ["batch", T, V]
    got, = session.run(None, {"input_layer": X.astype(np.int64)})
    assert_close(got, model.predict(X), 1e-5)
    model.export(tmp_path / "g.onnx", gradients=True)
    session = ort.InferenceSession(str(tmp_path / "g.onnx"))
    results = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"input_layer": X.astype(np.int64),
                                          "target": np.eye(V, dtype=np.float32)[Y]})))
    f = sd.value_and_grad(model.loss, model.params, backend="numpy", dtype="float64")
    loss, grads = f(x=X, y=np.eye(V)[Y], **model.get_weights())
    assert results["loss"] == pytest.approx(loss, rel=1e-5)
    assert_close(results["grad/token_and_position_embedding_1/embeddings"], grads["embeddings1"], 1e-5)
    assert_close(results["grad/dense_2/kernel"], grads["W4"], 1e-5)


# --------------------------------------------------------------------------- the PyTorch oracle


def _torch_twin(torch, w):
    """The same model in PyTorch, float64, with symdl's weights ``w`` copied."""
    emb, pos = torch.nn.Embedding(V, D).double(), torch.nn.Parameter(torch.from_numpy(w["position_embeddings1"]))
    lin1, norm, lin2 = torch.nn.Linear(D, D).double(), torch.nn.LayerNorm(D, eps=1e-3).double(), \
        torch.nn.Linear(D, V).double()
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(w["embeddings1"]))
        lin1.weight.copy_(torch.from_numpy(w["W2"].T)); lin1.bias.copy_(torch.from_numpy(w["b2"]))
        norm.weight.copy_(torch.from_numpy(w["gamma3"])); norm.bias.copy_(torch.from_numpy(w["beta3"]))
        lin2.weight.copy_(torch.from_numpy(w["W4"].T)); lin2.bias.copy_(torch.from_numpy(w["b4"]))

    def forward(ids):
        h = emb(ids) + pos[: ids.shape[1]]
        return lin2(norm(torch.nn.functional.gelu(lin1(h))))

    params = {"embeddings1": emb.weight, "position_embeddings1": pos, "W2": lin1.weight, "b2": lin1.bias,
              "gamma3": norm.weight, "beta3": norm.bias, "W4": lin2.weight, "b4": lin2.bias}
    return forward, params


def _as_symdl(name, a):
    return a.T if name in ("W2", "W4") else a  # torch Linear is (out, in)


def test_loss_and_gradients_match_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch is the autograd oracle")
    model = _model()
    model.compile(backend="numpy", dtype="float64")
    w = _random_weights(model)
    X, Y = _data(n=5)
    X[0, :2] = 3  # a repeated id
    f = sd.value_and_grad(model.loss, model.params, backend="numpy", dtype="float64")
    loss, grads = f(x=X, y=np.eye(V)[Y], **w)
    forward, params = _torch_twin(torch, w)
    logits = forward(torch.from_numpy(X.astype(np.int64)))
    ref = torch.nn.CrossEntropyLoss()(logits.reshape(-1, V), torch.from_numpy(Y.astype(np.int64)).reshape(-1))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    for name, p in params.items():
        assert_close(grads[name], _as_symdl(name, p.grad.numpy()), 1e-8, what=name)


def test_one_sgd_step_of_fit_matches_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch is the autograd oracle")
    model = _model()
    model.compile(optimizer=sd.optim.SGD(0.5), backend="numpy", dtype="float64")
    w = _random_weights(model)
    model.set_weights(w)
    X, Y = _data(n=6)
    model.fit(X, Y, epochs=1, batch_size=len(X), shuffle=False, verbose=0)
    forward, params = _torch_twin(torch, w)
    opt = torch.optim.SGD(list(params.values()), lr=0.5)
    loss = torch.nn.CrossEntropyLoss()(forward(torch.from_numpy(X.astype(np.int64))).reshape(-1, V),
                                       torch.from_numpy(Y.astype(np.int64)).reshape(-1))
    loss.backward()
    opt.step()
    assert model.history["loss"][0] == pytest.approx(loss.item(), rel=1e-12)
    got = model.get_weights()
    for name, p in params.items():
        assert_close(got[name], _as_symdl(name, p.detach().numpy()), 1e-8, what=name)
