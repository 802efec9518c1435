"""Graph building, stability, errors, printing, explain and derivation cost."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symdl as sd
from symdl.graph.nodes import ShapeMismatch
from symdl.run.validate import ArrayError

ROOT = Path(__file__).resolve().parents[1]


def small_model():
    x = sd.input("x", 2); y = sd.input("y", 1)
    W1 = sd.param("W1", (2, 4)); b1 = sd.param("b1", 4)
    W2 = sd.param("W2", (4, 1)); b2 = sd.param("b2", 1)
    logits = sd.tanh(x @ W1 + b1) @ W2 + b2
    return x, y, [W1, b1, W2, b2], logits


# --------------------------------------------------------------------------- graph & shapes


def test_nodes_are_sympy_objects_with_symbolic_batch():
    x, y, params, logits = small_model()
    assert isinstance(logits, sp.Basic) and logits.shape == (sd.n, 1)
    assert params[1].shape == (1, 4)  # a vector is a row inside the graph
    assert hash(sd.tanh(x @ params[0])) == hash(sd.tanh(x @ params[0]))  # structural: CSE by hashing


def test_matmul_shape_mismatch_names_both_operands():
    x = sd.input("x", 3); W = sd.param("W", (2, 4))
    with pytest.raises(ShapeMismatch, match=r"x \(n, 3\) @ W \(2, 4\)"):
        x @ W


def test_add_shape_mismatch_names_both_operands():
    x = sd.input("x", 3); W = sd.param("W", (3, 4)); b = sd.param("b", 5)
    with pytest.raises(ShapeMismatch, match=r"x\*W \(n, 4\).*b \(1, 5\)"):
        x @ W + b


def test_loss_target_shape_mismatch():
    x = sd.input("x", 3); y = sd.input("y", 2)
    with pytest.raises(ShapeMismatch, match="prediction x .*target y"):
        sd.losses.mse(x, y)


def test_matrix_times_matrix_is_refused_with_advice():
    a = sd.param("a", (2, 2)); b = sd.param("b", (2, 2))
    with pytest.raises(TypeError, match="sd.hadamard"):
        a * b


def test_bad_names_and_shapes():
    with pytest.raises(ValueError, match="reserved"):
        sd.input("n", 2)
    with pytest.raises(ValueError, match="identifier"):
        sd.param("W 1", (2, 2))
    with pytest.raises(ValueError, match="positive"):
        sd.param("W", (0, 2))


def test_loss_must_be_scalar():
    x = sd.input("x", 2); W = sd.param("W", (2, 2))
    with pytest.raises(ValueError, match=r"scalar \(1, 1\)"):
        sd.grad(x @ W, [W])


def test_gradient_shapes_match_params():
    x, y, params, logits = small_model()
    g = sd.grad(sd.losses.bce_with_logits(logits, y), params)
    assert [tuple(g[p].shape) for p in params] == [(2, 4), (1, 4), (4, 1), (1, 1)]


# --------------------------------------------------------------------------- activations


def test_derivatives_are_the_textbook_forms():
    t = sp.Symbol("t", real=True)
    f = sd.functions
    assert sp.diff(f.Sigmoid(t), t) == f.Sigmoid(t) * (1 - f.Sigmoid(t))
    assert sp.diff(sp.tanh(t), t) == 1 - sp.tanh(t) ** 2
    assert sp.diff(f.ReLU(t), t) == sp.Heaviside(t, 0)
    assert sp.diff(f.Softplus(t), t) == f.Sigmoid(t)


@pytest.mark.parametrize("name", ["sigmoid", "softplus", "relu", "leaky_relu", "elu", "gelu", "silu"])
def test_declared_derivative_equals_sp_diff_of_formula(name):
    """Where a shorter derivative is declared, it equals SymPy's derivative of the formula."""
    t = sp.Symbol("t", real=True)
    cls = sd.functions.REGISTRY[name]
    formula = sd.functions.expand_activations(cls(t), use_impl=False)
    declared = sd.functions.expand_activations(sp.diff(cls(t), t), use_impl=False)
    derived = sp.diff(formula, t)
    for v in (-2.3, -0.4, 0.7, 1.9):
        assert float(declared.subs(t, v)) == pytest.approx(float(derived.subs(t, v)), rel=1e-12)


def test_backward_reuses_forward_activation():
    x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1))
    h = sd.sigmoid(x @ W)
    g = sd.grad(sd.losses.mse(h, y), [W])[W]
    assert h in set(sp.preorder_traversal(g)), "σ′ should be written with the forward σ node"
    assert "sigmoid(x*W)**2" in str(g) or "1 - sigmoid(x*W)" in str(g)


def test_custom_activation_derivative_and_printing():
    mish = sd.activation("mish", lambda t: t * sp.tanh(sp.log(1 + sp.exp(t))))
    x = sd.input("x", 3)
    assert str(mish(x)) == "mish(x)"
    t = sp.Symbol("t", real=True)
    d = mish.function.derivative_body
    expected = sp.diff(t * sp.tanh(sp.log(1 + sp.exp(t))), t)
    assert float((d - expected).subs(t, 0.37)) == pytest.approx(0, abs=1e-14)


def test_custom_activation_with_unprintable_function_is_rejected():
    with pytest.raises(ValueError, match="'gamma'"):
        sd.activation("bad", lambda t: sp.gamma(t))
    with pytest.raises(ValueError, match="built in"):
        sd.activation("relu", lambda t: t)


# --------------------------------------------------------------------------- stability


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extreme_logits_give_finite_losses_and_gradients(dtype):
    z = sd.input("z", 3); y = sd.input("y", 3); W = sd.param("W", (3, 3))
    logits = z @ W
    Z = np.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 500.0]])
    Y = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for loss in (sd.losses.softmax_cross_entropy(logits, y), sd.losses.bce_with_logits(logits, y),
                 sd.losses.mse(sd.sigmoid(logits), y) + sd.mean(sd.softplus(logits)) + sd.mean(sd.silu(logits))):
        value, grads = sd.value_and_grad(loss, [W], dtype=dtype)(z=Z, y=Y, W=np.eye(3))
        assert np.isfinite(value) and np.isfinite(grads["W"]).all()
    ce = sd.losses.softmax_cross_entropy(logits, y)
    value, _ = sd.value_and_grad(ce, [W], dtype=dtype)(z=Z, y=Y, W=np.eye(3))
    assert value == pytest.approx((2000 + 2000) / 2, rel=1e-6)  # the exact value, not inf
    bce = sd.losses.bce_with_logits(logits, y)
    value, _ = sd.value_and_grad(bce, [W], dtype=dtype)(z=Z, y=Y, W=np.eye(3))
    assert value == pytest.approx((1000 + 1000 + np.log(2) + 1000 + 1000 + 500) / 6, rel=1e-6)


# --------------------------------------------------------------------------- call-time errors


def call_args():
    rng = np.random.default_rng(0)
    return dict(x=rng.normal(size=(5, 2)), y=np.ones((5, 1)), W1=rng.normal(size=(2, 4)), b1=np.zeros(4),
                W2=rng.normal(size=(4, 1)), b2=np.zeros(1))


@pytest.fixture(scope="module")
def f():
    x, y, params, logits = small_model()
    return sd.value_and_grad(sd.losses.bce_with_logits(logits, y), params)


def test_missing_array(f):
    a = call_args(); del a["b1"]
    with pytest.raises(ArrayError, match=r"missing array\(s\): 'b1' \(4,\)"):
        f(**a)


def test_unknown_array(f):
    with pytest.raises(ArrayError, match="unknown array.*'W3'"):
        f(**call_args(), W3=np.ones(2))


def test_wrong_param_shape(f):
    a = call_args(); a["W1"] = np.ones((3, 4))
    with pytest.raises(ArrayError, match=r"'W1' has shape \(3, 4\), expected \(2, 4\)"):
        f(**a)


def test_wrong_input_width(f):
    a = call_args(); a["x"] = np.ones((5, 3))
    with pytest.raises(ArrayError, match=r"'x' has shape \(5, 3\), expected \(n, 2\)"):
        f(**a)


def test_batch_sizes_must_agree(f):
    a = call_args(); a["y"] = np.ones((4, 1))
    with pytest.raises(ArrayError, match="batch sizes differ: 'x' has 5 rows, 'y' has 4"):
        f(**a)


def test_nan_and_wrong_dtype(f):
    a = call_args(); a["x"][0, 0] = np.nan
    with pytest.raises(ArrayError, match="'x' contains NaN"):
        f(**a)
    a = call_args(); a["y"] = np.array([["a"]] * 5)
    with pytest.raises(ArrayError, match="'y' has dtype <U1"):
        f(**a)


def test_vector_param_accepts_row_and_returns_vector(f):
    a = call_args(); a["b1"] = np.zeros((1, 4))
    _, grads = f(**a)
    assert grads["b1"].shape == (4,) and grads["b2"].shape == (1,)


def test_batch_size_can_change_between_calls(f):
    a = call_args()
    v1, _ = f(**a)
    a2 = dict(a, x=a["x"][:3], y=a["y"][:3])
    v2, _ = f(**a2)
    assert np.isfinite(v1) and np.isfinite(v2) and v1 != v2


# --------------------------------------------------------------------------- reading the formulas


def test_gradient_text_and_latex():
    x, y, params, logits = small_model()
    g = sd.grad(sd.losses.bce_with_logits(logits, y) + 1e-4 * sd.l2(params[0]), params)
    text = str(g[params[0]])
    assert text.startswith("x.T*(") and "⊙(1 - tanh(x*W1 + b1)**2)" in text and "0.0002*W1" in text
    assert str(g[params[1]]).startswith("sum_rows(")
    latex = sd.latex(g[params[0]])
    assert r"x^{T}" in latex and r"\odot" in latex and r"\sigma" in latex
    assert "sum_rows" in sp.pretty(g[params[1]])


def test_explain_two_hidden_layers_reads_like_a_textbook():
    x = sd.input("x", 2); y = sd.input("y", 1)
    W1 = sd.param("W1", (2, 8)); b1 = sd.param("b1", 8)
    W2 = sd.param("W2", (8, 8)); b2 = sd.param("b2", 8)
    W3 = sd.param("W3", (8, 1)); b3 = sd.param("b3", 1)
    logits = sd.relu(sd.tanh(x @ W1 + b1) @ W2 + b2) @ W3 + b3
    e = sd.explain(sd.losses.bce_with_logits(logits, y), [W1, b1, W2, b2, W3, b3])
    text = str(e)
    for line in ["Z1 = x*W1 + b1", "A1 = tanh(Z1)", "Z2 = A1*W2 + b2", "A2 = relu(Z2)", "Z3 = A2*W3 + b3",
                 "δ3 = (sigmoid(Z3) - y)/n", "∂L/∂W3 = A2.T*δ3", "∂L/∂b3 = sum_rows(δ3)",
                 "δ2 = (δ3*W3.T)⊙1[Z2 > 0]", "∂L/∂W2 = A1.T*δ2", "δ1 = (δ2*W2.T)⊙(1 - A1**2)",
                 "∂L/∂W1 = x.T*δ1", "∂L/∂b1 = sum_rows(δ1)"]:
        assert line in text, f"missing {line!r} in\n{text}"
    assert r"\delta_{1} &=" in e.latex and e._repr_latex_().startswith("$$")
    assert "Backward pass" in e._repr_markdown_()


def test_derivation_is_linear_in_depth():
    """A 32-layer MLP derives in well under 2 s (no expansion into scalars)."""
    x = sd.input("x", 8); y = sd.input("y", 2)
    h, params = x, []
    for i in range(32):
        W = sd.param(f"W{i}", (8, 8)); b = sd.param(f"b{i}", 8)
        params += [W, b]
        h = sd.tanh(h @ W + b)
    W = sd.param("Wout", (8, 2)); params.append(W)
    start = time.perf_counter()
    g = sd.grad(sd.losses.softmax_cross_entropy(h @ W, y), params)
    elapsed = time.perf_counter() - start
    assert len(g) == len(params)
    assert elapsed < 2.0, f"derivation took {elapsed:.2f} s"


def test_readme_examples_run(capsys, tmp_path):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 3, "README lost its examples"
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the training example saves a checkpoint
    try:
        for block in blocks:  # later blocks reuse earlier names, as a reader would
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our README
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "(2, 16) (16,)" in out and "Backward pass" in out and "'accuracy': 0.97" in out
    assert "total FLOPs per step" in out
