"""``sd.explain`` prints a normalisation's δ in textbook form (issue 27):
``δZ = (δx̂ − mean(δx̂) − x̂ ⊙ mean(δx̂ ⊙ x̂))/σ`` with ``δx̂ = ∂L/∂x̂ = γ ⊙ δy`` (the textbook's ``g``), the
means over each row's features for layer norm (``mean_cols``) and over the batch for batch norm
(``mean_rows``), in text and LaTeX.

The printed text cannot lie: each test evaluates the printed line itself with NumPy (its names
bound to the values of the named nodes) and compares it with the adjoint symdl derived and with the
weight gradient ``sd.value_and_grad`` computes from it. The compiled step is unchanged (the chain
rule's graph), so ``tests/test_normalization.py``'s oracles still hold.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import symdl as sd
from symdl.formulas.normalization import SOURCES
from symdl.run.pipeline import compile_outputs

LAYER = "(δx̂1 - mean_cols(δx̂1) - x̂1⊙mean_cols(δx̂1⊙x̂1))/σ1"
BATCH = "(δx̂1 - mean_rows(δx̂1) - x̂1⊙mean_rows(δx̂1⊙x̂1))/σ1"


def _leaves(m=4):
    return (sd.input("x", 3), sd.input("y", 2), sd.param("W", (3, m)), sd.param("g", m), sd.param("b", m),
            sd.param("W2", (m, 2)))


def _arrays(params, n=5, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.normal(size=(n, 3)), "y": rng.normal(size=(n, 2))}
    arrays.update({str(p.name): rng.normal(size=p.value_shape) for p in params})
    return arrays


def _rhs(text: str, lhs: str) -> str:
    """The right-hand side printed for ``lhs``."""
    found = [line.split(" = ", 1)[1] for line in text.splitlines() if line.startswith(f"  {lhs} = ")]
    assert len(found) == 1, text
    return found[0]


def _evaluate(rhs: str, values: dict) -> np.ndarray:
    """The printed formula as NumPy: ``⊙`` the elementwise product, ``mean_cols`` / ``mean_rows`` the
    means of each row / column, the names bound to ``values``."""
    code = rhs.replace("δx̂1", "dxhat").replace("x̂1", "xhat").replace("σ1", "sigma").replace("⊙", "*")
    scope = {"mean_cols": lambda a: a.mean(1, keepdims=True), "mean_rows": lambda a: a.mean(0, keepdims=True)}
    return eval(code, scope, dict(values))  # noqa: S307 - the test's own printed formula


def _evaluate_line(e, lhs: str, arrays: dict, n: int) -> np.ndarray:
    """The line printed for ``lhs`` evaluated with NumPy: every name in it (``Zk``, ``x̂k``, ``σk``, ``δk``,
    ``δx̂k``, ``δhk``, a parameter) bound to its value, ``*`` the matrix product, ``⊙`` the elementwise one,
    ``mean_cols`` / ``mean_rows`` the means of each row / column."""
    rhs = _rhs(str(e), lhs)
    table = {str(sym.name): node for node, sym in e._symbols(False).items()}
    table.update({str(sym.name): adj for adj, sym in e._deltas(False).items()})
    used = sorted((k for k in table if re.search(_word(k), rhs)), key=len, reverse=True)
    feed = {k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in arrays.items()}
    program = compile_outputs({f"v{i}": table[k] for i, k in enumerate(used)}, "numpy", "float64")
    values = {f"v{i}": np.array(v) for i, v in enumerate(program.run(feed, {}, n).values())}
    code = rhs
    for i, k in enumerate(used):
        code = re.sub(_word(k), f"v{i}", code)
    values.update({k: v for k, v in feed.items() if re.search(_word(k), code)})
    code = code.replace("*", "@").replace("⊙", "*")
    scope = {"mean_cols": lambda a: a.mean(1, keepdims=True), "mean_rows": lambda a: a.mean(0, keepdims=True)}
    return eval(code, scope, values)  # noqa: S307 - the test's own printed formula


def _word(name: str) -> str:
    return r"(?<![\w\u0302])" + re.escape(name) + r"(?![\w\u0302])"


def _named_values(e, z, arrays, n):
    """The values of ``δx̂1``, ``x̂1``, ``σ1`` and of the adjoint of the normalisation's input ``z``."""
    (xhat,) = e.textbook[z]
    program = compile_outputs({"dxhat": e.adj[xhat], "xhat": xhat, "sigma": SOURCES[xhat].sigma, "dz": e.adj[z]},
                              "numpy", "float64")
    feed = {k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in arrays.items()}
    return {k: np.array(v) for k, v in program.run(feed, {}, n).items()}


def test_batch_norm_delta_prints_and_equals_the_gradient():
    x, y, W, g, b, W2 = _leaves()
    loss = sd.losses.mse(sd.relu(sd.batch_norm(x @ W, g, b)) @ W2, y)
    params = [W, g, b, W2]
    e = sd.explain(loss, params)
    text = str(e)
    assert _rhs(text, "δ1") == BATCH
    assert "  ∂L/∂W = x.T*δ1" in text and "mean_rows(X): each column's mean over the rows" in text
    assert r"\delta_{1} &= \frac{\delta^{\hat{x}}_{1} - \operatorname{mean}_{\mathrm{rows}}\left(" \
           r"\delta^{\hat{x}}_{1}\right) - \hat{x}_{1} \odot \operatorname{mean}_{\mathrm{rows}}\left(" \
           r"\delta^{\hat{x}}_{1} \odot \hat{x}_{1}\right)}{\sigma_{1}}" in e.latex
    arrays = _arrays(params)
    (z,) = e.textbook
    values = _named_values(e, z, arrays, 5)
    printed = _evaluate(_rhs(text, "δ1"), values)
    np.testing.assert_allclose(printed, values["dz"], rtol=1e-10, atol=1e-12)
    _, grads = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")(**arrays)
    np.testing.assert_allclose(arrays["x"].T @ printed, grads["W"], rtol=1e-10, atol=1e-12)  # ∂L/∂W = x.T*δ1


def test_layer_norm_after_an_activation_names_its_input_delta():
    x, y, W, g, b, W2 = _leaves()
    loss = sd.losses.mse(sd.layer_norm(sd.tanh(x @ W), g, b) @ W2, y)
    params = [W, g, b, W2]
    e = sd.explain(loss, params)
    text = str(e)
    assert _rhs(text, "δA1") == LAYER and _rhs(text, "δ1") == "δA1⊙(1 - A1**2)"
    assert text.count("∂L/∂W = ") == 1
    assert r"\delta^{A}_{1} &= \frac{\delta^{\hat{x}}_{1} - \operatorname{mean}_{\mathrm{cols}}" in e.latex
    arrays = _arrays(params, seed=1)
    (z,) = e.textbook
    values = _named_values(e, z, arrays, 5)
    printed = _evaluate(_rhs(text, "δA1"), values)
    np.testing.assert_allclose(printed, values["dz"], rtol=1e-10, atol=1e-12)
    _, grads = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")(**arrays)
    A = np.tanh(arrays["x"] @ arrays["W"])
    np.testing.assert_allclose(arrays["x"].T @ (printed * (1 - A**2)), grads["W"], rtol=1e-10, atol=1e-12)


def test_a_token_model_prints_layer_norm_in_textbook_form_and_matches_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch is the autograd oracle")
    T, V, D = 3, 5, 4
    inp = sd.nn.Input(shape=(T,), dtype="int32")
    h = sd.nn.LayerNormalization()(sd.nn.Dense(D)(sd.nn.Embedding(V, D)(inp)))
    model = sd.nn.Model(inp, sd.nn.Dense(V)(h))
    model.compile(backend="numpy", dtype="float64")
    text = model.formulas()
    assert _rhs(text, "δ1") == LAYER  # the Dense before the norm is Z1
    e = sd.explain(model.loss, model.params)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, size=(2, T))
    weights = {k: rng.normal(size=v.shape) for k, v in model.get_weights().items()}
    arrays = {"x": ids, "y": np.eye(V)[rng.integers(0, V, size=(2, T))], **weights}
    (z,) = e.textbook
    feed = {"x": ids.reshape(-1, 1).astype(float), "y": arrays["y"].reshape(-1, V),
            **{k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in weights.items()}}
    (xhat,) = e.textbook[z]
    out = compile_outputs({"dxhat": e.adj[xhat], "xhat": xhat, "sigma": SOURCES[xhat].sigma}, "numpy", "float64")
    values = {k: np.array(v) for k, v in out.run(feed, {}, 2).items()}
    printed = _evaluate(_rhs(text, "δ1"), values)
    # PyTorch: the gradient at the layer norm's input, the same weights
    Z = torch.from_numpy(weights["embeddings1"][ids.reshape(-1)] @ weights["W2"] + weights["b2"]).requires_grad_()
    norm = torch.nn.functional.layer_norm(Z, (D,), torch.from_numpy(weights["gamma3"]),
                                          torch.from_numpy(weights["beta3"]), eps=1e-3)
    logits = norm @ torch.from_numpy(weights["W4"]) + torch.from_numpy(weights["b4"])
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(arrays["y"].reshape(-1, V))).backward()
    np.testing.assert_allclose(printed, Z.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_a_skip_around_the_norm_adds_its_own_term():
    """``h + layer_norm(h)`` (a pre-norm block's residual): ``∂L/∂h`` is the normalisation's term in
    textbook form plus the skip's, in the δ line and in the fan-out section; the printed sum equals
    the derived adjoint."""
    x, y, W, g, b, W2 = _leaves(m=3)
    h = sd.tanh(x @ W)
    loss = sd.losses.mse((h + sd.layer_norm(h, g, b)) @ W2, y)
    params = [W, g, b, W2]
    e = sd.explain(loss, params)
    text = str(e)
    assert _rhs(text, "δA1") == LAYER + " + δ2*W2.T"
    assert "  uses of A1: x̂1; A1 + x̂1⊙g + b\n  ∂L/∂A1 = " + LAYER + " + δ2*W2.T" in text
    arrays = _arrays(params, seed=3)
    (z,) = e.textbook
    values = _named_values(e, z, arrays, 5)
    feed = {k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in arrays.items()}
    values["delta2"] = np.array(compile_outputs({"d": e.adj[e.zs[1]]}, "numpy", "float64").run(feed, {}, 5)["d"])
    values["W2"] = arrays["W2"]
    code = _rhs(text, "δA1").replace("δ2*W2.T", "delta2 @ W2.T")
    np.testing.assert_allclose(_evaluate(code, values), values["dz"], rtol=1e-10, atol=1e-12)


def test_a_pre_norm_residual_token_model_reads_as_a_textbook():
    """Embedding -> h1; h2 = h1 + gelu(Dense(LayerNorm(h1))); Dense(LayerNorm(h2)): both norms' input δ in
    textbook form, the residual's δ added; every printed δ line evaluates to the derived adjoint."""
    T, V, D = 3, 5, 4
    inp = sd.nn.Input(shape=(T,), dtype="int32")
    h = sd.nn.TokenAndPositionEmbedding(V, T, D)(inp)
    h = h + sd.nn.Dense(D, activation="gelu")(sd.nn.LayerNormalization()(h))
    model = sd.nn.Model(inp, sd.nn.Dense(V)(sd.nn.LayerNormalization()(h)))
    model.compile(backend="numpy", dtype="float64")
    e = sd.explain(model.loss, model.params)
    text = str(e)
    two = LAYER.replace("x̂1", "x̂2").replace("σ1", "σ2")
    assert _rhs(text, "δh2") == two and _rhs(text, "δh1") == LAYER + " + δh2"
    rng = np.random.default_rng(4)
    arrays = {"x": rng.integers(0, V, size=(2 * T, 1)).astype(float),
              "y": np.eye(V)[rng.integers(0, V, size=2 * T)]}
    arrays.update({k: rng.normal(size=v.shape) for k, v in model.get_weights().items()})
    h1, h2 = sorted(e.textbook, key=lambda z: e.names[z][1])
    feed = {k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in arrays.items()}
    derived = compile_outputs({"d1": e.adj[h1], "d2": e.adj[h2]}, "numpy", "float64").run(feed, {}, 2)
    for line, want in (("δh1", derived["d1"]), ("δh2", derived["d2"])):
        np.testing.assert_allclose(_evaluate_line(e, line, arrays, 2), np.array(want), rtol=1e-10, atol=1e-12)
        assert np.abs(np.array(want)).max() > 0


def test_image_batch_norm_and_hvp_explanations_still_print():
    img = sd.nn.Input(shape=(4, 4, 2))
    h = sd.nn.BatchNormalization()(sd.nn.Conv2D(2, 3, padding="same")(img))
    model = sd.nn.Model(img, sd.nn.Dense(2)(sd.nn.GlobalAveragePooling2D()(h)))
    model.compile(loss="mse", backend="numpy", dtype="float64")
    assert "mean_rows(δx̂1)" in model.formulas()
    x, y, W, g, b, W2 = _leaves()
    loss = sd.losses.mse(sd.layer_norm(x @ W, g, b) @ W2, y)
    text = str(sd.explain_hvp(loss, [W, W2], [sd.param("V1", (3, 4)), sd.param("V2", (4, 2))]))
    assert f"  δ1 = {LAYER}" in text and "(Hv)_W = " in text
