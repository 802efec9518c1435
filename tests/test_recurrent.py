"""Recurrent layers (issue 28): SimpleRNN, LSTM, GRU and Bidirectional as one scan node each.

Oracles: PyTorch's ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` autograd with the weights mapped from Keras's
layout (float64, 1e-8: values and every gradient, the input's included), finite differences, SymPy's
scalar derivatives of the unrolled loss at T = 3 (``sd.prove``: the scan's BPTT recurrence against
``sp.diff`` of the unrolled forward), and the NumPy backend against the CPU backend (one and two
threads), the CUDA simulator and ONNX Runtime.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import symdl as sd
from helpers import recurrent_layer_loss, assert_backend_matches_numpy, assert_close, finite_difference, run_threaded
from symdl.graph.nodes import sequence_input
from symdl.ir import kernels as ir
from symdl.ops.concat import Cols
from symdl.ops.recurrence import Scan, ScanGrad, gru_cell, last_step, lstm_cell, scan, simple_rnn_cell
from symdl.run.pipeline import gradient_program

T, F, U = 5, 3, 4  # steps, features, units
LAYERS = {"SimpleRNN": sd.nn.SimpleRNN, "LSTM": sd.nn.LSTM, "GRU": sd.nn.GRU}


def _loss_of(layer, T=T, F=F):
    return recurrent_layer_loss(layer, T, F)


def _arrays(params, x, y, n=3, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    arrays = {str(p.name): rng.normal(size=p.value_shape) * scale for p in params}
    T_, F_ = x.sequence_shape
    arrays["x"] = rng.normal(size=(n, T_, F_))
    arrays["y"] = rng.normal(size=(n,) + (tuple(y.sequence_shape) if hasattr(y, "sequence_shape")
                                          else (int(y.shape[1]),)))
    return arrays


# --------------------------------------------------------------------------- PyTorch, Keras layouts


def _torch_module(kind, arrays, index, units, bidirectional=False):
    """The torch module with Keras's weights (docs/recurrent.md has the mapping)."""
    torch = pytest.importorskip("torch", reason="PyTorch is the autograd oracle")
    cls = {"SimpleRNN": torch.nn.RNN, "LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}[kind]
    F_ = arrays["x"].shape[2]
    m = cls(F_, units, batch_first=True, bidirectional=bidirectional).double()
    suffixes = [("", f"{index}_forward"), ("_reverse", f"{index}_backward")] if bidirectional else [("", index)]
    perm = lambda a: a  # noqa: E731
    if kind == "GRU":  # Keras (z, r, h) -> torch (r, z, n)
        perm = lambda a: np.concatenate([a[..., units: 2 * units], a[..., :units], a[..., 2 * units:]], axis=-1)  # noqa: E731
    with torch.no_grad():
        for sfx, idx in suffixes:
            W, Uk = arrays[f"kernel{idx}"], arrays[f"recurrent_kernel{idx}"]
            getattr(m, f"weight_ih_l0{sfx}").copy_(torch.from_numpy(perm(W).T.copy()))
            getattr(m, f"weight_hh_l0{sfx}").copy_(torch.from_numpy(perm(Uk).T.copy()))
            b = arrays[f"bias{idx}"]
            if kind == "GRU":
                getattr(m, f"bias_ih_l0{sfx}").copy_(torch.from_numpy(perm(b[0]).copy()))
                getattr(m, f"bias_hh_l0{sfx}").copy_(torch.from_numpy(perm(b[1]).copy()))
            else:  # torch adds two biases: Keras's one, and zeros
                getattr(m, f"bias_ih_l0{sfx}").copy_(torch.from_numpy(b))
                getattr(m, f"bias_hh_l0{sfx}").zero_()
    return m, torch


def _torch_grads(m, torch, kind, arrays, index, units, sequences, backwards=False, bidirectional=False):
    x = torch.tensor(arrays["x"], requires_grad=True)
    xin = torch.flip(x, [1]) if backwards else x
    out, _ = m(xin)
    if not sequences:
        if bidirectional:
            out = torch.cat([out[:, -1, :units], out[:, 0, units:]], dim=1)
        else:
            out = out[:, -1]
    loss = ((out - torch.from_numpy(arrays["y"])) ** 2).mean()
    loss.backward()
    perm = lambda a: a  # noqa: E731
    if kind == "GRU":  # torch (r, z, n) -> Keras (z, r, h)
        perm = lambda a: np.concatenate([a[..., units: 2 * units], a[..., :units], a[..., 2 * units:]], axis=-1)  # noqa: E731
    grads = {"x": x.grad.numpy()}
    suffixes = [("", f"{index}_forward"), ("_reverse", f"{index}_backward")] if bidirectional else [("", index)]
    for sfx, idx in suffixes:
        grads[f"kernel{idx}"] = perm(getattr(m, f"weight_ih_l0{sfx}").grad.numpy().T)
        grads[f"recurrent_kernel{idx}"] = perm(getattr(m, f"weight_hh_l0{sfx}").grad.numpy().T)
        bi, bh = (perm(getattr(m, f"bias_{w}_l0{sfx}").grad.numpy()) for w in ("ih", "hh"))
        grads[f"bias{idx}"] = np.stack([bi, bh]) if kind == "GRU" else bi
    return loss.item(), grads


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("sequences,backwards", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_pytorch_autograd(kind, sequences, backwards):
    layer = LAYERS[kind](U, return_sequences=sequences, go_backwards=backwards)
    loss, params, x, y = _loss_of(layer)
    arrays = _arrays(params, x, y, seed=3)
    value, grads = sd.value_and_grad(loss, params + [x], backend="numpy", dtype="float64")(**arrays)
    m, torch = _torch_module(kind, arrays, 1, U)
    ref, want = _torch_grads(m, torch, kind, arrays, 1, U, sequences, backwards)
    assert value == pytest.approx(ref, rel=1e-10, abs=1e-12)
    for name, g in want.items():
        assert_close(grads[name].reshape(g.shape), g, 1e-8, what=f"{kind} {name}")


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("sequences", [False, True])
def test_bidirectional_matches_pytorch(kind, sequences):
    layer = sd.nn.Bidirectional(LAYERS[kind](U, return_sequences=sequences))
    loss, params, x, y = _loss_of(layer)
    assert [str(p.name) for p in params][:3] == ["kernel1_forward", "recurrent_kernel1_forward", "bias1_forward"]
    arrays = _arrays(params, x, y, seed=4)
    value, grads = sd.value_and_grad(loss, params + [x], backend="numpy", dtype="float64")(**arrays)
    m, torch = _torch_module(kind, arrays, 1, U, bidirectional=True)
    ref, want = _torch_grads(m, torch, kind, arrays, 1, U, sequences, bidirectional=True)
    assert value == pytest.approx(ref, rel=1e-10, abs=1e-12)
    for name, g in want.items():
        assert_close(grads[name].reshape(g.shape), g, 1e-8, what=f"{kind} {name}")


def _evaluate(exprs: dict, arrays: dict, n: int) -> dict:
    """The values of ``exprs`` (NumPy backend) for sequences ``x`` and parameters in ``arrays``."""
    from symdl.backends import get
    from symdl.ir.lowering import lower

    program = lower(exprs)
    external = {k: (v.reshape(-1, v.shape[-1]) if k == "x" else v) for k, v in arrays.items()
                if k in program.externals}
    return get("numpy").compile_program(program, "float64").run(external, {}, n)


@pytest.mark.parametrize("mode", ["sum", "mul", "ave"])
def test_bidirectional_merge_modes(mode):
    x = sequence_input("x", (T, F))
    concat = sd.nn.Bidirectional(sd.nn.GRU(2, return_sequences=True))
    built = concat.build_both(1, x, x)
    merged = sd.nn.Bidirectional(sd.nn.GRU(2, return_sequences=True), merge_mode=mode).run(built.params, x, "here")
    rng = np.random.default_rng(0)
    arrays = {str(p.name): rng.normal(size=tuple(int(d) for d in p.shape)) for p in built.params}
    arrays["x"] = rng.normal(size=(2, T, F))
    out = _evaluate({"both": built.train, "merged": merged}, arrays, 2)
    a, b = out["both"][:, :2], out["both"][:, 2:]
    want = {"sum": a + b, "mul": a * b, "ave": (a + b) / 2}[mode]
    np.testing.assert_allclose(out["merged"], want, rtol=1e-12)


# --------------------------------------------------------------------------- other oracles


def test_gradients_match_finite_differences():
    layer = sd.nn.GRU(3, return_sequences=True)
    loss, params, x, y = _loss_of(layer, T=4)
    arrays = _arrays(params, x, y, seed=1)
    f = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")
    _, grads = f(**arrays)
    for name in grads:
        assert_close(grads[name], finite_difference(f, arrays, name), 1e-6, what=name)


@pytest.mark.parametrize("cell,steps,bias_rows,reverse_in,reverse_out", [
    (simple_rnn_cell(), 3, 2, True, False),  # go_backwards, a recurrent bias row
    (lstm_cell(), 3, 1, True, True),  # Bidirectional's backward half: the c carry through f
    (gru_cell(), 2, 2, False, False),  # at T = 3 prove's own sp.expand of the difference stalls
])
def test_sympy_scalar_proof(cell, steps, bias_rows, reverse_in, reverse_out):
    """One unit, one feature, n = 1: the BPTT recurrence of ``ScanGrad`` (written with SymPy scalars,
    ``_backward``) equals ``sp.diff`` of the unrolled forward scan (``_forward``)."""
    x = sequence_input("x", (steps, 1)); y = sd.input("y", 1)
    k = cell.gates
    W = sd.param("W", (1, k)); Uk = sd.param("U", (1, k)); B = sd.param("B", (bias_rows, k))
    S = scan(cell, x @ W, Uk, B, steps, reverse_in=reverse_in, reverse_out=reverse_out)
    h = Cols(S, 0, 1) if cell.states > 1 else S
    loss = sd.losses.mse(last_step(h, steps, first=reverse_out), y)
    proof = sd.prove(loss, [W, Uk, B], {"n": 1})
    assert proof, str(proof)
    assert proof.entries == 2 * k + bias_rows * k


# --------------------------------------------------------------------------- backends


def _backend_case(kind="LSTM", sequences=True, n=4, seed=0):
    layer = LAYERS[kind](3, return_sequences=sequences)
    loss, params, x, y = _loss_of(layer, T=6, F=2)
    return loss, params + [x], _arrays(params, x, y, n=n, seed=seed)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_backend_matches_numpy_on_one_and_two_threads(kind, dtype, monkeypatch):
    loss, params, arrays = _backend_case(kind)
    assert_backend_matches_numpy(loss, params, arrays, "cpu", dtype, 1e-12 if dtype == "float64" else 2e-5,
                                 threads=(1, 2), monkeypatch=monkeypatch)


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="LLVM IR needs the JIT")
def test_cpu_kernels_are_llvm_ir_and_split_by_sequence_without_races(monkeypatch):
    """Both scan kernels print as LLVM IR (no Numba compile); on 2 and 3 threads (units: the
    sequences) every buffer equals one thread's to the bit."""
    from symdl.backends import get
    from symdl.backends import threads as symdl_threads
    from symdl.backends.cpu import llvm_code
    from symdl.backends.formulas import formula

    loss, params, arrays = _backend_case("GRU", n=5)
    program, _ = gradient_program(loss, params)
    scans = [k for k in program.kernels if isinstance(k, (ir.Scan, ir.ScanGrad))]
    assert len(scans) == 2
    for k in scans:
        for dtype in ("float32", "float64"):
            assert llvm_code.kernel_ir(formula(k, program), dtype) is not None, k
    external = {"x": arrays["x"].reshape(-1, 2), "y": arrays["y"].reshape(-1, 3)}
    external.update({str(p.name): np.asarray(arrays[str(p.name)]).reshape(tuple(int(d) for d in p.shape))
                     for p in params if str(p.name) != "x"})
    outs = []
    for count in (1, 2, 3):
        runner = get("cpu").compile_program(program, "float64")
        run_threaded(runner, count, monkeypatch)
        with symdl_threads.blas_single_threaded():
            runner.run(external, {}, 5)
        outs.append({k.out: np.array(runner.output(k.out, 5)) for k in program.kernels})
    for other in outs[1:]:
        for name, value in outs[0].items():
            np.testing.assert_array_equal(other[name], value, err_msg=name)


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="LLVM IR needs the JIT")
@pytest.mark.parametrize("cell,gates,bias_rows", [(lstm_cell, 4, 1), (gru_cell, 3, 2), (simple_rnn_cell, 1, 1)])
@pytest.mark.parametrize("units,reverse", [(13, (False, False)), (9, (True, False)), (17, (True, True))])
def test_cpu_tiles_and_tails_give_one_thread_bits(cell, gates, bias_rows, units, reverse, monkeypatch):
    """The CPU kernels compute the recurrent products in tiles of sequences x units, their dot products
    in vector lanes: units that do not fill a vector or a tile, and a thread's last sequences that do not
    fill a tile, take the same chain, so 1, 2 and 3 threads give the same bits, and NumPy's values.
    (Three sequences of two to four steps keep every other product below BLAS's size, whose bits
    depend on how threads split rows.)"""
    rng = np.random.default_rng(units)
    T, n = (4, 3) if units < 15 else (2, 3)
    x = sequence_input("x", (T, 2))
    W, U = sd.param("W", (2, gates * units)), sd.param("U", (units, gates * units))
    B = sd.param("B", (bias_rows, gates * units))
    S = scan(cell(), x @ W, U, B, T, reverse_in=reverse[0], reverse_out=reverse[1])
    loss = sd.total(sd.hadamard(S, S))
    arrays = {"x": rng.normal(size=(n, T, 2)), "W": rng.normal(size=(2, gates * units)),
              "U": 0.3 * rng.normal(size=(units, gates * units)), "B": rng.normal(size=(bias_rows, gates * units))}
    for dtype, tol in (("float64", 1e-10), ("float32", 2e-4)):
        _, want = sd.value_and_grad(loss, [W, U, B], backend="numpy", dtype=dtype)(**arrays)
        bits = None
        for count in (1, 2, 3):
            f = sd.value_and_grad(loss, [W, U, B], backend="cpu", dtype=dtype)
            run_threaded(f.runner, count, monkeypatch)
            value, grads = f(**arrays)
            for name, w in want.items():
                assert_close(grads[name], w, tol, what=f"{dtype} {name} on {count} thread(s)")
            got = [np.float64(value).tobytes()] + [grads[name].tobytes() for name in sorted(grads)]
            assert bits is None or got == bits, (dtype, count)
            bits = got


def test_nan_and_inf_propagate_as_in_numpy():
    loss, params, arrays = _backend_case("GRU", n=2)
    arrays["x"][0, 2, 1] = np.nan
    arrays["x"][1, 0, 0] = np.inf
    from symdl.backends import get

    program, _ = gradient_program(loss, params)
    external = {"x": arrays["x"].reshape(-1, 2), "y": arrays["y"].reshape(-1, 3)}
    external.update({str(p.name): np.asarray(arrays[str(p.name)]).reshape(tuple(int(d) for d in p.shape))
                     for p in params if str(p.name) != "x"})
    ref = get("numpy").compile_program(program, "float64").run(external, {}, 2)
    got = get("cpu").compile_program(program, "float64").run(external, {}, 2)
    for name in ref:
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(ref[name]), err_msg=name)
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-12, err_msg=name)
    assert any(np.isnan(v).any() for v in ref.values())


def test_onnx_backend_matches_numpy():
    pytest.importorskip("onnx", reason="the ONNX printer needs onnx")
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the printed graph")
    from symdl.backends import get
    from symdl.backends.onnx import compile_program

    for kind in ("LSTM", "GRU", "SimpleRNN"):
        loss, params, arrays = _backend_case(kind, n=3, seed=2)
        program, _ = gradient_program(loss, params)
        external = {"x": arrays["x"].reshape(-1, 2), "y": arrays["y"].reshape(-1, 3)}
        external.update({str(p.name): np.asarray(arrays[str(p.name)]).reshape(tuple(int(d) for d in p.shape))
                         for p in params if str(p.name) != "x"})
        want = get("numpy").compile_program(program, "float64").run(external, {}, 3)
        got = compile_program(program, "float64").run(external, {}, 3)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-10, atol=1e-12, err_msg=f"{kind} {name}")


@pytest.mark.cudasim
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_cuda_simulator_matches_numpy(kind):
    layer = LAYERS[kind](2, return_sequences=True)
    loss, params, x, y = _loss_of(layer, T=3, F=2)
    params = params + [x]
    arrays = _arrays(params[:-1], x, y, n=2, seed=5)
    assert_backend_matches_numpy(loss, params, arrays, "cuda")


# --------------------------------------------------------------------------- graph and program


def test_one_scan_node_and_one_kernel_each_way_whatever_T():
    """The graph and the program do not grow with T: one Scan, one ScanGrad."""
    sizes = []
    for steps in (3, 30):
        loss, params, x, y = _loss_of(sd.nn.LSTM(4), T=steps)
        program, _ = gradient_program(loss, params)
        kinds = [type(k) for k in program.kernels]
        assert kinds.count(ir.Scan) == 1 and kinds.count(ir.ScanGrad) == 1
        sizes.append(len(program.kernels))
    assert sizes[0] == sizes[1]
    S = loss.atoms(Scan) if hasattr(loss, "atoms") else None
    assert S is None or len(S) == 1
    g = sd.grad(loss, params)
    assert any(isinstance(a, ScanGrad) for a in g[params[1]].atoms(ScanGrad))


def test_gradient_prints_the_bptt_node():
    x = sequence_input("x", (3, 2))
    W = sd.param("W", (2, 4)); Uk = sd.param("U", (1, 4))
    S = scan(lstm_cell(), x @ W, Uk, None, 3)
    assert str(S) == "lstm_scan(x*W, U)"
    g = sd.grad(sd.total(S), [W])[W]
    assert "lstm_bptt(" in str(g) and "shift(" in str(g)
    assert "lstm\\_bptt" in sd.latex(g)


def test_explain_prints_bptt_in_textbook_form():
    loss, params, x, y = _loss_of(sd.nn.LSTM(3))
    text = str(sd.explain(loss, params))
    assert "lstm_bptt(" in text and "∂L/∂recurrent_kernel1 = shift(" in text
    assert "H1 = lstm_scan(" in text and "lstm_bptt(δH1;" in text  # the scan's states named, and their δ
    assert "δcₜ = G_c,ₜ + δhₜ₊₁ ⊙ [f*o*(1 - tanh(c)**2)]ₜ₊₁ + δcₜ₊₁ ⊙ [f]ₜ₊₁" in text  # the f carry
    assert "δhₜ = G_h,ₜ + δUPₜ₊₁ Uᵀ" in text and "Σₜ hₜ₋₁ᵀ δUPₜ" in text


def test_example_runs_and_learns(tmp_path):
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "SYMDL_QUICK": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "examples/sequence_classification.py"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lstm_bptt(" in out.stdout
    before, after = (float(v) for v in out.stdout.split("training loss: ")[1].split()[0:3:2])
    assert after < before


# --------------------------------------------------------------------------- layers


def test_keras_weight_names_shapes_and_initializers():
    x = sequence_input("x", (T, F))
    for kind, k in (("SimpleRNN", 1), ("LSTM", 4), ("GRU", 3)):
        built = LAYERS[kind](U).build_both(2, x, x)
        names = [str(p.name) for p in built.params]
        assert names == ["kernel2", "recurrent_kernel2", "bias2"]
        shapes = [p.value_shape for p in built.params]
        assert shapes[:2] == [(F, k * U), (U, k * U)]
        assert shapes[2] == ((2, 3 * U) if kind == "GRU" else (k * U,))
        Uk = built.initial["recurrent_kernel2"]
        np.testing.assert_allclose(Uk @ Uk.T, np.eye(U), atol=1e-12)  # orthogonal rows
        b = built.initial["bias2"]
        if kind == "LSTM":  # unit_forget_bias
            assert b[U: 2 * U].tolist() == [1.0] * U and not b[:U].any() and not b[2 * U:].any()
        else:
            assert not b.any()
    assert not sd.nn.LSTM(U, use_bias=False).build_both(1, x, x).params[2:]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"LSTM layer 1 needs sequences \(None, steps, features\), got \(None, 3\)"):
        sd.nn.LSTM(4)(sd.nn.Input(shape=(3,)))
    with pytest.raises(ValueError, match="units must be a positive integer"):
        sd.nn.GRU(0)
    with pytest.raises(ValueError, match="activation"):
        sd.nn.SimpleRNN(2, activation="no_such_thing")
    with pytest.raises(NotImplementedError, match="reset_after"):
        sd.nn.GRU(2, reset_after=False)
    model = sd.nn.Sequential([sd.nn.LSTM(3), sd.nn.Dense(2)], input_shape=(4, 2))
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(1e-2), backend="numpy")
    with pytest.raises(sd.nn.datasets.DataError, match=r"expects sequences \(n, 4, 2\)"):
        model.fit(np.zeros((5, 4, 3)), np.zeros(5, int), epochs=1, verbose=0)
    with pytest.raises(sd.nn.datasets.DataError, match=r"expects sequences \(n, 4, 2\)"):
        model.predict(np.zeros((5, 8)))
    with pytest.raises(sd.nn.datasets.DataError, match="ragged"):
        model.predict([np.zeros((4, 2)), np.zeros((3, 2))])


def test_functional_model_lstm_gru_dense_trains():
    x = sd.nn.Input(shape=(6, 2))
    h = sd.nn.LSTM(5, return_sequences=True)(x)
    assert h.shape == (6, 5)
    out = sd.nn.Dense(2)(sd.nn.GRU(3)(h))
    model = sd.nn.Model(x, out)
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(3e-2), backend="numpy")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 6, 2))
    y = (X[:, 0, 0] > 0).astype(int)  # the first step decides: the recurrence must carry it to the end
    first = model.evaluate(X, y)["loss"]
    model.fit(X, y, epochs=15, batch_size=16, verbose=0)
    assert model.evaluate(X, y)["loss"] < first
    assert model.predict(X).shape == (64, 2)


def test_embedding_feeds_an_lstm():
    """Token ids -> Embedding -> LSTM (graph level: ``Model.fit`` does not take token ids yet)."""
    ids = sd.input("ids", (4,), dtype="int32")
    emb = sd.nn.Embedding(7, 3).build_both(1, ids, ids)
    lstm = sd.nn.LSTM(2).build_both(2, emb.train, emb.train)
    y = sd.input("y", 2)
    loss = sd.losses.mse(lstm.train, y)
    params = emb.params + lstm.params
    rng = np.random.default_rng(1)
    arrays = {"ids": rng.integers(0, 7, size=(3, 4)), "y": rng.normal(size=(3, 2))}
    arrays.update({str(p.name): rng.normal(size=p.value_shape) * 0.5 for p in params})
    f = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")
    _, grads = f(**arrays)
    for name in ("embeddings1", "kernel2"):
        assert_close(grads[name], finite_difference(f, arrays, name), 1e-6, what=name)


def test_stacked_layers_and_save_load(tmp_path):
    for kind in ("sequential", "bidirectional"):
        if kind == "sequential":
            model = sd.nn.Sequential([sd.nn.GRU(3, return_sequences=True), sd.nn.LSTM(2), sd.nn.Dense(2)],
                                     input_shape=(5, 2))
        else:
            x = sd.nn.Input(shape=(5, 2))
            model = sd.nn.Model(x, sd.nn.Dense(2)(sd.nn.Bidirectional(sd.nn.SimpleRNN(2), merge_mode="sum")(x)))
        model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(1e-2), backend="numpy")
        X = np.random.default_rng(0).normal(size=(8, 5, 2))
        model.fit(X, np.arange(8) % 2, epochs=1, verbose=0)
        path = str(tmp_path / f"{kind}.symdl")
        model.save(path)
        np.testing.assert_array_equal(sd.nn.load(path).predict(X), model.predict(X))


def test_model_exports_to_onnx(tmp_path):
    """A stacked LSTM -> GRU -> Dense model exported as ONNX (the scans unrolled) predicts as symdl
    does. The exported graph takes the sequences as Keras does, ``(n, T, features)``."""
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the export")
    pytest.importorskip("onnx", reason="the export needs onnx")
    model = sd.nn.Sequential([sd.nn.LSTM(3, return_sequences=True), sd.nn.GRU(2), sd.nn.Dense(2)], input_shape=(5, 2))
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(1e-2), backend="numpy")
    X = np.random.default_rng(0).normal(size=(4, 5, 2)).astype(np.float32)
    path = str(tmp_path / "rnn.onnx")
    model.export(path, format="onnx")
    session = ort.InferenceSession(path)
    assert [d for d in session.get_inputs()[0].shape][1:] == [5, 2]
    out = session.run(None, {session.get_inputs()[0].name: X})[0]
    np.testing.assert_allclose(out, model.predict(X), rtol=1e-5, atol=1e-6)
