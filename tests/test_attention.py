"""Attention (issue 27): products within each sequence, the causal mask, ``MultiHeadAttention``.

Oracles on every new node: finite differences (float64), SymPy's scalar derivatives on tiny
shapes (``sd.prove``, T=3, d=2), PyTorch autograd on the same weights (``scaled_dot_product_attention``
with hand-written heads, float64, 1e-8), causal and not; every backend (numpy, cpu on 1, 2 and 3
threads, CUDA simulator, ONNX Runtime) against the NumPy reference, NaN and Inf included.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import sympy as sp

import symdl as sd
from helpers import assert_backend_matches_numpy, assert_close, finite_difference
from symdl.graph.nodes import ShapeMismatch, sequence_input
from symdl.ir import kernels as ir
from symdl.ops.attention import MASK, Causal, SeqMatMul, causal, mix, scores, seq_matmul
from symdl.run.pipeline import gradient_program

T, D = 4, 3


def _products(T=T, S=None, D=D, causal_mask=True):
    """Every orientation of a product within sequences, feeding a loss: (loss, params, arrays)."""
    S = T if S is None else S
    x = sequence_input("x", (T, D))
    c = sequence_input("c", (S, D))
    Wq, Wk, Wv = (sd.param(n, (D, 2)) for n in ("Wq", "Wk", "Wv"))
    s = scores(x @ Wq, c @ Wk, T, S) * (1 / sp.sqrt(2))
    if causal_mask:
        s = causal(s, T)
    P = sd.softmax(s)
    O = mix(P, c @ Wv, T, S)  # (n·T, 2)
    back = seq_matmul(P, x @ Wq, True, False, T, T)  # Pᵀ (x Wq): (n·S, 2)
    both = seq_matmul(P, P, True, True, T, S) if S == T else None  # Pᵀ Pᵀ
    loss = sd.sum_squares(sd.tanh(O)) + sd.total(sd.sigmoid(back))
    if both is not None:
        loss = loss + sd.total(both)
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(3, T, D)), "c": rng.normal(size=(3, S, D)),
              **{n: rng.normal(size=(D, 2)) for n in ("Wq", "Wk", "Wv")}}
    return loss, [Wq, Wk, Wv], arrays


# --------------------------------------------------------------------------- the graph


def test_products_within_sequences_shapes_and_print():
    x = sequence_input("x", (T, D)); W = sd.param("W", (D, 2))
    S = scores(x @ W, x @ W, T)
    assert isinstance(S, SeqMatMul) and S.shape == (T * sd.n, T)
    assert str(S) == "(x*W)*(x*W).T" and sp.latex(S) == r"\left(x W\right) \left(x W\right)^{T}"
    O = mix(sd.softmax(causal(S, T)), x, T)
    assert O.shape == (T * sd.n, D) and str(causal(S, T)).startswith("causal(")
    c = sequence_input("c", (6, D))
    cross = scores(x @ W, c @ W, T, 6)
    assert cross.shape == (T * sd.n, 6) and mix(sd.softmax(cross), c, T, 6).shape == (T * sd.n, D)
    back = seq_matmul(sd.softmax(cross), x, True, False, T, T)
    assert back.shape == (6 * sd.n, D)  # Pᵀ G: one row per key


def test_gradient_is_the_textbook_softmax_row_sum_form():
    """δS = P ⊙ (δP − rowsum(P ⊙ δP)): the softmax's adjoint holds the row sum, no Jacobian."""
    x = sequence_input("x", (T, D)); Wq = sd.param("Wq", (D, 2)); Wv = sd.param("Wv", (D, 2))
    P = sd.softmax(scores(x @ Wq, x @ Wq, T))
    loss = sd.sum_squares(mix(P, x @ Wv, T))
    g = sd.grad(loss, [Wq, Wv])
    text = str(g[Wv])
    assert text.startswith("x.T*(softmax(") and ".T*(2*(" in text  # δWv = xᵀ (Pᵀ δO)
    assert "sum_cols(" in str(g[Wq])  # the row sum of P ⊙ δP


def test_bad_shapes_are_clear_errors_before_anything_compiles():
    x = sequence_input("x", (T, D)); c = sequence_input("c", (5, D))
    with pytest.raises(ShapeMismatch, match="inner sizes differ"):
        seq_matmul(x, c @ sd.param("W", (D, 2)), False, False, T, 5)
    with pytest.raises(ShapeMismatch, match="causal mask needs square attention"):
        causal(scores(x, c, T, 5), T)
    with pytest.raises(ShapeMismatch, match="not sequences of 3 tokens"):
        scores(x, x, 3)
    with pytest.raises(ShapeMismatch, match="different numbers of sequences"):
        scores(x, sequence_input("y", (8, D)), T, 4)


# --------------------------------------------------------------------------- the three oracles


@pytest.mark.parametrize("S", [T, 6])
def test_gradients_match_finite_differences(S):
    loss, params, arrays = _products(S=S, causal_mask=S == T)
    f = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")
    _, grads = f(**arrays)
    for p in params:
        name = str(p.name)
        assert_close(grads[name], finite_difference(f, arrays, name), 1e-6, what=name)


@pytest.mark.slow
def test_sympy_scalar_proof_on_tiny_shapes():
    """T=3, d=2: the per-sequence chain rule (scores, causal softmax, mix) equals SymPy's derivatives
    of the loss expanded into scalars (about a minute: SymPy simplifies the softmax's exponentials)."""
    x = sequence_input("x", (3, 2))
    Wq, Wv = sd.param("Wq", (2, 1)), sd.param("Wv", (2, 1))
    P = sd.softmax(causal(scores(x @ Wq, x @ Wv, 3), 3))
    loss = sd.total(mix(P, x @ Wv, 3))
    proof = sd.prove(loss, [Wq, Wv], {"n": 1})
    assert proof, str(proof)
    assert proof.entries == 4


def test_sympy_scalar_entries_of_every_orientation():
    """Each orientation's entries (what ``prove`` expands) against NumPy's per-sequence products."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(-3, 4, size=(6, 3)), rng.integers(-3, 4, size=(6, 3))
    A, B = sp.ImmutableMatrix(a), sp.ImmutableMatrix(b)
    stack = lambda m: m.reshape(2, 3, 3)  # noqa: E731
    for ta in (False, True):
        for tb in (False, True):
            node = SeqMatMul(A, B, ta, tb, 3, 3)
            want = np.matmul(stack(a).transpose(0, 2, 1) if ta else stack(a),
                             stack(b).transpose(0, 2, 1) if tb else stack(b)).reshape(6, 3)
            got = np.array([[int(node._entry(i, j)) for j in range(3)] for i in range(6)])
            np.testing.assert_array_equal(got, want, err_msg=f"trans {ta}, {tb}")


def test_hessian_vector_products_reach_through_the_products():
    """The gradient of ``<grad, v>`` (VJP of VJP through SeqMatMul and the mask) against differences
    of the gradient; ``explain_hvp`` (forward mode: both nodes' JVP rules) prints through them."""
    loss, params, arrays = _products()
    Wq = params[0]
    Vd = sd.param("Vd", (D, 2))
    f2 = sd.value_and_grad(sd.total(sd.hadamard(sd.grad(loss, [Wq])[Wq], Vd)), [Wq], backend="numpy")
    v = np.random.default_rng(7).normal(size=(D, 2))
    got = f2(**arrays, Vd=v)[1]["Wq"]
    f = sd.value_and_grad(loss, [Wq], backend="numpy")
    h = 1e-5
    up = f(**{**arrays, "Wq": arrays["Wq"] + h * v})[1]["Wq"]
    down = f(**{**arrays, "Wq": arrays["Wq"] - h * v})[1]["Wq"]
    assert_close(got, (up - down) / (2 * h), 1e-6, what="Hv")
    assert sd.hvp(loss, [Wq], [Vd])[Wq].shape == (D, 2)
    assert "causal(" in str(sd.explain_hvp(loss, [Wq], [Vd]))


def _torch_mha(torch, x, weights, heads, key_dim, causal_mask, context=None):
    """Keras's MultiHeadAttention written with torch ops on the same weights."""
    F = torch.nn.functional
    context = x if context is None else context
    q = x @ weights["query_kernel"] + weights["query_bias"]
    k = context @ weights["key_kernel"] + weights["key_bias"]
    v = context @ weights["value_kernel"] + weights["value_bias"]
    split = lambda t, w: t.reshape(t.shape[0], t.shape[1], heads, w).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(split(q, key_dim), split(k, key_dim), split(v, key_dim), is_causal=causal_mask)
    o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], heads * key_dim)
    return o @ weights["output_kernel"] + weights["output_bias"]


@pytest.mark.parametrize("causal_mask,S", [(True, T), (False, T), (False, 6)])
def test_multi_head_attention_matches_pytorch_sdpa(causal_mask, S):
    torch = pytest.importorskip("torch", reason="PyTorch is the autograd oracle")
    heads, key_dim = 2, 3
    mha = sd.nn.MultiHeadAttention(num_heads=heads, key_dim=key_dim)
    mha.causal = causal_mask
    x = sequence_input("x", (T, D))
    context = x if S == T else sequence_input("c", (S, D + 1))
    built = mha.build_both(1, [x, context], [x, context])
    loss = sd.sum_squares(sd.tanh(built.train))
    names = [str(p.name) for p in built.params]
    assert names == ["query_kernel1", "query_bias1", "key_kernel1", "key_bias1", "value_kernel1", "value_bias1",
                     "output_kernel1", "output_bias1"]
    rng = np.random.default_rng(7)
    arrays = {"x": rng.normal(size=(3, T, D))}
    if S != T:
        arrays["c"] = rng.normal(size=(3, S, D + 1))
    for p in built.params:
        arrays[str(p.name)] = rng.normal(size=p.value_shape)
    value, grads = sd.value_and_grad(loss, built.params + [x], backend="cpu", dtype="float64")(**arrays)
    t = {k[:-1] if k[-1] == "1" else k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    out = _torch_mha(torch, t["x"], t, heads, key_dim, causal_mask, t.get("c"))
    (torch.tanh(out) ** 2).sum().backward()
    assert value == pytest.approx(float((torch.tanh(out) ** 2).sum().detach()), rel=1e-10)
    for name in names:
        assert_close(grads[name], t[name[:-1]].grad.numpy(), 1e-8, what=name)
    assert_close(grads["x"], t["x"].grad.numpy().reshape(-1, D), 1e-8, what="x")


def test_multi_head_attention_errors_name_the_layer_and_shapes():
    x = sd.nn.Input(shape=(5,), dtype="int32")
    h = sd.nn.Embedding(10, 4)(x)
    with pytest.raises(ValueError, match="dropout"):
        sd.nn.MultiHeadAttention(2, 4, dropout=0.1)
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        sd.nn.MultiHeadAttention(0, 4)
    with pytest.raises(TypeError, match="mha\\(x, x\\)"):
        sd.nn.MultiHeadAttention(2, 4)(h)
    flat = sd.nn.Input(shape=(4,))
    with pytest.raises(ValueError, match="MultiHeadAttention.*query of shape .* is not a batch of sequences"):
        sd.nn.MultiHeadAttention(2, 4)(flat, flat)
    out = sd.nn.MultiHeadAttention(2, 4)(h, h, use_causal_mask=True)
    assert out.shape == (5, 4)


# --------------------------------------------------------------------------- backends


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_backend_matches_numpy_on_one_two_and_three_threads(dtype, monkeypatch):
    loss, params, arrays = _products()
    assert_backend_matches_numpy(loss, params, arrays, "cpu", dtype, 1e-12 if dtype == "float64" else 3e-5,
                                 threads=(1, 2, 3), monkeypatch=monkeypatch)


def test_block_products_use_blas_sized_blocks_and_nan_inf_propagate():
    """Blocks large enough for BLAS (T=32, 16 columns) and tiny ones; NaN and Inf in one sequence
    stay in that sequence and match NumPy's propagation."""
    from symdl.backends import get

    for T_, d in ((32, 16), (3, 2)):
        a, b = sequence_input("a", (T_, d)), sequence_input("b", (T_, d))
        from symdl.ir.lowering import lower

        prog = lower({"s": scores(a, b, T_), "m": mix(scores(a, b, T_), b, T_),
                      "t": seq_matmul(scores(a, b, T_), a, True, False, T_, T_)})
        assert sum(isinstance(k, ir.BlockGemm) for k in prog.kernels) == 3
        rng = np.random.default_rng(1)
        n = 3
        ext = {"a": rng.normal(size=(n * T_, d)), "b": rng.normal(size=(n * T_, d))}
        ext["a"][T_ + 1, 0] = np.nan
        ext["b"][2 * T_, 1] = np.inf
        want = get("numpy").compile_program(prog, "float64").run(ext, {}, n)
        got = get("cpu").compile_program(prog, "float64").run(ext, {}, n)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12, err_msg=name)
            assert np.isfinite(want[name][:T_]).all()  # the first sequence is untouched


def test_causal_mask_is_exactly_zero_probability_and_finite():
    x = sequence_input("x", (T, D))
    P = sd.softmax(causal(scores(x, x, T), T))
    from symdl.backends import get
    from symdl.ir.lowering import lower

    prog = lower({"P": P})
    ext = {"x": np.random.default_rng(0).normal(size=(2 * T, D)) * 100}
    for backend in ("numpy", "cpu"):
        out = get(backend).compile_program(prog, "float64").run(ext, {}, 2)["P"].reshape(2, T, T)
        assert np.all(np.triu(np.ones((T, T)), 1)[None] * out == 0) and np.allclose(out.sum(-1), 1)
    assert Causal(scores(x, x, T), T)._int_entry(0, 1) == scores(x, x, T)._int_entry(0, 1) + MASK


def test_onnx_backend_matches_numpy():
    pytest.importorskip("onnx", reason="the ONNX printer needs onnx")
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the printed graph")
    from symdl.backends import get
    from symdl.backends.onnx import compile_program

    loss, params, arrays = _products(S=T)
    program, _ = gradient_program(loss, params)
    n = 3
    external = {"x": arrays["x"].reshape(-1, D), "c": arrays["c"].reshape(-1, D),
                **{str(p.name): arrays[str(p.name)] for p in params}}
    want = get("numpy").compile_program(program, "float64").run(external, {}, n)
    got = compile_program(program, "float64").run(external, {}, n)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.cudasim
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
def test_cuda_simulator_matches_numpy():
    loss, params, arrays = _products(T=3, D=2)
    assert_backend_matches_numpy(loss, params, arrays, "cuda")


def test_explain_prints_the_attention_backward_in_textbook_form_and_it_is_the_gradient():
    """``sd.explain`` on a one-head block names S, P, O and prints δO, δV = Pᵀ δO, δP = δO Vᵀ,
    δS = P ⊙ (δP − rowsum(P ⊙ δP)), δK = δSᵀ Q/√d, δQ = δS K/√d; the printed δS, evaluated, equals
    the adjoint symdl compiles."""
    from symdl.backends import get
    from symdl.graph.nodes import Broadcast, SumCols, elementwise
    from symdl.ir.lowering import lower

    x = sequence_input("x", (T, D)); y = sequence_input("y", (T, D))
    Wq, Wk, Wv = (sd.param(n, (D, 4)) for n in ("Wq", "Wk", "Wv"))
    P = sd.softmax(causal(scores(x @ Wq, x @ Wk, T) * (1 / sp.sqrt(4)), T))
    loss = sd.losses.mse(mix(P, x @ Wv, T) @ sd.param("Wo", (4, D)), y)
    e = sd.explain(loss, [Wq, Wk, Wv])
    text = str(e)
    for line in ("S1 = causal((Z1*Z2.T)/2)", "P1 = softmax(S1)", "O1 = P1*Z3", "δ3 = P1.T*δO1", "δP1 = δO1*Z3.T",
                 "δS1 = P1⊙(δP1 - rowsum(P1⊙δP1))", "δ2 = (δS1/2).T*Z1", "δ1 = (δS1/2)*Z2"):
        assert line in text, (line, text)
    assert r"\operatorname{rowsum}" in e.latex and "uses of S1" not in text
    S = next(s for s, p in e.attention.items())
    dP = e.adj[P]
    textbook = elementwise(lambda p, d, r: p * (d - r), P, dP, Broadcast(SumCols(sd.hadamard(P, dP)), *P.shape))
    prog = lower({"derived": e.adj[S], "printed": textbook})
    rng = np.random.default_rng(4)
    ext = {"x": rng.normal(size=(3 * T, D)), "y": rng.normal(size=(3 * T, D)),
           **{n: rng.normal(size=(D, 4)) for n in ("Wq", "Wk", "Wv")}, "Wo": rng.normal(size=(4, D))}
    out = get("numpy").compile_program(prog, "float64").run(ext, {}, 3)
    np.testing.assert_allclose(out["printed"], out["derived"], rtol=1e-12, atol=1e-14)


def test_attention_model_saves_loads_and_a_token_model_nests(tmp_path):
    """``model.save`` then ``sd.nn.load`` replays ``mha([q, v])`` with the saved mask: the same
    predictions; a token model used as a layer of another model checks its ids (T,)."""
    Tn, V = 5, 9
    x = sd.nn.Input(shape=(Tn,), dtype="int32")
    h = sd.nn.TokenAndPositionEmbedding(V, Tn, 8)(x)
    h = h + sd.nn.MultiHeadAttention(2, 4)(h, h, use_causal_mask=True)
    model = sd.nn.Model(x, sd.nn.Dense(V)(sd.nn.LayerNormalization()(h)))
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.AdamW(1e-2))
    X = np.random.default_rng(0).integers(0, V, size=(6, Tn))
    model.fit(X, np.roll(X, 1, axis=1), epochs=1, batch_size=3, verbose=0)
    model.save(tmp_path / "gpt.symdl")
    again = sd.nn.load(tmp_path / "gpt.symdl")
    np.testing.assert_allclose(again.predict(X), model.predict(X), rtol=1e-6, atol=1e-7)
    outer_in = sd.nn.Input(shape=(Tn,), dtype="int32")
    outer = sd.nn.Model(outer_in, sd.nn.Dense(2)(model(outer_in)))
    outer.compile(loss="mse")
    assert outer.predict(X).shape == (6, Tn, 2)
