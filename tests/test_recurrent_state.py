"""``return_state=True`` (issue 28): a recurrent layer returns ``[output, state_h]`` (SimpleRNN, GRU) or
``[output, state_h, state_c]`` (LSTM), and ``Bidirectional`` ``[output, forward states..., backward
states...]``, as Keras 3 does; the states are columns of the one scan node (no new node type).

Oracles: PyTorch's ``(output, h_n)`` / ``(output, (h_n, c_n))`` with the weights mapped from Keras's
layout (float64, 1e-8: the value and every gradient of a loss on the output and the states), finite
differences of a loss on ``c`` alone, the backends against the NumPy reference; then the functional API
(several outputs, a Dense on ``c``, a concatenation of states, save/load, configs) and Keras's weight
names for ``Bidirectional``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import symdl as sd
from helpers import assert_backend_matches_numpy, assert_close, finite_difference
from symdl.graph.nodes import sequence_input
from symdl.ops.recurrence import Scan
from test_recurrent import LAYERS, _torch_module

T, F, U = 5, 3, 4  # steps, features, units


def _state_loss(layer, T=T, F=F):
    """``layer`` (return_state=True) on sequences ``x``: mse of its output against ``y`` plus mse of each
    final state ``s{k}`` against ``ys{k}``; ``(loss, params, x, leaves {name: leaf})``."""
    x = sequence_input("x", (T, F))
    built = layer.build_both(1, x, x)
    assert isinstance(built.train, tuple)
    out, *states = built.train
    width = int(out.shape[1])
    y = sequence_input("y", (T, width)) if out.shape[0] != sd.n else sd.input("y", width)
    leaves = {"y": y}
    loss = sd.losses.mse(out, y)
    for k, s in enumerate(states):
        leaves[f"ys{k}"] = sd.input(f"ys{k}", int(s.shape[1]))
        loss = loss + sd.losses.mse(s, leaves[f"ys{k}"])
    return loss, built.params, x, leaves


def _arrays(params, x, leaves, n=3, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    arrays = {str(p.name): rng.normal(size=p.value_shape) * scale for p in params}
    arrays["x"] = rng.normal(size=(n,) + tuple(x.sequence_shape))
    for name, leaf in leaves.items():
        shape = tuple(leaf.sequence_shape) if hasattr(leaf, "sequence_shape") else (int(leaf.shape[1]),)
        arrays[name] = rng.normal(size=(n,) + shape)
    return arrays


def _keras_grads(m, kind, units, sfx_idx):
    """PyTorch's parameter gradients in Keras's layout (GRU gates ``r, z, n`` -> ``z, r, h``)."""
    def perm(a):
        if kind != "GRU":
            return a
        return np.concatenate([a[..., units: 2 * units], a[..., :units], a[..., 2 * units:]], axis=-1)

    grads = {}
    for sfx, idx in sfx_idx:
        grads[f"kernel{idx}"] = perm(getattr(m, f"weight_ih_l0{sfx}").grad.numpy().T)
        grads[f"recurrent_kernel{idx}"] = perm(getattr(m, f"weight_hh_l0{sfx}").grad.numpy().T)
        bi, bh = (perm(getattr(m, f"bias_{w}_l0{sfx}").grad.numpy()) for w in ("ih", "hh"))
        grads[f"bias{idx}"] = np.stack([bi, bh]) if kind == "GRU" else bi
    return grads


def _torch_states(out_and_states, kind):
    """PyTorch's ``(output, h_n)`` / ``(output, (h_n, c_n))`` as ``(output, [h_n, c_n])``."""
    out, st = out_and_states
    return out, (list(st) if kind == "LSTM" else [st])


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("sequences,backwards", [(False, False), (True, False), (False, True), (True, True)])
def test_states_match_pytorch(kind, sequences, backwards):
    """Values and every gradient (the input's too) of a loss on the output and the final states."""
    layer = LAYERS[kind](U, return_sequences=sequences, return_state=True, go_backwards=backwards)
    loss, params, x, leaves = _state_loss(layer)
    assert len(leaves) == (3 if kind == "LSTM" else 2)
    arrays = _arrays(params, x, leaves, seed=7)
    value, grads = sd.value_and_grad(loss, params + [x], backend="numpy", dtype="float64")(**arrays)

    m, torch = _torch_module(kind, arrays, 1, U)
    xt = torch.tensor(arrays["x"], requires_grad=True)
    out, states = _torch_states(m(torch.flip(xt, [1]) if backwards else xt), kind)
    out = out if sequences else out[:, -1]
    mse = lambda a, b: ((a - torch.from_numpy(b)) ** 2).mean()  # noqa: E731
    ref = mse(out, arrays["y"])
    for k, s in enumerate(states):
        ref = ref + mse(s[0], arrays[f"ys{k}"])
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    want = {"x": xt.grad.numpy(), **_keras_grads(m, kind, U, [("", 1)])}
    for name, g in want.items():
        assert_close(grads[name].reshape(g.shape), g, 1e-8, what=f"{kind} {name}")


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("sequences", [False, True])
def test_bidirectional_states_match_pytorch(kind, sequences):
    """``Bidirectional``: ``[merged output, forward h (c), backward h (c)]``, PyTorch's ``h_n[0]``, ``h_n[1]``."""
    layer = sd.nn.Bidirectional(LAYERS[kind](U, return_sequences=sequences, return_state=True))
    loss, params, x, leaves = _state_loss(layer)
    arrays = _arrays(params, x, leaves, seed=8)
    value, grads = sd.value_and_grad(loss, params + [x], backend="numpy", dtype="float64")(**arrays)

    m, torch = _torch_module(kind, arrays, 1, U, bidirectional=True)
    xt = torch.tensor(arrays["x"], requires_grad=True)
    out, states = _torch_states(m(xt), kind)
    if not sequences:
        out = torch.cat([out[:, -1, :U], out[:, 0, U:]], dim=1)
    ordered = [s[0] for s in states] + [s[1] for s in states]  # Keras: forward states, then backward ones
    mse = lambda a, b: ((a - torch.from_numpy(b)) ** 2).mean()  # noqa: E731
    ref = mse(out, arrays["y"])
    for k, s in enumerate(ordered):
        ref = ref + mse(s, arrays[f"ys{k}"])
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    want = {"x": xt.grad.numpy(), **_keras_grads(m, kind, U, [("", "1_forward"), ("_reverse", "1_backward")])}
    for name, g in want.items():
        assert_close(grads[name].reshape(g.shape), g, 1e-8, what=f"{kind} {name}")


@pytest.mark.parametrize("backwards", [False, True])
def test_a_loss_on_c_alone_matches_finite_differences(backwards):
    """Only the cell state reaches the loss: the gradient enters the scan through its ``c`` columns."""
    x = sequence_input("x", (4, 2))
    built = sd.nn.LSTM(3, return_state=True, go_backwards=backwards).build_both(1, x, x)
    c = built.train[2]
    yc = sd.input("yc", 3)
    loss = sd.losses.mse(sd.tanh(c), yc)
    params = built.params + [x]
    rng = np.random.default_rng(2)
    arrays = {str(p.name): rng.normal(size=p.value_shape) * 0.6 for p in built.params}
    arrays.update(x=rng.normal(size=(2, 4, 2)), yc=rng.normal(size=(2, 3)))
    f = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")
    _, grads = f(**arrays)
    for name in ("kernel1", "recurrent_kernel1", "bias1", "x"):
        assert_close(grads[name].reshape(arrays[name].shape), finite_difference(f, arrays, name), 1e-6, what=name)
        assert np.abs(grads[name]).max() > 1e-3, name  # the gradient does flow through c


def test_states_are_columns_of_the_one_scan():
    """No new node: h and c are ``last_step`` of the scan's ``[h | c]`` columns; with return_sequences=False
    ``state_h`` is the output itself (one expression)."""
    x = sequence_input("x", (T, F))
    out, h, c = sd.nn.LSTM(U, return_state=True).build_both(1, x, x).train
    assert out == h
    scans = set().union(*(e.atoms(Scan) for e in (out, h, c)))
    assert len(scans) == 1
    assert h.shape == c.shape == (sd.n, U)
    out, h = sd.nn.GRU(U, return_sequences=True, return_state=True).build_both(1, x, x).train
    assert out.shape == (T * sd.n, U) and h.shape == (sd.n, U)


# --------------------------------------------------------------------------- backends


def _backend_case(kind="LSTM", n=3, seed=0, T=4, F=2, units=3):
    layer = LAYERS[kind](units, return_sequences=True, return_state=True)
    loss, params, x, leaves = _state_loss(layer, T=T, F=F)
    return loss, params + [x], _arrays(params, x, leaves, n=n, seed=seed)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_cpu_backend_matches_numpy_on_one_and_two_threads(kind, monkeypatch):
    loss, params, arrays = _backend_case(kind)
    assert_backend_matches_numpy(loss, params, arrays, "cpu", "float64", 1e-12, threads=(1, 2),
                                 monkeypatch=monkeypatch)


def test_bidirectional_states_on_the_cpu_backend(monkeypatch):
    layer = sd.nn.Bidirectional(sd.nn.LSTM(2, return_state=True), merge_mode="sum")
    loss, params, x, leaves = _state_loss(layer, T=3, F=2)
    arrays = _arrays(params, x, leaves, n=3, seed=4)
    assert_backend_matches_numpy(loss, params + [x], arrays, "cpu", "float64", 1e-12, threads=(1, 2),
                                 monkeypatch=monkeypatch)


@pytest.mark.cudasim
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_cuda_simulator_matches_numpy(kind):
    loss, params, arrays = _backend_case(kind, n=2, T=3, units=2)
    assert_backend_matches_numpy(loss, params, arrays, "cuda")


# --------------------------------------------------------------------------- the functional API


def _three_outputs(backend="numpy"):
    x = sd.nn.Input(shape=(T, F))
    out, h, c = sd.nn.LSTM(U, return_sequences=True, return_state=True)(x)
    model = sd.nn.Model(x, [out, h, c])
    model.compile(loss="mse", optimizer=sd.optim.Adam(1e-2), backend=backend, dtype="float64")
    return model


def test_model_with_output_and_states_predicts_as_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch is the oracle")
    model = _three_outputs()
    X = np.random.default_rng(0).normal(size=(6, T, F))
    out, h, c = model.predict(X)
    assert out.shape == (6, T, U) and h.shape == c.shape == (6, U)
    net = torch.nn.LSTM(F, U, batch_first=True).double()
    state = sd.nn.torch_weights.to_torch_state_dict(model, prefixes=["rnn"], tensors=True)
    net.load_state_dict({k.removeprefix("rnn."): v for k, v in state.items()})
    with torch.no_grad():
        want, (hn, cn) = net(torch.from_numpy(X))
    for got, ref in ((out, want), (h, hn[0]), (c, cn[0])):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-10, atol=1e-12)


def test_model_with_states_trains_saves_and_loads(tmp_path):
    """A Dense on ``c`` and a concatenation ``[h, c]`` as outputs; fit lowers both losses; the saved
    architecture records output k of the LSTM call, and the loaded model predicts the same."""
    x = sd.nn.Input(shape=(T, F))
    _, h, c = sd.nn.LSTM(U, return_state=True)(x)
    assert repr(c) == "<SymbolicTensor shape=(None, 4) from LSTM, output 2>"
    score = sd.nn.Dense(1)(c)
    joined = sd.nn.Concatenate()([h, c])
    model = sd.nn.Model(x, [score, joined])
    assert model.output_names == ["dense_1", "concatenate_1"]
    model.compile(loss="mse", optimizer=sd.optim.Adam(3e-2), backend="numpy", dtype="float64")
    rng = np.random.default_rng(1)
    X = rng.normal(size=(32, T, F))
    Y = [X[:, 0, :1], np.zeros((32, 2 * U))]
    first = model.evaluate(X, Y)["loss"]
    model.fit(X, Y, epochs=8, batch_size=8, verbose=0)
    assert model.evaluate(X, Y)["loss"] < first
    graph = model.architecture()["graph"]
    assert sorted(call.get("output", 0) for call in graph if call.get("layer") == 0) == [0, 1, 2]
    path = str(tmp_path / "states.symdl")
    model.save(path)
    loaded = sd.nn.load(path)
    for a, b in zip(loaded.predict(X), model.predict(X)):
        np.testing.assert_array_equal(a, b)
    assert "lstm_1[1], lstm_1[2]" in loaded.summary(print_fn=None)  # the concatenation's inputs


def test_only_the_states_as_outputs_and_a_shared_layer():
    """The output unused (only ``[h, c]`` leave the model), and a return_state layer called twice
    (shared weights: each call its own states)."""
    x = sd.nn.Input(shape=(T, F))
    _, h, c = sd.nn.LSTM(U, return_state=True)(x)
    model = sd.nn.Model(x, [h, c])
    model.compile(loss="mse", backend="numpy", dtype="float64")
    X = np.random.default_rng(3).normal(size=(4, T, F))
    h1, c1 = model.predict(X)
    assert h1.shape == c1.shape == (4, U) and not np.allclose(h1, c1)

    a, b = sd.nn.Input(shape=(T, F), name="a"), sd.nn.Input(shape=(T, F), name="b")
    shared = sd.nn.GRU(U, return_state=True)
    _, ha = shared(a)
    _, hb = shared(b)
    two = sd.nn.Model([a, b], ha - hb)
    two.compile(loss="mse", backend="numpy", dtype="float64")
    assert len(two.params) == 3
    same = two.predict([X, X])
    np.testing.assert_allclose(same, 0.0, atol=1e-15)


def test_bidirectional_return_state_model_and_configs(tmp_path):
    x = sd.nn.Input(shape=(T, F))
    bi = sd.nn.Bidirectional(sd.nn.LSTM(U, return_state=True), merge_mode="concat")
    outs = bi(x)
    assert [t.shape for t in outs] == [(2 * U,), (U,), (U,), (U,), (U,)]
    model = sd.nn.Model(x, outs)
    model.compile(loss="mse", backend="numpy", dtype="float64")
    X = np.random.default_rng(5).normal(size=(3, T, F))
    merged, hf, cf, hb, cb = model.predict(X)
    np.testing.assert_allclose(merged, np.concatenate([hf, hb], axis=1), rtol=0, atol=0)
    # configs: the layer rebuilt from its config returns the states again
    cfg = bi.config()
    assert cfg["layer"]["config"]["return_state"] is True
    again = sd.nn.Bidirectional(**cfg)
    assert again.layer.return_state and len(again(x)) == 5
    lstm = sd.nn.LSTM(U, return_state=True, go_backwards=True)
    assert type(lstm)(**lstm.config()).config() == lstm.config()
    path = str(tmp_path / "bi.symdl")
    model.save(path)
    for a, b in zip(sd.nn.load(path).predict(X), model.predict(X)):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Sequential: layer 1 \(LSTM\) returns 3 tensors \(return_state=True"):
        sd.nn.Sequential([sd.nn.LSTM(3, return_state=True), sd.nn.Dense(2)], input_shape=(4, 2))
    with pytest.raises(ValueError, match=r"Sequential: layer 2 \(Bidirectional\) returns 3 tensors"):
        sd.nn.Sequential([sd.nn.Input(shape=(4, 2)), sd.nn.GRU(3, return_sequences=True),
                          sd.nn.Bidirectional(sd.nn.GRU(3, return_state=True))])
    x = sd.nn.Input(shape=(4, 2))
    with pytest.raises(TypeError, match="takes one tensor, got a list of 2"):
        sd.nn.Dense(2)(sd.nn.SimpleRNN(3, return_state=True)(x))


# --------------------------------------------------------------------------- Keras's weight names


def _bidirectional_model(layer):
    model = sd.nn.Sequential([sd.nn.Bidirectional(layer), sd.nn.Dense(2)], input_shape=(T, F))
    model.compile(loss="mse", backend="numpy")
    return model


def test_bidirectional_weights_have_keras_names():
    from symdl.nn.weights import weight_names

    names = weight_names(_bidirectional_model(sd.nn.LSTM(U)))
    assert names["kernel1_forward"] == "bidirectional_1/forward_lstm/kernel"
    assert names["recurrent_kernel1_backward"] == "bidirectional_1/backward_lstm/recurrent_kernel"
    assert names["bias1_backward"] == "bidirectional_1/backward_lstm/bias"
    named = weight_names(_bidirectional_model(sd.nn.GRU(U, name="encoder")))
    assert named["kernel1_forward"] == "bidirectional_1/forward_encoder/kernel"
    assert weight_names(_bidirectional_model(sd.nn.SimpleRNN(U, name="backward_rnn")))["bias1_backward"] == \
        "bidirectional_1/backward_rnn/bias"  # Keras strips the prefix before adding it


def test_weights_saved_under_the_older_names_still_load(tmp_path):
    from safetensors.numpy import save_file

    from symdl.nn.weights import model_arrays, weight_names

    model = _bidirectional_model(sd.nn.GRU(U))
    old = weight_names(model, legacy=True)
    assert old["kernel1_forward"] == "bidirectional_1/kernel1_forward"
    live = model_arrays(model)
    now = weight_names(model)
    rng = np.random.default_rng(0)
    arrays = {old[k]: rng.normal(size=live[v].shape).astype(np.float32) for k, v in now.items()}
    path = str(tmp_path / "old.safetensors")
    save_file(arrays, path)
    other = _bidirectional_model(sd.nn.GRU(U))
    other.load_weights(path)
    got = other.get_weights()
    for internal, name in old.items():
        np.testing.assert_array_equal(got[internal], arrays[name])
    # and a round trip under today's names
    other.save_weights(str(tmp_path / "new.safetensors"))
    model.load_weights(str(tmp_path / "new.safetensors"))
    for k, v in model.get_weights().items():
        np.testing.assert_array_equal(v, got[k])


def test_plot_model_shows_each_state_once():
    from symdl.show.graphs import model_graph

    x = sd.nn.Input(shape=(T, F))
    out, h, c = sd.nn.LSTM(U, return_state=True)(x)
    model = sd.nn.Model(x, [out, sd.nn.Dense(1)(c)])
    labels, edges, kinds, names = model_graph(model)
    assert "lstm_1[2]" in names and names.count("lstm_1") == 1
    counts = [line for lines in labels for line in lines if line.startswith("params")]
    assert len(counts) == 2  # the LSTM's and the Dense's: a state is no second copy of the weights


def test_model_with_states_exports_to_onnx(tmp_path):
    """Output and states as three ONNX outputs, equal to predict (ONNX Runtime)."""
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the export")
    pytest.importorskip("onnx", reason="the export needs onnx")
    model = _three_outputs()
    path = str(tmp_path / "states.onnx")
    model.export(path, format="onnx", dtype="float64")
    session = ort.InferenceSession(path)
    X = np.random.default_rng(6).normal(size=(3, T, F))
    got = session.run(None, {session.get_inputs()[0].name: X})
    for a, b in zip(got, model.predict(X)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_keras_returns_the_same_states(bidirectional):
    """Keras 3 itself, where it is installed: the same weights (in Keras's order), the same list."""
    keras = pytest.importorskip("keras", reason="Keras is the oracle where installed")
    x = sd.nn.Input(shape=(T, F))
    make = lambda lib: lib.LSTM(U, return_sequences=True, return_state=True)  # noqa: E731
    ours = sd.nn.Bidirectional(make(sd.nn)) if bidirectional else make(sd.nn)
    model = sd.nn.Model(x, ours(x))
    model.compile(loss="mse", backend="numpy", dtype="float64")
    theirs = keras.layers.Bidirectional(make(keras.layers)) if bidirectional else make(keras.layers)
    theirs.build((None, T, F))
    weights = model.get_weights()
    theirs.set_weights([weights[str(p.name)] for p in model.params])
    X = np.random.default_rng(9).normal(size=(2, T, F))
    want = [keras.ops.convert_to_numpy(a) for a in theirs(X.astype("float32"))]
    got = model.predict(X)
    assert len(got) == len(want) == (5 if bidirectional else 3)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
