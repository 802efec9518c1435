"""``sd.explain`` on functional models: a skip connection's fan-out is named and its δ printed as the
sum of one term per branch (text and LaTeX), the terms add up to the adjoint the chain rule
derived, and models without a branch print no fan-out."""
from __future__ import annotations

import numpy as np

import symdl as sd
from symdl.nn import Input, Model


def residual():
    """x -> A1 = tanh(Dense) -> A2 = relu(Dense) -> Dense, + A1 (the skip) -> Dense(2)."""
    x = Input(shape=(3,))
    a = sd.nn.Dense(3, activation="tanh")(x)
    b = sd.nn.Dense(3, activation="relu")(a)
    model = Model(x, sd.nn.Dense(2)(sd.nn.Dense(3)(b) + a))
    model.compile(loss="mse", backend="numpy", dtype="float64")
    return model


FAN_OUT = """
Fan-out (a value read by several nodes: its δ is the sum of one term per branch)
  uses of A1: A1*W2; Z3 + A1
  ∂L/∂A1 = δ2*W2.T + δ3"""


def test_a_skip_connection_is_named_with_one_delta_term_per_branch():
    model = residual()
    text = str(sd.explain(model.loss, model.params))
    assert text.endswith(FAN_OUT), text
    assert "  Z4 = (Z3 + A1)*W5 + b5" in text and "  δ1 = (1 - A1**2)⊙(δ3 + δ2*W2.T)" in text
    assert residual().formulas().endswith(FAN_OUT)


def test_the_branch_terms_add_up_to_the_derived_adjoint():
    model = residual()
    e = sd.explain(model.loss, model.params)
    (node, terms), = e.fan_outs()
    assert e.names[node] == ("A", 1) and len(terms) == 2
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(4, 3)), "y": rng.normal(size=(4, 2))}
    arrays.update({str(p.name): rng.normal(size=p.value_shape) for p in model.params})
    total = sd.run.pipeline.compile_outputs({"adj": e.adj[node], "first": terms[0][1],
                                                        "second": terms[1][1]})
    feed = {k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in arrays.items()}
    out = total.run(feed, {}, 4)
    np.testing.assert_allclose(out["first"] + out["second"], out["adj"], rtol=1e-12)
    assert np.abs(out["first"]).max() > 0 and np.abs(out["second"]).max() > 0


def test_latex_shows_the_fan_out():
    model = residual()
    latex = sd.explain(model.loss, model.params).latex
    assert r"\text{uses of } A_{1} &: A_{1} W_{2},\; Z_{3} + A_{1}" in latex
    assert r"\frac{\partial L}{\partial A_{1}} &= \delta_{2} W_{2}^{T} + \delta_{3}" in latex


def test_a_shared_layer_and_a_residual_conv_show_their_fan_outs():
    x = Input(shape=(3,))
    shared = sd.nn.Dense(3, activation="tanh")
    model = Model(x, sd.nn.Dense(2)(shared(x) + shared(sd.nn.Dense(3)(x))))
    model.compile(loss="mse", backend="numpy")
    assert "  uses of W1: x*W1; Z2*W1\n  ∂L/∂W1 = x.T*δ1 + Z2.T*δ3" in model.formulas()
    img = Input(shape=(4, 4, 1))
    h = sd.nn.Conv2D(1, 3, padding="same")(sd.nn.Conv2D(1, 3, padding="same", activation="relu")(img))
    conv = Model(img, sd.nn.Dense(2)(sd.nn.GlobalAveragePooling2D()(sd.nn.Activation("relu")(h + img))))
    conv.compile(loss="mse", backend="numpy")
    text = str(sd.explain(conv.loss, conv.params + [conv.x]))
    assert "  uses of x: patches(x); Z2 + x\n  ∂L/∂x = δ2 + col2im(δ1*K1.T)" in text


def test_no_fan_out_without_a_branch():
    model = sd.nn.Sequential([sd.nn.Dense(4), sd.nn.BatchNormalization(), sd.nn.Activation("relu"),
                              sd.nn.Dense(2)], input_dim=3)
    model.compile(backend="numpy")  # batch norm's statistics and the loss's softmax read values, no branch
    assert "Fan-out" not in model.formulas()
