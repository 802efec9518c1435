"""Functional models (Keras 3's functional API): Input, layers called on tensors, Model, merge layers,
shared layers; gradient oracles for a residual block, a two-branch Concatenate net and a
shared-layer net (finite differences, SymPy scalar proof, PyTorch autograd), on numpy and cpu."""
from __future__ import annotations

import numpy as np
import pytest

import symdl as sd
from symdl.nn import Input, Model

from helpers import assert_close

BACKENDS = ["numpy", "cpu"]


# --------------------------------------------------------------------------- nets under test


def residual_dense(d=3):
    """x -> relu(Dense) -> Dense, + x (the skip), tanh, -> Dense(2). ``d``: the width (tiny for proofs)."""
    x = Input(shape=(d,))
    h = sd.nn.Dense(d + 1, activation="relu")(x)
    h = sd.nn.Dense(d)(h)
    h = sd.nn.Activation("tanh")(sd.nn.Add()([h, x]))
    return Model(x, sd.nn.Dense(2)(h))


def residual_conv(d=3):
    """Images -> Conv2D(same, relu) -> Conv2D(same), + x, relu -> GlobalAveragePooling2D -> Dense(2)."""
    x = Input(shape=(d, d, 1))
    h = sd.nn.Conv2D(1, 3, padding="same", activation="relu")(x)
    h = sd.nn.Conv2D(1, 3, padding="same")(h)
    h = sd.nn.Activation("relu")(h + x)
    return Model(x, sd.nn.Dense(2)(sd.nn.GlobalAveragePooling2D()(h)))


def two_branch_concat(d=3):
    x = Input(shape=(d,))
    a = sd.nn.Dense(d - 1, activation="tanh")(x)
    b = sd.nn.Dense(d, activation="sigmoid")(x)
    return Model(x, sd.nn.Dense(2)(sd.nn.Concatenate()([a, b])))


def shared_layer(d=3):
    """One Dense called twice (on x and on another layer's output): one W, its gradient a sum."""
    x = Input(shape=(d,))
    shared = sd.nn.Dense(d, activation="tanh")
    h1 = shared(x)
    h2 = shared(sd.nn.Dense(d)(x))
    return Model(x, sd.nn.Dense(2)((h1 - h2) * h1))


NETS = {"residual_dense": residual_dense, "residual_conv": residual_conv, "concat": two_branch_concat,
        "shared": shared_layer}


def _arrays(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    shape = model.input_dim if isinstance(model.input_dim, tuple) else (model.input_dim,)
    arrays = {"x": rng.normal(size=(n, *shape)), "y": rng.normal(size=(n, model.units))}
    for p in model.params:
        arrays[str(p.name)] = rng.normal(scale=0.7, size=p.value_shape)
    return arrays


def _compiled(make, *size):
    model = make(*size)
    model.compile(loss="mse", optimizer="sgd", backend="numpy", dtype="float64")
    return model


# --------------------------------------------------------------------------- PyTorch, the same nets

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _t_dense(h, w, b=None, act=None):
    z = h @ w + (b if b is not None else 0)
    return {None: z, "relu": torch.relu(z), "tanh": torch.tanh(z), "sigmoid": torch.sigmoid(z)}[act]


def _t_conv_same(h, k, b):  # NHWC in and out, a 3x3 kernel (kh, kw, ci, co), padding 1
    z = F.conv2d(h.permute(0, 3, 1, 2), k.permute(3, 2, 0, 1), b, padding=1)
    return z.permute(0, 2, 3, 1)


def _torch_forward(name, T):
    x = T["x"]
    if name == "residual_dense":
        h = _t_dense(_t_dense(x, T["W1"], T["b1"], "relu"), T["W2"], T["b2"])
        return _t_dense(torch.tanh(h + x), T["W5"], T["b5"])
    if name == "residual_conv":
        h = torch.relu(_t_conv_same(x, T["K1"], T["b1"]))
        h = torch.relu(_t_conv_same(h, T["K2"], T["b2"]) + x)
        return _t_dense(h.mean(dim=(1, 2)), T["W6"], T["b6"])
    if name == "concat":
        a, b = _t_dense(x, T["W1"], T["b1"], "tanh"), _t_dense(x, T["W2"], T["b2"], "sigmoid")
        return _t_dense(torch.cat([a, b], dim=1), T["W4"], T["b4"])
    if name == "shared":
        h1 = _t_dense(x, T["W1"], T["b1"], "tanh")
        h2 = _t_dense(_t_dense(x, T["W2"], T["b2"]), T["W1"], T["b1"], "tanh")
        return _t_dense((h1 - h2) * h1, T["W5"], T["b5"])
    raise KeyError(name)


def _torch_grads(name, arrays, params):
    T = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in params) for k, v in arrays.items()}
    out = _torch_forward(name, T)
    loss = ((out - T["y"]) ** 2).mean()
    loss.backward()
    return loss.item(), {k: T[k].grad.numpy() for k in params}


# --------------------------------------------------------------------------- gradient oracles


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(NETS))
def test_gradients_match_pytorch_autograd(name, backend):
    model = _compiled(NETS[name])
    arrays = _arrays(model, seed=1)
    names = [str(p.name) for p in model.params]
    value, grads = sd.value_and_grad(model.loss, model.params, backend=backend, dtype="float64")(**arrays)
    ref_value, ref = _torch_grads(name, arrays, names)
    assert value == pytest.approx(ref_value, rel=1e-10)
    for k in names:
        assert_close(grads[k], ref[k], 1e-8, what=f"{name} {k} on {backend}")


@pytest.mark.parametrize("name", list(NETS))
def test_gradients_match_finite_differences(name):
    model = _compiled(NETS[name])
    report = sd.check_grad(model.loss, model.params, _arrays(model, seed=2))
    assert report.passed, str(report)


@pytest.mark.parametrize("name", list(NETS))
def test_gradients_proved_by_sympy_on_tiny_shapes(name):
    model = _compiled(NETS[name], 1 if name == "residual_conv" else 2)  # one row: SymPy expands every scalar
    proof = sd.prove(model.loss, model.params, {"n": 1})
    assert proof.proved, str(proof)


def test_the_skip_connection_sums_two_adjoints():
    """The shared input of Add gets δ from both branches: its gradient differs from either branch's."""
    model = _compiled(residual_dense)
    x = model.x
    g = sd.grad(model.loss, [x])[x]
    text = str(g)
    assert "W1.T" in text and "W2.T" in text  # the branch through both Dense layers ...
    arrays = _arrays(model, seed=3)
    T = {k: torch.tensor(v, requires_grad=k == "x") for k, v in arrays.items()}
    ((_torch_forward("residual_dense", T) - T["y"]) ** 2).mean().backward()
    value, grads = sd.value_and_grad(model.loss, [x], backend="numpy", dtype="float64")(**arrays)
    assert_close(grads["x"], T["x"].grad.numpy(), 1e-8, what="δx")  # ... plus the identity branch


# --------------------------------------------------------------------------- merge layers' values


MERGES = {
    "Add": (sd.nn.Add, lambda a, b: a + b), "Subtract": (sd.nn.Subtract, lambda a, b: a - b),
    "Multiply": (sd.nn.Multiply, lambda a, b: a * b), "Average": (sd.nn.Average, lambda a, b: (a + b) / 2),
    "Maximum": (sd.nn.Maximum, np.maximum), "Minimum": (sd.nn.Minimum, np.minimum),
    "Concatenate": (sd.nn.Concatenate, lambda a, b: np.concatenate([a, b], axis=1)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MERGES))
def test_merge_layers_compute_what_keras_does(kind, backend):
    cls, ref = MERGES[kind]
    x = Input(shape=(4,))
    a, b = sd.nn.Dense(3, name="a")(x), sd.nn.Dense(3, name="b")(x)
    model = Model(x, cls()([a, b]))
    model.compile(loss="mse", backend=backend, dtype="float64")
    w = model.get_weights()
    X = np.random.default_rng(0).normal(size=(5, 4))
    expected = ref(X @ w["W1"] + w["b1"], X @ w["W2"] + w["b2"])
    assert_close(model.predict(X), expected, 1e-12, what=kind)


TORCH_MERGES = {"Add": lambda a, b: a + b, "Subtract": lambda a, b: a - b, "Multiply": lambda a, b: a * b,
                "Average": lambda a, b: (a + b) / 2, "Maximum": torch.maximum, "Minimum": torch.minimum,
                "Concatenate": lambda a, b: torch.cat([a, b], dim=1)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MERGES))
def test_merge_layer_gradients_match_pytorch_autograd(kind, backend):
    x = Input(shape=(3,))
    merged = MERGES[kind][0]()([sd.nn.Dense(3, activation="tanh")(x), sd.nn.Dense(3)(x)])
    model = Model(x, sd.nn.Dense(2)(merged))
    model.compile(loss="mse", backend=backend, dtype="float64")
    arrays = _arrays(model, n=5, seed=5)
    names = [str(p.name) for p in model.params]
    value, grads = sd.value_and_grad(model.loss, model.params, backend=backend, dtype="float64")(**arrays)
    T = {k: torch.tensor(v, requires_grad=k in names) for k, v in arrays.items()}
    out = _t_dense(TORCH_MERGES[kind](_t_dense(T["x"], T["W1"], T["b1"], "tanh"), _t_dense(T["x"], T["W2"], T["b2"])),
                   T["W4"], T["b4"])
    loss = ((out - T["y"]) ** 2).mean()
    loss.backward()
    assert value == pytest.approx(loss.item(), rel=1e-10)
    for k in names:
        assert_close(grads[k], T[k].grad.numpy(), 1e-8, what=f"{kind} {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_concatenate_joins_image_channels_and_global_pooling(backend):
    x = Input(shape=(4, 4, 2))
    a = sd.nn.Conv2D(3, 1, use_bias=False)(x)
    c = sd.nn.Concatenate()([a, x])
    avg, top = sd.nn.GlobalAveragePooling2D()(c), sd.nn.GlobalMaxPooling2D()(c)
    assert c.shape == (4, 4, 5) and avg.shape == (5,)
    model = Model(x, sd.nn.Concatenate()([avg, top]))
    model.compile(loss="mse", backend=backend, dtype="float64")
    X = np.random.default_rng(1).normal(size=(3, 4, 4, 2))
    joined = np.concatenate([X @ model.get_weights()["K1"][0, 0], X], axis=3)
    expected = np.concatenate([joined.mean(axis=(1, 2)), joined.max(axis=(1, 2))], axis=1)
    assert_close(model.predict(X), expected, 1e-12)


def test_tensor_operators_build_merge_layers():
    x = Input(shape=(2,))
    h = sd.nn.Dense(2)(x)
    assert [type(t.layer).__name__ for t in (h + x, h - x, h * x)] == ["Add", "Subtract", "Multiply"]
    with pytest.raises(TypeError, match="another symbolic tensor"):
        h + 1


# --------------------------------------------------------------------------- Model works as Sequential does


def test_sequential_is_a_model_with_the_same_parameter_names():
    model = sd.nn.Sequential([sd.nn.Dense(4, activation="relu"), sd.nn.Dense(2)], input_dim=3)
    assert isinstance(model, Model)
    assert [str(p.name) for p in model.params] == ["W1", "b1", "W2", "b2"]
    x = Input(shape=(3,))
    functional = Model(x, sd.nn.Dense(2)(sd.nn.Dense(4, activation="relu")(x)))
    assert str(functional.output) == str(model.output)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_residual_model_trains_saves_and_loads(backend, tmp_path):
    X, y = sd.datasets.moons(200, seed=0)
    x = Input(shape=(2,), name="points")
    h = sd.nn.Dense(16, activation="relu")(x)
    h = sd.nn.Dense(16, activation="relu")(h) + h
    model = Model(x, sd.nn.Dense(2)(h), name="resnet")
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.03), backend=backend, seed=0)
    model.fit(X, y, epochs=15, batch_size=32, verbose=0)
    assert model.evaluate(X, y)["accuracy"] > 0.9
    text = model.summary(print_fn=None)
    assert "connected to" in text and "dense_2, dense_1" in text and "points" in text
    assert "W" in model.formulas()
    path = tmp_path / "resnet.symdl"
    model.save(path)
    loaded = sd.nn.load(path)
    assert type(loaded) is Model and loaded.name == "resnet"
    assert_close(loaded.predict(X), model.predict(X), 1e-6)
    weights = model.get_weights()
    loaded.set_weights({k: v * 0 for k, v in weights.items()})
    assert np.allclose(loaded.predict(X[:3]), 0)
    loaded.fit(X, y, epochs=1, batch_size=32, verbose=0)  # resumes: optimizer state and epoch count
    assert loaded.epoch == 16


def test_shared_layer_has_one_set_of_weights():
    model = _compiled(shared_layer)
    assert [str(p.name) for p in model.params] == ["W1", "b1", "W2", "b2", "W5", "b5"]
    assert model.summary(print_fn=None).count("dense_1") >= 2  # listed once, and feeding others


def test_batch_norm_and_dropout_in_a_functional_model():
    X, y = sd.datasets.moons(120, seed=1)
    x = Input(shape=(2,))
    h = sd.nn.Dense(8)(x)
    h = sd.nn.Dropout(0.1)(sd.nn.Activation("relu")(sd.nn.BatchNormalization()(h))) + h
    model = Model(x, sd.nn.Dense(2)(h))
    model.compile(loss="softmax_cross_entropy", backend="numpy")
    model.fit(X, y, epochs=2, verbose=0)
    assert {"moving_mean2", "moving_var2"} <= set(model.train_step.statistics)


# --------------------------------------------------------------------------- errors at build time


def test_wrong_shapes_are_errors_naming_the_layer_and_shapes():
    x = Input(shape=(4,))
    with pytest.raises(ValueError, match=r"Conv2D layer 1 needs images"):
        sd.nn.Conv2D(2, 3)(x)
    with pytest.raises(ValueError, match=r"Add 'add_me': its inputs have shapes \(None, 4\) and \(None, 3\)"):
        sd.nn.Add(name="add_me")([x, sd.nn.Dense(3)(x)])
    shared = sd.nn.Dense(2, name="shared")
    with pytest.raises(ValueError, match=r"Dense 'shared' is shared: its first call took \(None, 4\), this one "
                                         r"\(None, 3\)"):
        Model(x, sd.nn.Add()([shared(x), shared(sd.nn.Dense(3)(x))]))
    with pytest.raises(ValueError, match="Concatenate joins tensors that differ only in the last axis"):
        sd.nn.Concatenate()([Input(shape=(4, 4, 1)), Input(shape=(2, 2, 1))])
    with pytest.raises(TypeError, match="takes a list of tensors"):
        sd.nn.Add()(x)
    with pytest.raises(TypeError, match="takes one tensor"):
        sd.nn.Dense(2)([x, x])
    with pytest.raises(TypeError, match="call a layer on symbolic tensors"):
        sd.nn.Dense(2)(np.zeros((3, 4)))
    bn = sd.nn.BatchNormalization()
    with pytest.raises(ValueError, match="BatchNormalization cannot be shared"):
        Model(x, sd.nn.Add()([bn(x), bn(x)]))
    one = sd.nn.BatchNormalization()  # one layer object in two models: each has its own weights
    assert [str(p.name) for p in Model(x, one(x)).params] == ["gamma1", "beta1"]
    assert [str(p.name) for p in Model(x, one(sd.nn.Dense(4)(x))).params][-2:] == ["gamma2", "beta2"]


def test_model_graph_errors():
    x, other = Input(shape=(4,), name="a"), Input(shape=(4,), name="b")
    with pytest.raises(ValueError, match=r"depends on the Input 'b' \(None, 4\), which is not the model's input 'a'"):
        Model(x, sd.nn.Dense(2)(other))
    with pytest.raises(ValueError, match="depends on the Input 'b'"):
        Model(x, other)  # an output that is another input
    h = sd.nn.Dense(4)(x)
    out = sd.nn.Dense(4)(h)
    h.inputs = [out]  # a cycle can only be made by editing the record by hand
    with pytest.raises(ValueError, match="cycle"):
        Model(x, out)
    with pytest.raises(ValueError, match="ends in images"):
        y = Input(shape=(4, 4, 1))
        Model(y, sd.nn.Conv2D(2, 3)(y))
    with pytest.raises(ValueError, match=r"the input 'b' \(None, 4\) is not used by any output"):
        Model([x, other], sd.nn.Dense(2)(x))
    g = sd.nn.Dense(4)(x)
    with pytest.raises(ValueError, match="inputs must be sd.nn.Input tensors"):
        Model(g, sd.nn.Dense(2)(g))


# --------------------------------------------------------------------------- the CUDA backend (simulator)


@pytest.mark.cudasim
@pytest.mark.skipif(__import__("os").environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize("name", ["concat", "shared", "residual_conv"])
def test_functional_nets_on_the_cuda_simulator(name):
    """Concatenate's copy kernels (im2col / col2im with a padding geometry) and the skip's sums on CUDA."""
    model = _compiled(NETS[name])
    arrays = _arrays(model, n=3, seed=4)
    ref_v, ref_g = sd.value_and_grad(model.loss, model.params, backend="numpy", dtype="float64")(**arrays)
    v, g = sd.value_and_grad(model.loss, model.params, backend="cuda", dtype="float64")(**arrays)
    assert v == pytest.approx(ref_v, rel=1e-10)
    for k in ref_g:
        assert_close(g[k], ref_g[k], 1e-10, what=k)


# --------------------------------------------------------------------------- the example


def test_resnet_digits_example_runs_and_prints_the_summed_residual_delta(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "SYMDL_QUICK": "1", "TMPDIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "examples/resnet_digits.py"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], "the example left temporary files behind"
    assert "add_1" in out.stdout and "conv2d_1, batch_normalization_2" in out.stdout  # the skip, in the summary
    first = next(line for line in out.stdout.splitlines() if line.strip().startswith("δ1 = "))
    assert first.count("col2im(") >= 2  # δ at the first block's input: through its convs + the skipped path
    fan_out = out.stdout.split("Fan-out (a value read by several nodes")[1]
    assert "uses of A1: patches(A1); " in fan_out  # the first block's input: its conv and the skip
    assert float(out.stdout.split("held-out accuracy: ")[1].split()[0]) > 0.3


def test_char_transformer_example_trains_samples_and_prints_the_attention_delta(tmp_path):
    """The GPT example in quick mode (issue 27): the loss goes down, a greedy sample is printed, and
    the attention δ of one block in its row-sum form (named δS lines, or the same term inline)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "SYMDL_QUICK": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "examples/char_transformer.py", "--quick"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [], "the example left temporary files behind"
    curve = [float(v) for v in out.stdout.split("loss curve (per epoch): ")[1].splitlines()[0].split()]
    assert len(curve) >= 2 and curve[-1] < curve[0]
    sample = out.stdout.split("sample (greedy): ")[1].splitlines()[0]
    assert len(sample.split(" -> ")[1].split()) == 6  # six digits written
    assert "multi_head_attention_1" in out.stdout and "2 heads x 8, causal" in out.stdout
    delta = out.stdout.split("attention's backward pass in one block (sd.explain):")[1]
    assert "δS1 = P1⊙(δP1 - rowsum(P1⊙δP1))" in delta or "sum_cols(-softmax(causal(" in delta
    assert any(line.strip().startswith("δ3 = place(") for line in delta.splitlines())  # δV = Pᵀ δO
