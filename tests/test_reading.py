"""Reading the formulas (issue 12, item 5): golden text and LaTeX of explain, explain_hvp,
softmax cross-entropy's δ, named custom derivatives, Piecewise/Abs, and no ⊙ beside a scalar."""
from __future__ import annotations

import re

import numpy as np
import pytest
import sympy as sp

import symdl as sd
from symdl.backends import get as get_backend
from symdl.backends.base import as_dtype
from symdl.ir.lowering import lower
from helpers import assert_close


def _mlp():
    x = sd.input("x", 3); y = sd.input("y", 2)
    W1 = sd.param("W1", (3, 4)); b1 = sd.param("b1", 4); W2 = sd.param("W2", (4, 2)); b2 = sd.param("b2", 2)
    V1 = sd.param("V1", (3, 4)); c1 = sd.param("c1", 4); V2 = sd.param("V2", (4, 2)); c2 = sd.param("c2", 2)
    loss = sd.losses.softmax_cross_entropy(sd.tanh(x @ W1 + b1) @ W2 + b2, y) + 1e-3 * sd.l2(W1)
    return loss, [W1, b1, W2, b2], [V1, c1, V2, c2]


def _run(outputs: dict, arrays: dict, n: int) -> dict:
    runner = get_backend("numpy").compile_program(lower(outputs), as_dtype("float64"))
    return runner.run(arrays, {}, n)


def _arrays(leaves, n=5, seed=0):
    rng = np.random.default_rng(seed)
    return {str(l.name): rng.normal(size=(n, int(l.shape[1])) if isinstance(l, sd.Input) else l.value_shape)
            for l in leaves}


# --------------------------------------------------------------------------- explain_hvp

HVP_GOLDEN = """\
Forward pass
  Z1 = x*W1 + b1
  A1 = tanh(Z1)
  Z2 = A1*W2 + b2
  L = 0.001*sum(W1**2) + sum(logsumexp(Z2) - sum_cols(Z2⊙y))/n

Backward pass (δk = ∂L/∂Zk)
  δ2 = (softmax(Z2) - y)/n
  ∂L/∂W2 = A1.T*δ2
  ∂L/∂b2 = sum_rows(δ2)
  δ1 = (δ2*W2.T)⊙(1 - A1**2)
  ∂L/∂W1 = x.T*δ1 + 0.002*W1
  ∂L/∂b1 = sum_rows(δ1)

Directional derivatives along v = (V1, c1, V2, c2) (Ẋ = dX(θ + εv)/dε at ε = 0)
  Ż1 = x*V1 + c1
  Ȧ1 = Ż1⊙(1 - A1**2)
  Ż2 = c2 + Ȧ1*W2 + A1*V2

Hessian-vector product ((Hv)_θ = (∂L/∂θ)˙, δ̇k = (∂L/∂Zk)˙)
  δ̇2 = softmax(Z2)⊙(Ż2 - sum_cols(Ż2⊙softmax(Z2)))/n
  (Hv)_W2 = Ȧ1.T*δ2 + A1.T*δ̇2
  (Hv)_b2 = sum_rows(δ̇2)
  δ̇1 = (1 - A1**2)⊙(δ̇2*W2.T + δ2*V2.T) - 2*A1⊙(δ2*W2.T)⊙Ȧ1
  (Hv)_W1 = x.T*δ̇1 + 0.002*V1
  (Hv)_b1 = sum_rows(δ̇1)"""


def test_explain_hvp_reads_like_a_textbook():
    loss, params, vectors = _mlp()
    e = sd.explain_hvp(loss, params, vectors)
    assert str(e) == HVP_GOLDEN
    latex = e.latex
    for row in [r"\dot{Z}_{1} &= x V_{1} + c_{1}", r"\dot{A}_{1} &= \dot{Z}_{1} \odot \left(1 - A_{1}^{2}\right)",
                r"(H v)_{W_{2}} &= \dot{A}_{1}^{T} \delta_{2} + A_{1}^{T} \dot{\delta}_{2}",
                r"(H v)_{b_{1}} &= \mathbf{1}^{\top} \dot{\delta}_{1}"]:
        assert row in latex, f"missing {row!r} in\n{latex}"
    assert latex.startswith(r"\begin{aligned}") and e._repr_latex_().startswith("$$")
    assert "Hessian-vector product" in e._repr_markdown_()


def test_explain_hvp_expressions_equal_hvp():
    """Forward over reverse (explain_hvp's Ż, δ̇) and reverse over reverse (sd.hvp) agree."""
    loss, params, vectors = _mlp()
    e = sd.explain_hvp(loss, params, vectors)
    hv = sd.hvp(loss, params, vectors)
    arrays = _arrays(sd.graph.leaves(loss) + vectors)
    arrays["y"] = np.eye(2)[[0, 1, 1, 0, 1]]
    out = _run({**{f"a_{p.name}": hv[p] for p in params}, **{f"b_{p.name}": e.hvp[p] for p in params}}, arrays, 5)
    for p in params:
        assert_close(out[f"b_{p.name}"], out[f"a_{p.name}"], rtol=1e-12, atol=1e-12)
        assert np.abs(out[f"a_{p.name}"]).max() > 1e-3  # not trivially zero


def test_explain_hvp_of_a_piecewise_linear_loss_says_where_it_is_zero():
    x = sd.input("x", 3); y = sd.input("y", 1)
    W1 = sd.param("W1", (3, 4)); W2 = sd.param("W2", (4, 1)); V1 = sd.param("V1", (3, 4)); V2 = sd.param("V2", (4, 1))
    text = str(sd.explain_hvp(sd.losses.mae(sd.relu(x @ W1) @ W2, y), [W1, W2], [V1, V2]))
    assert text.endswith("""
  Ȧ1 = Ż1⊙1[Z1 > 0]
  Ż2 = Ȧ1*W2 + A1*V2

Hessian-vector product ((Hv)_θ = (∂L/∂θ)˙, δ̇k = (∂L/∂Zk)˙)
  δ̇2 = 0
  (Hv)_W2 = Ȧ1.T*δ2
  δ̇1 = (δ2*V2.T)⊙1[Z1 > 0]
  (Hv)_W1 = x.T*δ̇1"""), text


def test_explain_hvp_checks_its_directions():
    loss, params, vectors = _mlp()
    with pytest.raises(ValueError, match="one per parameter"):
        sd.explain_hvp(loss, params, vectors[:2])
    with pytest.raises(ValueError, match="must have its shape"):
        sd.explain_hvp(loss, params, [vectors[2]] + vectors[1:])


# --------------------------------------------------------------------------- softmax cross-entropy


def test_softmax_cross_entropy_delta_is_softmax_minus_y():
    x = sd.input("x", 3); y = sd.input("y", 4); W = sd.param("W", (3, 4)); b = sd.param("b", 4)
    e = sd.explain(sd.losses.softmax_cross_entropy(x @ W + b, y), [W, b])
    lines = str(e).splitlines()
    assert "  δ1 = (softmax(Z1) - y)/n" in lines
    assert r"\delta_{1} &= \frac{\operatorname{softmax}\left(Z_{1}\right) - y}{n}" in e.latex
    general = sd.explain(sd.losses.softmax_cross_entropy(x @ W + b, y, rows_sum_to_one=False), [W, b])
    assert "  δ1 = sum_cols(y/n)⊙softmax(Z1) - y/n" in str(general).splitlines()


def test_softmax_cross_entropy_forms_agree_on_distributions_only():
    x = sd.input("x", 3); y = sd.input("y", 4); W = sd.param("W", (3, 4))
    rng = np.random.default_rng(3)
    arrays = {"x": rng.normal(size=(6, 3)), "W": rng.normal(size=(3, 4))}
    rows = rng.random((6, 4))
    textbook = sd.value_and_grad(sd.losses.softmax_cross_entropy(x @ W, y), [W])
    general = sd.value_and_grad(sd.losses.softmax_cross_entropy(x @ W, y, rows_sum_to_one=False), [W])
    for target, same in [(np.eye(4)[[0, 1, 2, 3, 0, 1]], True), (rows / rows.sum(1, keepdims=True), True),
                         (rows, False)]:
        (v1, g1), (v2, g2) = textbook(y=target, **arrays), general(y=target, **arrays)
        assert np.isclose(v1, v2) == same and np.allclose(g1["W"], g2["W"]) == same
    z = arrays["x"] @ arrays["W"]  # the general form is PyTorch's -Σ y log softmax(z), for any y
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert general(y=rows, **arrays)[0] == pytest.approx(-(rows * logp).sum() / 6, rel=1e-12)


# --------------------------------------------------------------------------- named custom derivatives


def test_custom_activation_derivative_is_named_once():
    mish = sd.activation("mish_r", lambda t: t * sp.tanh(sp.log(1 + sp.exp(t))))
    x = sd.input("x", 3); y = sd.input("y", 2)
    W1 = sd.param("W1", (3, 4)); b1 = sd.param("b1", 4); W2 = sd.param("W2", (4, 4)); b2 = sd.param("b2", 4)
    W3 = sd.param("W3", (4, 2)); b3 = sd.param("b3", 2)
    params = [W1, b1, W2, b2, W3, b3]
    loss = sd.losses.mse(mish(mish(x @ W1 + b1) @ W2 + b2) @ W3 + b3, y)
    text = str(sd.explain(loss, params))
    assert "  δ2 = (δ3*W3.T)⊙mish_r′(Z2)" in text.splitlines()
    assert "  δ1 = (δ2*W2.T)⊙mish_r′(Z1)" in text.splitlines()
    where = text.split("\nwhere\n")[1].splitlines()
    assert where == ["  mish_r′(z) = (z*exp(z)/cosh(log(exp(z) + 1))**2 + (exp(z) + 1)*tanh(log(exp(z) + 1)))/(exp(z) + 1)"]
    assert text.count("mish_r′(z) =") == 1 and "exp(Z" not in text  # never expanded per layer
    latex = sd.explain(loss, params).latex
    assert r"\odot \operatorname{mish_r}'\left(Z_{2}\right)" in latex
    assert r"\operatorname{mish_r}'\left(z\right) &= " in latex
    # the named derivative still computes the right gradient, and its own derivative (Hessians)
    arrays = _arrays([x, y] + params)
    errors = sd.check_grad(loss, params, arrays)
    assert max(errors.values()) < 1e-6, errors
    hv = str(sd.explain_hvp(loss, params, [sd.param(f"V{i}", p.value_shape) for i, p in enumerate(params)]))
    assert "mish_r′′(Z1)" in hv and "  mish_r′′(z) = " in hv and hv.count("  mish_r′(z) = ") == 1


def test_custom_derivative_that_reuses_the_value_stays_inline():
    ex = sd.activation("my_exp", sp.exp)  # exp′ = exp: the backward pass reuses A1
    x = sd.input("x", 2); y = sd.input("y", 3); W = sd.param("W", (2, 3))
    text = str(sd.explain(sd.losses.mse(ex(x @ W), y), [W]))
    assert "my_exp′" not in text and "where" not in text and "  δ1 = 2*A1⊙(A1 - y)/(3*n)" in text


# --------------------------------------------------------------------------- Piecewise, Abs, ⊙


def test_piecewise_and_abs_read_as_textbook_notation():
    x = sd.input("x", 3); t = sd.input("t", 1)
    W1 = sd.param("W1", (3, 4)); b1 = sd.param("b1", 4); Wo = sd.param("Wo", (4, 1))
    e = sd.explain(sd.losses.huber(sd.tanh(x @ W1 + b1) @ Wo, t), [W1, b1])
    lines = str(e).splitlines()
    assert "  L = sum({(Z2 - t)**2/2 if |Z2 - t| < 1; |Z2 - t| - 1/2 otherwise})/n" in lines
    assert "  δ2 = {Z2 - t if |Z2 - t| < 1; sign(Z2 - t) otherwise}/n" in lines
    assert (r"\delta_{2} &= \frac{\begin{cases} Z_{2} - t & \text{if } \left|{Z_{2} - t}\right| < 1 \\ "
            r"\operatorname{sign}{\left(Z_{2} - t \right)} & \text{otherwise} \end{cases}}{n}") in e.latex
    e = sd.explain(sd.losses.mae(sd.leaky_relu(x @ W1 + b1) @ Wo, t) + 0.1 * sd.l1(W1), [W1, b1])
    lines = str(e).splitlines()
    assert "  L = 0.1*sum(|W1|) + sum(|Z2 - t|)/n" in lines
    assert "  δ1 = (δ2*Wo.T)⊙{1 if Z1 > 0; 0.01 otherwise}" in lines
    assert "Piecewise" not in str(e) + e.latex and "Abs" not in str(e) + e.latex


_SCALAR = r"(\bn\b|\blr\b|\bpi\b|sqrt\(\d+\))"
_ODOT_BESIDE_SCALAR = re.compile(r"(\d|" + _SCALAR + r")⊙|⊙(\d(?!\[)|" + _SCALAR + ")")  # 1[Z > 0] is a matrix


def test_no_odot_beside_a_scalar_anywhere():
    x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 3)); V = sd.param("V", (3, 1))
    lr = sp.Symbol("lr")
    exprs = [sd.grad(sd.losses.mse(sd.gelu(x @ W) @ V, y), [W])[W],
             sd.graph.elementwise(lambda a: sp.pi * a * sp.erf(sp.sqrt(2) * a), x @ W),
             lr * sd.hadamard(sd.tanh(x @ W), x @ W) / sd.n]
    for act in ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus", "gelu", "silu"]:
        h = sd.functions.get(act)(x @ W)
        exprs.append(sd.hvp(sd.losses.huber(h @ V, y), [W], [sd.param("U", (2, 3))])[W])
    for e in exprs:
        text, latex = str(e), sd.latex(e)
        assert not _ODOT_BESIDE_SCALAR.search(text), text
        assert not re.search(r"(\d|\\pi|\\sqrt\{2\}|\blr) \\odot|\\odot (\d|\\pi|\\sqrt\{2\}|lr\b)", latex), latex
    gelu = str(exprs[0])
    assert "sqrt(2)*(x*W)" in gelu and "⊙" in gelu


# --------------------------------------------------------------------------- train.source names the δ's


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_train_source_comments_name_what_explain_prints(backend):
    x = sd.input("x", 3); y = sd.input("y", 2)
    W1 = sd.param("W1", (3, 4)); b1 = sd.param("b1", 4); W2 = sd.param("W2", (4, 2)); b2 = sd.param("b2", 2)
    params = [W1, b1, W2, b2]
    loss = sd.losses.softmax_cross_entropy(sd.tanh(x @ W1 + b1) @ W2 + b2, y)
    explained = [line.strip() for line in str(sd.explain(loss, params)).splitlines()]
    deltas = [line for line in explained if line.startswith("δ")]
    assert deltas == ["δ2 = (softmax(Z2) - y)/n", "δ1 = (δ2*W2.T)⊙(1 - A1**2)"]
    train = sd.compile(loss, params, optimizer=sd.optim.Adam(1e-3), backend=backend, dtype="float64")
    comments = [line.strip() for line in train.source.splitlines() if line.strip().startswith("# ")]
    for line in deltas + ["A1 = tanh(Z1)", "∂L/∂W1 = x.T*δ1", "∂L/∂b2 = sum_rows(δ2)"]:
        hits = {c for c in comments if c.endswith("  " + line)}
        assert len(hits) == 1, f"not one kernel comment names {line!r}:\n" + "\n".join(comments)
    delta_buffer = next(c for c in comments if c.endswith("δ1 = (δ2*W2.T)⊙(1 - A1**2)"))
    assert re.match(r"# t\d+( \(n, 4\):|:| =) elementwise( -> k\d+\([\w, ]+\))?  δ1 = ", delta_buffer)
    f = sd.value_and_grad(loss, params, backend=backend)
    assert any(c.endswith("  δ2 = (softmax(Z2) - y)/n") for c in f.source.splitlines())
    # a comment is a note, not code: the program computes what it did without notes
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(6, 3)), "y": np.eye(2)[[0, 1, 1, 0, 0, 1]]}
    assert np.isfinite(train.step(**batch))


def test_program_notes_follow_lowering_to_buffers():
    x = sd.input("x", 2); W = sd.param("W", (2, 3))
    z = x @ W
    a = sd.tanh(z)
    prog = lower({"h": a, "s": sd.total(a)},
                 notes={a: "A1 = tanh(Z1)", z: "Z1 = x*W", sd.param("U", 1): "not in the graph"})
    assert prog.notes == {"t0": "Z1 = x*W", "h": "A1 = tanh(Z1)"}
    assert prog.note("h") == "  A1 = tanh(Z1)" and prog.note("s") == ""
    assert "# h = elementwise  A1 = tanh(Z1)" in get_backend("numpy").compile_program(prog, as_dtype("float64")).source
