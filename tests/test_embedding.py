"""Token inputs and embeddings (issue 27, first part): the lookup ``E[ids]`` and its scatter-add.

Oracles: finite differences, SymPy's scalar derivatives on tiny shapes (``sd.prove``), PyTorch's
``nn.Embedding`` autograd on the same weights (float64, 1e-8), and the NumPy backend against the
CPU backend (one and two threads, LLVM IR, never Numba's compiler), the CUDA simulator and ONNX.
A repeated id must accumulate its gradient (the scatter-ADD), checked explicitly.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import sympy as sp

import symdl as sd
from symdl.graph.nodes import sequence_input
from helpers import assert_backend_matches_numpy, assert_close, finite_difference, run_threaded
from symdl.ir import kernels as ir
from symdl.ir.lowering import lower
from symdl.ops.embedding import Gather, ScatterAdd, embedding, position_rows, sequence_length
from symdl.run.pipeline import gradient_program
from symdl.run.validate import ArrayError

V, T, D, C = 7, 4, 3, 5  # vocabulary, sequence length, embedding width, classes


def _per_token_classifier(T=T, V=V, D=D, C=C):
    """Embedding -> Dense -> softmax cross-entropy per token (mean over every token), targets (n, T, C)."""
    ids = sd.input("ids", (T,), dtype="int32")
    y = sequence_input("y", (T, C))
    E = sd.param("E", (V, D)); W = sd.param("W", (D, C)); b = sd.param("b", C)
    logits = embedding(E, ids, where="Embedding layer 1") @ W + b
    return sd.losses.softmax_cross_entropy(logits, y), [E, W, b], ids


def _arrays(n=3, seed=0, T=T, V=V, D=D, C=C, repeat=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(n, T))
    if repeat:
        ids[0, :2] = 2  # a repeated id in one sequence, and across sequences
        ids[-1, -1] = 2
    labels = rng.integers(0, C, size=(n, T))
    return {"ids": ids, "y": np.eye(C)[labels], "E": rng.normal(size=(V, D)), "W": rng.normal(size=(D, C)),
            "b": rng.normal(size=C)}


# --------------------------------------------------------------------------- graph


def test_token_input_is_a_column_of_ids_and_an_embedding_is_rows():
    ids = sd.input("ids", (T,), dtype="int32")
    E = sd.param("E", (V, D))
    h = embedding(E, ids)
    assert ids.shape == (T * sd.n, 1) and h.shape == (T * sd.n, D)
    assert sequence_length(h) == T and sequence_length(sd.tanh(h @ sd.param("W", (D, 2)))) == T
    assert isinstance(h, Gather) and str(h) == "E[ids]" and sp.latex(h) == r"E\left[ids\right]"
    g = sd.grad(sd.total(h), [E])[E]
    assert isinstance(g, ScatterAdd) and str(g).startswith("scatter_add(ids, ")
    assert sp.latex(g).startswith(r"\operatorname{scatter\_add}\left(ids, ")
    program = lower({"g": g, "h": h})
    assert sorted(k.kind for k in program.kernels if isinstance(k, (ir.Gather, ir.ScatterAdd))) == [
        "gather", "scatter_add"]


def test_no_one_hot_product_over_the_vocabulary():
    """The step holds a gather and a scatter-add, no product with a (·, V) matrix: O(n·T·d) work."""
    loss, params, _ = _per_token_classifier(V=1000)
    program, _ = gradient_program(loss, params)
    kinds = [type(k) for k in program.kernels]
    assert ir.Gather in kinds and ir.ScatterAdd in kinds
    for k in program.kernels:
        if isinstance(k, ir.Gemm):
            shapes = [program.shape_of(b) for b in (k.a, k.b, k.out)]
            assert not any(1000 in tuple(int(d) for d in s if not sp.sympify(d).free_symbols) for s in shapes), k


def test_bad_builder_arguments_are_clear_errors():
    E = sd.param("E", (V, D))
    with pytest.raises(sd.graph.ShapeMismatch, match="not token ids"):
        embedding(E, sd.input("x", 3))
    with pytest.raises(ValueError, match="int32"):
        sd.input("ids", (T,), dtype="float32")
    with pytest.raises(ValueError, match="sequence_length"):
        sd.input("ids", (T, 2), dtype="int32")
    with pytest.raises(ValueError, match="image shape is"):  # a pair is no token input without a dtype
        sd.input("bad", (T, 2))
    ids = sd.input("ids", (9,), dtype="int32")
    with pytest.raises(sd.graph.ShapeMismatch, match="longer than sequence_length=8"):
        position_rows(sd.param("P", (8, D)), embedding(E, ids))


# --------------------------------------------------------------------------- the three oracles


def test_forward_is_the_row_lookup_and_a_repeated_id_accumulates():
    ids = sd.input("ids", (3,), dtype="int32")
    E = sd.param("E", (5, 2))
    G = sequence_input("G", (3, 2))
    loss = sd.total(sd.hadamard(embedding(E, ids), G))  # dL/dE[v] = sum of G's rows whose id is v
    Ev = np.arange(10.0).reshape(5, 2)
    idv = np.array([[4, 1, 4], [4, 0, 1]])
    Gv = np.arange(1.0, 13.0).reshape(2, 3, 2)
    for backend in ("numpy", "cpu"):
        value, grads = sd.value_and_grad(loss, [E], backend=backend)(ids=idv, E=Ev, G=Gv)
        assert value == pytest.approx(float(np.sum(Ev[idv] * Gv)))
        want = np.zeros((5, 2))
        rows = Gv.reshape(-1, 2)
        for r, v in enumerate(idv.ravel()):
            want[v] += rows[r]
        assert want[4].tolist() == (rows[0] + rows[2] + rows[3]).tolist()  # id 4 three times
        np.testing.assert_array_equal(grads["E"], want)
        assert grads["E"][2].tolist() == [0.0, 0.0] and grads["E"][3].tolist() == [0.0, 0.0]


def test_gradients_match_finite_differences():
    loss, params, _ = _per_token_classifier()
    arrays = _arrays()
    f = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")
    _, grads = f(**arrays)
    for name in ("E", "W", "b"):
        assert_close(grads[name], finite_difference(f, arrays, name), 1e-6, what=name)


def test_sympy_scalar_proof_on_tiny_shapes():
    """T=3, d=2 (vocabulary 3, n=2): symdl's gather/scatter-add chain rule equals SymPy's scalar
    derivatives of the expanded loss (the lookup a Kronecker-delta sum over the symbolic ids)."""
    ids = sd.input("ids", (3,), dtype="int32")
    E = sd.param("E", (3, 2)); W = sd.param("W", (2, 2))
    y = sequence_input("y", (3, 2))
    loss = sd.losses.mse(sd.tanh(embedding(E, ids) @ W), y)
    proof = sd.prove(loss, [E, W])
    assert proof, str(proof)
    assert proof.entries == 10


def test_matches_pytorch_embedding_autograd():
    torch = pytest.importorskip("torch", reason="PyTorch is the autograd oracle")
    loss, params, _ = _per_token_classifier()
    arrays = _arrays(n=4, seed=5)
    value, grads = sd.value_and_grad(loss, params, backend="cpu", dtype="float64")(**arrays)

    emb = torch.nn.Embedding(V, D).double()
    lin = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(arrays["E"]))
        lin.weight.copy_(torch.from_numpy(arrays["W"].T))  # torch Linear is (out, in)
        lin.bias.copy_(torch.from_numpy(arrays["b"]))
    logits = lin(emb(torch.from_numpy(arrays["ids"])))  # (n, T, C)
    labels = torch.from_numpy(arrays["y"].argmax(-1))
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, C), labels.reshape(-1))  # mean over all tokens
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-8, abs=1e-8)
    assert_close(grads["E"], emb.weight.grad.numpy(), 1e-8, what="E")
    assert_close(grads["W"], lin.weight.grad.numpy().T, 1e-8, what="W")
    assert_close(grads["b"], lin.bias.grad.numpy(), 1e-8, what="b")


def test_second_order_reaches_through_gather_and_scatter_add():
    """``hvp`` (the gradient of ``<grad, v>``: scatter-add's VJP is a gather) against differences of
    the gradient; ``explain_hvp`` (forward mode: both nodes' JVP rules) prints through both."""
    loss, params, _ = _per_token_classifier()
    arrays = _arrays(seed=2)
    E = params[0]
    Vd = sd.param("Vd", (V, D))
    Hv = sd.hvp(loss, [E], [Vd])[E]
    f2 = sd.value_and_grad(sd.total(sd.hadamard(sd.grad(loss, [E])[E], Vd)), [E], backend="numpy")
    v = np.random.default_rng(7).normal(size=(V, D))
    got = f2(**arrays, Vd=v)[1]["E"]
    f = sd.value_and_grad(loss, [E], backend="numpy")
    h = 1e-5
    up = f(**{**arrays, "E": arrays["E"] + h * v})[1]["E"]
    down = f(**{**arrays, "E": arrays["E"] - h * v})[1]["E"]
    assert_close(got, (up - down) / (2 * h), 1e-6, what="Hv")
    assert "scatter_add(ids" in str(Hv)
    text = str(sd.explain_hvp(loss, [E], [Vd]))
    assert "Vd[ids]" in text and "scatter_add(ids" in text


# --------------------------------------------------------------------------- backends


def _gradient_case(seed=0):
    loss, params, _ = _per_token_classifier()
    return loss, params, _arrays(n=5, seed=seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_backend_matches_numpy_on_one_and_two_threads(dtype, monkeypatch):
    loss, params, arrays = _gradient_case()
    assert_backend_matches_numpy(loss, params, arrays, "cpu", dtype, 1e-12 if dtype == "float64" else 2e-5,
                                 threads=(1, 2), monkeypatch=monkeypatch)


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="LLVM IR needs the JIT")
def test_cpu_kernels_are_llvm_ir_split_without_races(monkeypatch):
    """Both kernels print as LLVM IR (no Numba compile); on 2 and 3 threads every buffer equals one
    thread's to the bit (scatter-add's units are columns: no two threads write one entry)."""
    from symdl.backends import get
    from symdl.backends import threads as symdl_threads
    from symdl.backends.cpu import llvm_code
    from symdl.backends.formulas import formula

    ids = sd.input("ids", (6,), dtype="int32")
    E = sd.param("E", (4, 9))
    loss = sd.total(sd.tanh(embedding(E, ids)))
    program, _ = gradient_program(loss, [E])
    for k in program.kernels:
        if isinstance(k, (ir.Gather, ir.ScatterAdd)):
            for dtype in ("float32", "float64"):
                assert llvm_code.kernel_ir(formula(k, program), dtype) is not None, k
    rng = np.random.default_rng(0)
    n = 5
    external = {"ids": rng.integers(0, 4, size=(n * 6, 1)).astype(float), "E": rng.normal(size=(4, 9))}
    external["ids"][:7] = 3  # one row hit many times
    outs = []
    for count in (1, 2, 3):
        runner = get("cpu").compile_program(program, "float64")
        run_threaded(runner, count, monkeypatch)
        with symdl_threads.blas_single_threaded():
            runner.run(external, {}, n)
        outs.append({k.out: np.array(runner.output(k.out, n)) for k in program.kernels})
        if count > 1:
            assert runner._ready[n][0][:, 2].sum() >= 2  # the kernels were split
    for other in outs[1:]:
        for name, value in outs[0].items():
            np.testing.assert_array_equal(other[name], value, err_msg=name)
    want = get("numpy").compile_program(program, "float64").run(external, {}, n)
    for name, value in want.items():
        np.testing.assert_allclose(outs[0][program.outputs[name]], value, rtol=1e-12, atol=1e-12)


def test_onnx_backend_matches_numpy():
    pytest.importorskip("onnx", reason="the ONNX printer needs onnx")
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the printed graph")
    from symdl.backends import get
    from symdl.backends.onnx import compile_program

    loss, params, _ = _per_token_classifier()
    program, _ = gradient_program(loss, params)
    a = _arrays(n=3, seed=4)
    external = {"ids": a["ids"].reshape(-1, 1).astype(float), "y": a["y"].reshape(-1, C), "E": a["E"], "W": a["W"],
                "b": a["b"].reshape(1, -1)}
    want = get("numpy").compile_program(program, "float64").run(external, {}, 3)
    got = compile_program(program, "float64").run(external, {}, 3)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.cudasim
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
def test_cuda_simulator_matches_numpy():
    loss, params, _ = _per_token_classifier(T=3, V=5, D=3, C=2)
    arrays = _arrays(n=3, seed=1, T=3, V=5, D=3, C=2)
    assert_backend_matches_numpy(loss, params, arrays, "cuda")


# --------------------------------------------------------------------------- checking the ids


def test_bad_ids_are_errors_naming_the_layer_and_the_value_before_anything_runs():
    loss, params, _ = _per_token_classifier()
    f = sd.value_and_grad(loss, params, backend="cpu")
    arrays = _arrays()
    arrays["ids"][1, 2] = V
    with pytest.raises(ArrayError, match=r"Embedding layer 1: token id 7 at ids\[1, 2\] is outside \[0, 7\)"):
        f(**arrays)
    assert not f.runner._ready  # nothing compiled or ran
    arrays["ids"][1, 2] = -1
    with pytest.raises(ArrayError, match="token id -1"):
        f(**arrays)
    arrays["ids"] = arrays["ids"] + 0.5
    with pytest.raises(ArrayError, match="expected integers"):
        f(**arrays)
    arrays = _arrays()
    arrays["ids"] = arrays["ids"][:, :2]
    with pytest.raises(ArrayError, match=r"expected token ids \(n, 4\)"):
        f(**arrays)


# --------------------------------------------------------------------------- layers


def test_embedding_layer_keras_names_and_functional_shapes():
    layer = sd.nn.Embedding(V, D)
    x = sd.nn.Input(shape=(T,), dtype="int32")
    h = layer(x)
    assert h.shape == (T, D)
    y = sd.nn.Dense(C, activation="relu")(h)
    assert y.shape == (T, C)
    params, out = layer.build(1, sd.input("ids", (T,), dtype="int32"))
    assert [str(p.name) for p in params] == ["embeddings1"] and params[0].value_shape == (V, D)
    built = layer.build_both(1, sd.input("ids", (T,), dtype="int32"), sd.input("ids", (T,), dtype="int32"))
    first = built.initial["embeddings1"]
    assert first.shape == (V, D) and np.abs(first).max() <= 0.05  # Keras's RandomUniform(-0.05, 0.05)
    assert layer.config()["embeddings_initializer"] == "uniform"
    with pytest.raises(ValueError, match="input_dim must be a positive integer"):
        sd.nn.Embedding(0, 3)
    with pytest.raises(ValueError, match="takes token ids"):
        sd.nn.Embedding(V, D)(sd.nn.Input(shape=(T,)))


def test_token_and_position_embedding_adds_learned_positions():
    layer = sd.nn.TokenAndPositionEmbedding(V, 6, D)
    ids = sd.input("ids", (T,), dtype="int32")  # shorter than sequence_length: rows 0..T-1 of the positions
    params, out = layer.build(2, ids)
    assert [str(p.name) for p in params] == ["embeddings2", "position_embeddings2"]
    assert params[1].value_shape == (6, D)
    y = sequence_input("y", (T, D))
    loss = sd.losses.mse(out, y)
    rng = np.random.default_rng(3)
    arrays = {"ids": rng.integers(0, V, size=(2, T)), "y": rng.normal(size=(2, T, D)),
              "embeddings2": rng.normal(size=(V, D)), "position_embeddings2": rng.normal(size=(6, D))}
    f = sd.value_and_grad(loss, params, backend="numpy")
    value, grads = f(**arrays)
    pred = arrays["embeddings2"][arrays["ids"]] + arrays["position_embeddings2"][:T][None]
    assert value == pytest.approx(float(np.mean((pred - arrays["y"]) ** 2)))
    for name in ("embeddings2", "position_embeddings2"):
        assert_close(grads[name], finite_difference(f, arrays, name), 1e-6, what=name)
    assert np.all(grads["position_embeddings2"][T:] == 0)  # positions past the sequences get nothing
    g_cpu = sd.value_and_grad(loss, params, backend="cpu")(**arrays)[1]
    for name in grads:
        assert_close(g_cpu[name], grads[name], 1e-12, what=name)
    with pytest.raises(sd.graph.ShapeMismatch, match="longer than sequence_length=3"):
        sd.nn.TokenAndPositionEmbedding(V, 3, D)(sd.nn.Input(shape=(T,), dtype="int32"))


def test_a_compiled_training_step_learns_per_token_and_checks_ids():
    """``sd.compile`` (the table persistent, written in place by Adam): a per-token classifier
    learns to copy its input tokens; a bad id stops the step before it runs."""
    loss, params, ids = _per_token_classifier(T=5, V=6, D=8, C=6)
    train = sd.compile(loss, params, optimizer=sd.optim.Adam(0.05), backend="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    X = rng.integers(0, 6, size=(64, 5))
    Y = np.eye(6)[X]  # (n, T, C): each token's class is the token itself
    first = train.step(ids=X, y=Y)
    for _ in range(60):
        last = train.step(ids=X, y=Y)
    assert last < 0.1 * first
    before = {k: v.copy() for k, v in train.params.items()}
    X[3, 4] = 6
    with pytest.raises(ArrayError, match=r"Embedding layer 1: token id 6 at ids\[3, 4\] is outside \[0, 6\)"):
        train.step(ids=X, y=Y)
    for k, v in train.params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)  # nothing ran
