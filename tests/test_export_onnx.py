"""ONNX export (issue 29): forward passes against ``model.predict`` and exported gradients against
``sd.value_and_grad``, with ONNX Runtime (CPU, one thread) as the oracle and ``onnx.checker`` on
every file; the ONNX backend against the NumPy reference on every kernel class."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import symdl as sd  # noqa: E402
from symdl import backends  # noqa: E402
from symdl.backends.onnx import compile_program, session  # noqa: E402
from symdl.export import export_model, export_onnx  # noqa: E402
from symdl.ir import kernels as ir  # noqa: E402
from symdl.run.pipeline import gradient_program  # noqa: E402

nn = sd.nn


def _run(path, feed):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session(model).run(None, feed)))


def _compiled(model, seed=0):
    model.compile(loss="softmax_cross_entropy", backend="numpy", dtype="float32", seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, value in {**model.train_step.params, **model.train_step.statistics}.items():
        if name.startswith("moving_var"):
            value[...] = rng.uniform(0.5, 2.0, value.shape)
        elif name.startswith(("moving_mean", "beta", "gamma", "b")):
            value[...] = rng.normal(scale=0.3, size=value.shape) + (1.0 if name.startswith("gamma") else 0.0)
    return model


def _data(model, n, seed=0):
    dim = model.input_dim
    shape = (n, *dim) if isinstance(dim, tuple) else (n, dim)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _check_forward(model, tmp_path, atol=1e-5):
    path = tmp_path / "model.onnx"
    proto = export_model(model, path)
    assert proto.opset_import[0].version == 17 and proto.ir_version <= 10
    inp, out = proto.graph.input[0], proto.graph.output[0]
    assert inp.name == model.inputs[0].name and out.name == model.layer_names[-1]
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    for n in (1, 7):
        X = _data(model, n, seed=n)
        got = _run(path, {inp.name: X})[out.name]
        np.testing.assert_allclose(got, model.predict(X), atol=atol, rtol=0)


IMAGE = (8, 8, 3)


@pytest.mark.parametrize("layers", [
    pytest.param([nn.Dense(5, activation="tanh"), nn.Dense(3)], id="dense-tanh"),
    pytest.param([nn.Dense(5, activation="relu", use_bias=False), nn.Dense(3, activation="sigmoid")], id="dense-relu"),
    pytest.param([nn.Dense(5, activation="gelu"), nn.Activation("softplus"), nn.Dense(3, activation="elu")], id="gelu"),
    pytest.param([nn.Dense(5, activation="silu"), nn.Dense(4, activation="leaky_relu"), nn.Dense(3)], id="silu"),
    pytest.param([nn.Dense(5), nn.BatchNormalization(), nn.Dropout(0.5), nn.Dense(3)], id="batchnorm-dropout"),
    pytest.param([nn.Dense(5), nn.LayerNormalization(), nn.Dense(3)], id="layernorm"),
])
def test_dense_layers_forward(layers, tmp_path):
    _check_forward(_compiled(nn.Sequential(layers, input_dim=6)), tmp_path)


@pytest.mark.parametrize("layers", [
    pytest.param([nn.Conv2D(4, 3, activation="relu")], id="conv-valid"),
    pytest.param([nn.Conv2D(4, 3, padding="same", strides=2)], id="conv-same-stride"),
    pytest.param([nn.Conv2D(4, (2, 3), padding=1)], id="conv-padding-int"),
    pytest.param([nn.MaxPooling2D(2)], id="maxpool"),
    pytest.param([nn.MaxPooling2D(3, strides=1)], id="maxpool-overlap"),
    pytest.param([nn.AveragePooling2D(2)], id="avgpool"),
    pytest.param([nn.AveragePooling2D((2, 3), strides=(1, 2))], id="avgpool-overlap"),
    pytest.param([nn.Conv2D(4, 3), nn.BatchNormalization(), nn.Activation("relu")], id="conv-batchnorm"),
])
def test_image_layers_forward(layers, tmp_path):
    model = nn.Sequential([*layers, nn.Flatten(), nn.Dense(3)], input_shape=IMAGE)
    _check_forward(_compiled(model), tmp_path)


@pytest.mark.parametrize("pool", [nn.GlobalAveragePooling2D, nn.GlobalMaxPooling2D])
def test_global_pooling_forward(pool, tmp_path):
    model = nn.Sequential([nn.Conv2D(4, 3, activation="relu"), pool(), nn.Dense(3)], input_shape=IMAGE)
    _check_forward(_compiled(model), tmp_path)


@pytest.mark.parametrize("merge", [nn.Add, nn.Subtract, nn.Multiply, nn.Average, nn.Maximum, nn.Minimum,
                                   nn.Concatenate])
def test_merge_layers_forward(merge, tmp_path):
    x = nn.Input(shape=(6,))
    a = nn.Dense(4, activation="tanh")(x)
    b = nn.Dense(4)(x)
    out = nn.Dense(3)(merge()([a, b]))
    _check_forward(_compiled(nn.Model(x, out, name="merged")), tmp_path)


def cnn():
    return nn.Sequential([nn.Conv2D(6, 3, padding="same", activation="relu"), nn.MaxPooling2D(2),
                          nn.Conv2D(8, 3, activation="relu"), nn.BatchNormalization(), nn.Flatten(),
                          nn.Dropout(0.2), nn.Dense(10)], input_shape=IMAGE)


def residual():
    x = nn.Input(shape=IMAGE, name="images")
    h = nn.Conv2D(4, 3, padding="same", activation="relu")(x)
    r = nn.Conv2D(4, 3, padding="same")(h)
    h = nn.Activation("relu")(nn.Add()([h, r]))
    h = nn.AveragePooling2D(2)(h)
    return nn.Model(x, nn.Dense(5)(nn.GlobalAveragePooling2D()(h)), name="resnet")


def mlp():
    return nn.Sequential([nn.Dense(16, activation="tanh"), nn.Dense(8, activation="relu"), nn.Dense(4)],
                         input_dim=6)


@pytest.mark.parametrize("build", [cnn, residual], ids=["cnn", "residual"])
def test_models_forward(build, tmp_path):
    model = _compiled(build())
    _check_forward(model, tmp_path)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert {"Conv", "Transpose"} <= ops and "Gather" not in ops  # ONNX's own NCHW convolution and pools
    assert ("MaxPool" if build is cnn else "AveragePool") in ops


def test_forward_in_float64(tmp_path):
    model = mlp()
    model.compile(backend="numpy", dtype="float64")
    proto = export_model(model, tmp_path / "m.onnx")
    X = _data(model, 3).astype(np.float64)
    got = _run(tmp_path / "m.onnx", {"input_layer": X})["dense_3"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    np.testing.assert_allclose(got, model.predict(X), atol=1e-12)


# --------------------------------------------------------------------------- gradients


def _check_gradients(model, tmp_path, training=True, regularizer=None):
    if regularizer is not None:
        model.compile(loss="softmax_cross_entropy", backend="numpy", dtype="float32", regularizer=regularizer)
    path = tmp_path / "grads.onnx"
    export_model(model, path, gradients=True, training=training)
    from symdl.nn.weights import weight_names
    names = weight_names(model)
    loss = model.loss if training else model.inference_loss
    for n in (2, 9):
        X = _data(model, n, seed=n)
        Y = np.eye(model.units, dtype=np.float32)[np.random.default_rng(n).integers(0, model.units, n)]
        got = _run(path, {model.inputs[0].name: X, "target": Y})
        value, grads = _value_and_grad(model, loss, X, Y)
        assert got["loss"].shape == ()
        np.testing.assert_allclose(got["loss"], value, atol=1e-5, rtol=0)
        assert len(got) == 1 + len(model.params)
        for p in model.params:
            np.testing.assert_allclose(got[f"grad/{names[str(p.name)]}"], grads[str(p.name)], atol=1e-5, rtol=0,
                                       err_msg=str(p.name))


def _value_and_grad(model, loss, X, Y):
    """``sd.value_and_grad`` of ``loss`` at the model's weights; the inference loss reads the running
    statistics (``State`` leaves, which ``value_and_grad``'s argument check does not take), so its
    gradient program runs on the NumPy backend directly, as ``value_and_grad`` does."""
    weights = {**model.train_step.params, **model.train_step.statistics}
    if loss is model.loss:
        f = sd.value_and_grad(loss, model.params, backend="numpy", dtype="float32")
        return f(x=X, y=Y, **{str(l.name): weights[str(l.name)] for l in f.program.params})
    program, _ = gradient_program(loss, model.params)
    runner = backends.get("numpy").compile_program(program, "float32")
    external = {"x": X.reshape(-1, X.shape[-1]), "y": Y}
    external.update({str(l.name): weights[str(l.name)].reshape(l.shape) for l in program.params})
    outs = runner.run(external, {}, len(X))
    grads = {str(p.name): np.array(outs[f"grad_{p.name}"]).reshape(p.value_shape) for p in model.params}
    return float(outs["loss"][0, 0]), grads


def test_mlp_gradients(tmp_path):
    _check_gradients(_compiled(mlp()), tmp_path, regularizer=sd.l2(1e-3))


def test_cnn_gradients_training_loss(tmp_path):
    model = nn.Sequential([nn.Conv2D(6, 3, padding="same", activation="relu"), nn.MaxPooling2D(2),
                           nn.Conv2D(8, 3, strides=2, activation="relu"), nn.BatchNormalization(), nn.Flatten(),
                           nn.Dense(10)], input_shape=IMAGE)
    _check_gradients(_compiled(model), tmp_path)


def test_cnn_with_dropout_gradients_of_inference_loss(tmp_path):
    _check_gradients(_compiled(cnn()), tmp_path, training=False)


def test_residual_gradients(tmp_path):
    _check_gradients(_compiled(residual()), tmp_path)


def test_graph_level_export_with_gradients(tmp_path):
    x = sd.input("x", (5, 5, 2))
    y = sd.input("y", 3)
    K = sd.param("K", (3, 3, 2, 4))
    c = sd.param("c", 4)
    W = sd.param("W", (16, 3))
    h = sd.max_pool2d(sd.relu(sd.conv2d(x, K) + c), 2, 1)
    logits = sd.flatten(h) @ W
    loss = sd.losses.softmax_cross_entropy(logits, y)
    rng = np.random.default_rng(0)
    values = {"K": rng.normal(size=(3, 3, 2, 4)), "c": rng.normal(size=4), "W": rng.normal(size=(16, 3))}
    path = tmp_path / "graph.onnx"
    export_onnx({"loss": loss, "hidden": h}, path, inputs=[x, y], params={"K": values["K"], "W": values["W"]},
                gradients=[K, c, W])
    X = rng.normal(size=(4, 5, 5, 2)).astype(np.float32)
    Y = np.eye(3, dtype=np.float32)[[0, 2, 1, 1]]
    got = _run(path, {"x": X, "y": Y, "c": values["c"].astype(np.float32)})
    assert got["hidden"].shape == (4, 2, 2, 4)
    value, grads = sd.value_and_grad(loss, [K, c, W], dtype="float64")(x=X, y=Y, **values)
    np.testing.assert_allclose(got["loss"], value, atol=1e-5)
    for name in values:
        np.testing.assert_allclose(got[f"grad/{name}"], grads[name], atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------- bad input


def test_export_errors(tmp_path):
    model = mlp()
    with pytest.raises(RuntimeError, match="never compiled"):
        export_model(model, tmp_path / "m.onnx")
    model.compile(backend="numpy")
    with pytest.raises(ValueError, match="opset must be an int from 15"):
        export_model(model, tmp_path / "m.onnx", opset=11)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_model(model, tmp_path / "missing" / "m.onnx")
    dropped = _compiled(cnn())
    with pytest.raises(ValueError, match=r"dropout masks \(dropout_1\).*training=False"):
        export_model(dropped, tmp_path / "m.onnx", gradients=True)
    x = sd.input("x", 2)
    W = sd.param("W", (2, 2))
    with pytest.raises(ValueError, match=r"missing: \['x'\]"):
        export_onnx(x @ W, tmp_path / "g.onnx", inputs=[])
    with pytest.raises(ValueError, match=r"wrong sizes: \['W: \(3,\)"):
        export_onnx(x @ W, tmp_path / "g.onnx", params={"W": np.zeros(3)})
    with pytest.raises(ValueError, match="differentiate the output named 'loss'"):
        export_onnx({"out": x @ W}, tmp_path / "g.onnx", gradients=[W])


def test_failed_export_keeps_the_previous_file(tmp_path):
    model = _compiled(mlp())
    path = tmp_path / "m.onnx"
    export_model(model, path)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        export_model(_compiled(cnn()), path, gradients=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


# --------------------------------------------------------------------------- the backend itself


def test_onnx_backend_matches_numpy_on_every_image_kernel():
    """A gradient program holding every image kernel class (padding, overlapping windows, strides),
    run by the ONNX backend and by the NumPy reference in float64."""
    x = sd.input("x", (6, 6, 2))
    y = sd.input("y", 3)
    K = sd.param("K", (3, 3, 2, 4))
    c = sd.param("c", 4)
    K2 = sd.param("K2", (2, 2, 4, 3))
    h = sd.relu(sd.conv2d(x, K, padding="same") + c)
    a = sd.max_pool2d(h, 2, 1)
    b = sd.tanh(sd.conv2d(a, K2, stride=2))
    W = sd.param("W", (12, 3))
    W2 = sd.param("W2", (36, 3))
    W3 = sd.param("W3", (36, 3))
    logits = sd.flatten(b) @ W + sd.flatten(sd.avg_pool2d(h, 2)) @ W2 + sd.flatten(sd.max_pool2d(h, 2)) @ W3
    params = [K, c, K2, W, W2, W3]
    program, _ = gradient_program(sd.losses.softmax_cross_entropy(logits, y) + 1e-3 * sd.l2(W), params)
    kinds = {type(k) for k in program.kernels}
    assert {ir.Im2Col, ir.Col2Im, ir.MaxPool, ir.MaxPoolGrad, ir.AvgPool, ir.AvgPoolGrad, ir.Reshape, ir.Gemm,
            ir.Elementwise, ir.ReduceRows, ir.ReduceAll, ir.ReduceLogSumExp} <= kinds
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(5 * 36, 2)), "y": np.eye(3)[rng.integers(0, 3, 5)]}
    arrays.update({str(p.name): rng.normal(size=tuple(int(s) for s in p.shape)) * 0.5 for p in params})
    external = {k: arrays[k] for k in program.externals}
    want = backends.get("numpy").compile_program(program, "float64").run(external, {}, 5)
    want = {k: np.array(v) for k, v in want.items()}
    got = compile_program(program, "float64").run(external, {}, 5)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-12, rtol=0, err_msg=name)


def test_onnx_backend_refuses_a_training_step():
    x = sd.input("x", 2)
    W = sd.param("W", (2, 1))
    train = sd.compile(sd.losses.mse(x @ W, sd.input("y", 1)), [W], optimizer=sd.optim.SGD(0.1), backend="numpy")
    with pytest.raises(NotImplementedError, match="writes"):
        compile_program(train.program, "float32")


@pytest.mark.parametrize("opset", [15, 18, 21])
def test_other_opsets_load_in_onnx_runtime(opset, tmp_path):
    model = _compiled(residual())
    path = tmp_path / "m.onnx"
    proto = export_model(model, path, opset=opset)
    assert proto.opset_import[0].version == opset
    X = _data(model, 3)
    np.testing.assert_allclose(_run(path, {"images": X})["dense_1"], model.predict(X), atol=1e-5, rtol=0)
    export_model(model, path, opset=opset, gradients=True)
    assert "grad/conv2d_1/kernel" in _run(path, {"images": X, "target": np.eye(5, dtype=np.float32)[[0, 1, 2]]})


@pytest.mark.parametrize("loss", ["mse", "bce_with_logits"])
def test_regression_and_binary_gradients(loss, tmp_path):
    model = nn.Sequential([nn.Dense(8, activation="tanh"), nn.Dense(1)], input_dim=4)
    model.compile(loss=loss, backend="numpy", dtype="float32", regularizer=sd.l1(1e-2))
    path = tmp_path / "g.onnx"
    export_model(model, path, gradients=True)
    X = _data(model, 6)
    Y = (np.random.default_rng(1).random((6, 1)) > 0.5).astype(np.float32)
    got = _run(path, {"input_layer": X, "target": Y})
    value, grads = sd.value_and_grad(model.loss, model.params, dtype="float32")(x=X, y=Y, **model.get_weights())
    np.testing.assert_allclose(got["loss"], value, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["grad/dense_1/kernel"], grads["W1"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["grad/dense_2/bias"], grads["b2"], atol=1e-5, rtol=0)


def test_keras_style_export_entry_point(tmp_path):
    from symdl.export import export

    model = _compiled(mlp())
    export(model, tmp_path / "m.onnx", format="onnx", opset=17)
    assert (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match="unknown format 'tf_saved_model'"):
        export(model, tmp_path / "m.pb", format="tf_saved_model")


@pytest.fixture
def onnx_backend():
    """The ONNX backend registered in ``backends.BACKENDS`` for one test (unless it already is)."""
    added = "onnx" not in backends.BACKENDS
    if added:
        backends.BACKENDS["onnx"] = "symdl.backends.onnx"
    yield
    if added:
        del backends.BACKENDS["onnx"]


def test_onnx_runs_value_and_grad_as_a_registered_backend(onnx_backend):
    """Registered as a backend (``backends.BACKENDS``), ``value_and_grad`` runs on ONNX Runtime."""
    x = sd.input("x", 3)
    y = sd.input("y", 2)
    W = sd.param("W", (3, 2))
    b = sd.param("b", 2)
    loss = sd.losses.softmax_cross_entropy(sd.gelu(x @ W + b), y) + 1e-2 * sd.l1(W)
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(4, 3)), "y": np.eye(2)[[0, 1, 1, 0]], "W": rng.normal(size=(3, 2)),
              "b": rng.normal(size=2)}
    # float32: ONNX Runtime has no float64 Erf (gelu)
    value, grads = sd.value_and_grad(loss, [W, b], backend="onnx", dtype="float32")(**arrays)
    want_value, want = sd.value_and_grad(loss, [W, b], backend="numpy", dtype="float64")(**arrays)
    assert abs(value - want_value) < 1e-5
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss", [sd.losses.softmax_cross_entropy, sd.losses.bce_with_logits])
def test_exported_losses_stay_finite_on_huge_logits(loss, tmp_path):
    """The exported formulas are the stable ones (log-sum-exp with the row maximum subtracted,
    softplus form): logits of ±1000 give finite losses and gradients, equal to the NumPy backend's."""
    z = sd.input("z", 2)
    y = sd.input("y", 2)
    W = sd.param("W", (2, 2))
    expr = loss(z @ W, y)
    path = tmp_path / "loss.onnx"
    export_onnx({"loss": expr}, path, gradients=[W])
    Z = np.array([[1000.0, -1000.0], [-1000.0, 1000.0], [3.0, -2.0]], np.float32)
    Y = np.array([[0, 1], [1, 0], [1, 0]], np.float32)
    Wv = np.array([[1.0, -1.0], [0.5, 2.0]], np.float32)
    got = _run(path, {"z": Z, "y": Y, "W": Wv})
    value, grads = sd.value_and_grad(expr, [W], dtype="float64")(z=Z, y=Y, W=Wv)
    assert np.isfinite(got["loss"]) and np.isfinite(got["grad/W"]).all()
    np.testing.assert_allclose(got["loss"], value, rtol=1e-6)
    np.testing.assert_allclose(got["grad/W"], grads["W"], atol=1e-4)


# --------------------------------------------------------------------------- three independent oracles
# The exported gradients checked without symdl's own value_and_grad: finite differences of the
# exported loss, SymPy's scalar calculus, and PyTorch's autograd.


def _tiny_mlp():
    x = sd.input("x", 2)
    y = sd.input("y", 1)
    W = sd.param("W", (2, 2))
    b = sd.param("b", 2)
    V = sd.param("V", (2, 1))
    return x, y, [W, b, V], sd.losses.mse(sd.tanh(x @ W + b) @ V, y)


def _tiny_values():
    rng = np.random.default_rng(3)
    return {"x": rng.normal(size=(2, 2)), "y": rng.normal(size=(2, 1)), "W": rng.normal(size=(2, 2)),
            "b": rng.normal(size=2), "V": rng.normal(size=(2, 1))}


def test_exported_gradients_against_finite_differences(tmp_path):
    x, y, params, loss = _tiny_mlp()
    path = tmp_path / "mlp.onnx"
    export_onnx({"loss": loss}, path, inputs=[x, y], gradients=params, dtype="float64")  # weights are inputs
    run = session(onnx.load(str(path)))
    values = _tiny_values()

    def at(**changed):
        feed = {**values, **changed}
        return dict(zip([o.name for o in run.get_outputs()], run.run(None, feed)))

    exported = at()
    h = 1e-6
    for name in ("W", "b", "V"):
        fd = np.zeros_like(values[name])
        for idx in np.ndindex(fd.shape):
            up, down = values[name].copy(), values[name].copy()
            up[idx] += h
            down[idx] -= h
            fd[idx] = (at(**{name: up})["loss"] - at(**{name: down})["loss"]) / (2 * h)
        np.testing.assert_allclose(exported[f"grad/{name}"], fd, atol=1e-8, err_msg=name)


def test_exported_gradients_against_sympy_scalar_calculus(tmp_path):
    import sympy as sp

    x, y, params, loss = _tiny_mlp()
    path = tmp_path / "mlp.onnx"
    export_onnx({"loss": loss}, path, inputs=[x, y], gradients=params, dtype="float64")
    values = _tiny_values()
    exported = _run(path, values)
    X, Y = sp.Matrix(values["x"]), sp.Matrix(values["y"])
    W = sp.Matrix(2, 2, sp.symbols("w0:4"))
    b = sp.Matrix(1, 2, sp.symbols("b0:2"))
    V = sp.Matrix(2, 1, sp.symbols("v0:2"))
    hidden = (X * W + sp.ones(2, 1) * b).applyfunc(sp.tanh)
    scalar_loss = sum((e ** 2 for e in hidden * V - Y), sp.Integer(0)) / 2  # mean over 2 entries
    point = {**dict(zip(W, values["W"].ravel())), **dict(zip(b, values["b"])), **dict(zip(V, values["V"].ravel()))}
    for name, matrix in (("W", W), ("b", b), ("V", V)):
        want = np.array([float(sp.diff(scalar_loss, s).subs(point)) for s in matrix]).reshape(values[name].shape)
        np.testing.assert_allclose(exported[f"grad/{name}"], want, atol=1e-12, err_msg=name)
    assert abs(float(exported["loss"]) - float(scalar_loss.subs(point))) < 1e-12


def test_exported_cnn_gradients_against_pytorch_autograd(tmp_path):
    torch = pytest.importorskip("torch")
    from symdl.nn.torch_weights import to_torch_state_dict
    from symdl.nn.weights import weight_names

    model = nn.Sequential([nn.Conv2D(4, 3, padding="same"), nn.BatchNormalization(epsilon=1e-5),
                           nn.Activation("relu"), nn.MaxPooling2D(2), nn.Flatten(), nn.Dense(5)],
                          input_shape=(6, 6, 2))
    _compiled(model)
    tnn = torch.nn
    reference = tnn.Sequential(tnn.Conv2d(2, 4, 3, padding=1), tnn.BatchNorm2d(4), tnn.ReLU(), tnn.MaxPool2d(2),
                               tnn.Flatten(), tnn.Linear(36, 5))
    reference.load_state_dict(to_torch_state_dict(model, prefixes=["0", "1", "5"], tensors=True))
    path = tmp_path / "cnn.onnx"
    export_model(model, path, gradients=True)
    X = _data(model, 6)
    labels = np.array([0, 1, 2, 3, 4, 1])
    got = _run(path, {"input_layer": X, "target": np.eye(5, dtype=np.float32)[labels]})
    reference.train()
    loss = tnn.functional.cross_entropy(reference(torch.from_numpy(X.transpose(0, 3, 1, 2).copy())),
                                        torch.from_numpy(labels))
    loss.backward()
    assert abs(float(got["loss"]) - loss.item()) < 1e-6
    names = weight_names(model)
    grads = {k: got[f"grad/{names[k]}"] for k in ("K1", "b1", "gamma2", "beta2", "W6", "b6")}
    saved = model.get_weights()
    model.set_weights(grads)  # symdl's gradients laid out as PyTorch's, by the weights' own conversion
    as_torch = to_torch_state_dict(model, prefixes=["0", "1", "5"])
    model.set_weights(saved)
    for key, parameter in reference.named_parameters():
        np.testing.assert_allclose(as_torch[key], parameter.grad.numpy(), atol=1e-5, rtol=0, err_msg=key)


def test_several_inputs_and_outputs(tmp_path):
    a, b = nn.Input(shape=(3,), name="a"), nn.Input(shape=(4, 4, 1), name="b")
    pictures = nn.Flatten()(nn.Conv2D(2, 3, activation="relu")(b))
    joined = nn.Concatenate()([a, pictures])
    model = nn.Model([a, b], {"score": nn.Dense(1)(joined), "label": nn.Dense(3)(joined)})
    model.compile(loss={"score": "mse", "label": "softmax_cross_entropy"}, backend="numpy", dtype="float32",
                  loss_weights={"score": 0.5, "label": 1.0})
    path = tmp_path / "two.onnx"
    proto = export_model(model, path)
    assert [i.name for i in proto.graph.input] == ["a", "b"]
    assert [o.name for o in proto.graph.output] == ["score", "label"]
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 4, 4, 1)).astype(np.float32)
    got = _run(path, {"a": A, "b": B})
    want = model.predict({"a": A, "b": B})
    for name in ("score", "label"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0)
    export_model(model, path, gradients=True)
    S, L = rng.normal(size=(5, 1)).astype(np.float32), np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]
    got = _run(path, {"a": A, "b": B, "target/score": S, "target/label": L})
    f = sd.value_and_grad(model.loss, model.params, dtype="float32")
    value, grads = f(x1=A, x2=B, y1=S, y2=L, **model.get_weights())
    np.testing.assert_allclose(got["loss"], value, atol=1e-5, rtol=0)
    from symdl.nn.weights import weight_names

    for internal, keras in weight_names(model).items():
        np.testing.assert_allclose(got[f"grad/{keras}"], grads[internal], atol=1e-5, rtol=0, err_msg=keras)


def test_nested_model_weights_are_named_by_path(tmp_path):
    from symdl.nn.weights import weight_names

    xi = nn.Input(shape=(4,))
    inner = nn.Model(xi, nn.BatchNormalization()(nn.Dense(3, activation="tanh")(xi)))
    x = nn.Input(shape=(4,))
    model = _compiled(nn.Model(x, nn.Dense(2)(inner(x))))
    assert sorted(weight_names(model).values()) == [
        "dense_1/bias", "dense_1/kernel", "functional_1/batch_normalization_1/beta",
        "functional_1/batch_normalization_1/gamma", "functional_1/batch_normalization_1/moving_mean",
        "functional_1/batch_normalization_1/moving_variance", "functional_1/dense_1/bias",
        "functional_1/dense_1/kernel"]
    _check_forward(model, tmp_path)


def test_padding_and_reshape_layers_forward(tmp_path):
    if not (hasattr(nn, "ZeroPadding2D") and hasattr(nn, "Reshape")):
        pytest.skip("ZeroPadding2D / Reshape layers not in this tree")
    model = nn.Sequential([nn.ZeroPadding2D(1), nn.Conv2D(3, 3, activation="relu"), nn.Flatten(),
                           nn.Reshape((8, 8, 3)), nn.MaxPooling2D(2), nn.Flatten(), nn.Dense(2)], input_shape=IMAGE)
    _check_forward(_compiled(model), tmp_path)


def test_special_values_follow_numpy_rules():
    """Max, Min, sign, Heaviside, Abs and a Piecewise printed through the scalar vocabulary's
    primitives (Where, comparisons, IsNaN) give NumPy's results on NaN, ±inf and ±0."""
    import sympy as sp

    from symdl.graph.nodes import VARS
    from symdl.ir.kernels import Elementwise, Operand, Program

    a, b = VARS[0], VARS[1]
    bodies = {"max": sp.Max(a, b), "min": sp.Min(a, b), "sign": sp.sign(a), "step": sp.Heaviside(a),
              "abs": sp.Abs(a) + b, "piece": sp.Piecewise((a, a > b), (b * 2, a < 0), (sp.Integer(7), True))}
    x = sd.input("x", 9)
    z = sd.input("z", 9)
    kernels = [Elementwise(name, body, (Operand("x"), Operand("z"))) for name, body in bodies.items()]
    shape = (sd.n, 9)
    program = Program(kernels, {k: shape for k in bodies}, [x, z], [], {k: k for k in bodies})
    ir.check(program)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5, -2.0, 0.0, np.nan])
    arrays = {"x": np.stack([special, np.roll(special, 3)]), "z": np.stack([np.roll(special, 1), special])}
    want = backends.get("numpy").compile_program(program, "float64").run(arrays, {}, 2)
    got = compile_program(program, "float64").run(arrays, {}, 2)
    for name in bodies:
        np.testing.assert_array_equal(np.array(got[name]), np.array(want[name]), err_msg=name)
        assert np.array_equal(np.signbit(got[name]), np.signbit(want[name])), name


def test_export_and_serve_example_runs(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scratch = tmp_path / "tmp"  # the example's files go here, and must be gone afterwards
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    out = subprocess.run([sys.executable, "examples/export_and_serve.py", "--quick"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ours = float(out.stdout.split("symdl accuracy:")[1].split()[0])
    served = float(out.stdout.split("ONNX Runtime accuracy:")[1].split()[0])
    assert ours == served and ours > 0.5, out.stdout
    # importing onnxruntime 1.32 itself writes a 51-byte ".ses" id file into TMPDIR: not the example's
    assert [p.name for p in scratch.iterdir() if p.name != ".ses"] == []


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(H=st.integers(3, 7), W=st.integers(3, 7), C=st.integers(1, 3), F=st.integers(1, 3), kh=st.integers(1, 3),
       kw=st.integers(1, 3), stride=st.sampled_from([1, 2, (1, 2), (2, 1)]),
       padding=st.sampled_from(["valid", "same", 1, (1, 0)]), pool=st.sampled_from([None, "max", "avg"]),
       size=st.sampled_from([1, 2, (2, 1)]), pstride=st.sampled_from([None, 1]),
       activation=st.sampled_from(["relu", "tanh", "elu", "sigmoid", "softplus", "leaky_relu"]),
       seed=st.integers(0, 99))
def test_random_conv_geometries(H, W, C, F, kh, kw, stride, padding, pool, size, pstride, activation, seed):
    """Random convolution and pooling geometries: the float32 file (ONNX's own Conv and pools) equals
    ``predict``, and the exported gradients (gathers) equal ``value_and_grad``, at two batch sizes."""
    import tempfile
    from pathlib import Path

    from symdl.nn.weights import weight_names

    kh, kw = min(kh, H), min(kw, W)
    layers = [nn.Conv2D(F, (kh, kw), strides=stride, padding=padding, activation=activation)]
    try:
        model = nn.Sequential([*layers, nn.Flatten(), nn.Dense(2)], input_shape=(H, W, C))
        if pool is not None:
            model = nn.Sequential([*layers, (nn.MaxPooling2D if pool == "max" else nn.AveragePooling2D)(size, pstride),
                                   nn.Flatten(), nn.Dense(2)], input_shape=(H, W, C))
    except ValueError:  # a window larger than the image: not a model
        return
    _compiled(model, seed=seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        export_model(model, path)
        grads_path = Path(folder) / "g.onnx"
        export_model(model, grads_path, gradients=True)
        names = weight_names(model)
        for n in (1, 3):
            X = _data(model, n, seed=seed)
            np.testing.assert_allclose(_run(path, {"input_layer": X})["dense_1"], model.predict(X), atol=1e-5,
                                       rtol=0)
            Y = np.eye(2, dtype=np.float32)[np.arange(n) % 2]
            got = _run(grads_path, {"input_layer": X, "target": Y})
            value, grads = _value_and_grad(model, model.loss, X, Y)
            np.testing.assert_allclose(got["loss"], value, atol=1e-5, rtol=0)
            for internal, g in grads.items():
                np.testing.assert_allclose(got[f"grad/{names[internal]}"], g, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- a GPT block

V, T, D, H = 11, 5, 8, 2  # vocabulary, sequence length, width, heads


def gpt_block():
    """Token ids -> token and position embeddings -> pre-norm causal multi-head attention (residual)
    -> pre-norm GELU MLP (residual) -> LayerNorm -> logits per token."""
    inp = nn.Input(shape=(T,), dtype="int32")
    x = nn.TokenAndPositionEmbedding(V, T, D)(inp)
    h = nn.LayerNormalization(epsilon=1e-5)(x)
    x = x + nn.MultiHeadAttention(num_heads=H, key_dim=D // H)(h, h, use_causal_mask=True)
    h = nn.LayerNormalization(epsilon=1e-5)(x)
    x = x + nn.Dense(D)(nn.Dense(2 * D, activation="gelu")(h))
    return nn.Model(inp, nn.Dense(V)(nn.LayerNormalization(epsilon=1e-5)(x)))


def _gpt():
    model = gpt_block()
    model.compile(loss="softmax_cross_entropy", backend="numpy", dtype="float32", seed=3)
    rng = np.random.default_rng(4)
    model.set_weights({k: (rng.normal(scale=0.5, size=v.shape) + (1.0 if k.startswith("gamma") else 0.0))
                       .astype(np.float32) for k, v in model.get_weights().items()})
    return model


def _tokens(n, seed):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, V, size=(n, T)).astype(np.int32)
    return X, np.roll(X, -1, axis=1)


def test_gpt_block_forward(tmp_path):
    model = _gpt()
    path = tmp_path / "gpt.onnx"
    model.export(path, format="onnx")
    proto = onnx.load(str(path))
    inp, out = proto.graph.input[0], proto.graph.output[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", T, V]
    for n in (1, 6):
        X, _ = _tokens(n, seed=n)
        got = _run(path, {inp.name: X.astype(np.int64)})[out.name]
        np.testing.assert_allclose(got, model.predict(X), atol=1e-5, rtol=0)


def test_gpt_block_loss_and_gradients(tmp_path):
    from symdl.nn.weights import weight_names

    model = _gpt()
    path = tmp_path / "gpt_grads.onnx"
    model.export(path, format="onnx", gradients=True)
    names = weight_names(model)
    f = sd.value_and_grad(model.loss, model.params, backend="numpy", dtype="float32")
    for n in (2, 5):
        X, Y = _tokens(n, seed=10 + n)
        X[0, :3] = 2  # a repeated id: a scatter-add in the embedding's gradient
        onehot = np.eye(V, dtype=np.float32)[Y]
        got = _run(path, {model.inputs[0].name: X.astype(np.int64), "target": onehot})
        value, grads = f(x=X, y=onehot, **model.get_weights())
        assert got["loss"].shape == ()
        np.testing.assert_allclose(got["loss"], value, atol=1e-5, rtol=0)
        assert len(got) == 1 + len(model.params)
        for p in model.params:
            key = f"grad/{names[str(p.name)]}"
            assert got[key].shape == grads[str(p.name)].shape, key
            np.testing.assert_allclose(got[key], grads[str(p.name)], atol=1e-5, rtol=0, err_msg=key)


def test_recurrent_model_forward_and_gradients(tmp_path):
    """An LSTM feeding a bidirectional GRU (scans unrolled over T in the graph): ONNX Runtime's outputs
    equal ``predict`` at two batch sizes, and with ``gradients=True`` its loss and every weight's
    gradient (backpropagation through time as ONNX nodes) equal ``sd.value_and_grad``."""
    model = _compiled(nn.Sequential([nn.LSTM(5, return_sequences=True), nn.Bidirectional(nn.GRU(3)), nn.Dense(4)],
                                    input_shape=(6, 3)))
    _check_forward(model, tmp_path)
    _check_gradients(model, tmp_path)
