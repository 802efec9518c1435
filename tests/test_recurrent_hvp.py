"""Second derivatives through recurrent layers: ``sd.hvp`` and ``sd.hessian`` through SimpleRNN, LSTM,
GRU (``go_backwards``, ``return_sequences``, ``Bidirectional``).

``hvp`` there is reverse over forward: the gradient of the loss's tangent, the tangent of a scan a scan
whose cell is ``sp.diff`` of the original (``ops.recurrence._jvp_scan``). Oracles: finite differences
of the gradient (float64), PyTorch's double backward (``torch.autograd.functional.hvp`` on
``nn.RNN``/``nn.LSTM``/``nn.GRU`` with the Keras weights mapped, float64, 1e-8), and SymPy: the
unrolled scalar loss at T = 2 differentiated twice by ``sp.diff``; every backend against NumPy.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import sympy as sp

import symdl as sd
from helpers import recurrent_layer_loss, assert_close, run_threaded
from symdl.graph.nodes import Input, Param, VectorParam, leaves, sequence_input
from symdl.ops.concat import Cols
from symdl.ops.recurrence import Scan, gru_cell, last_step, lstm_cell, scan, simple_rnn_cell
from symdl.run.validate import check_arrays

LAYERS = {"SimpleRNN": sd.nn.SimpleRNN, "LSTM": sd.nn.LSTM, "GRU": sd.nn.GRU}
T, F, UNITS = 4, 3, 2


def _loss_of(layer, T=T, F=F):
    return recurrent_layer_loss(layer, T, F)


def _direction(p):
    cls = VectorParam if isinstance(p, VectorParam) else Param
    return cls(f"v__{p.name}", *p.shape)


def _arrays(loss, params, n=3, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    out = {}
    for leaf in leaves(loss):
        if isinstance(leaf, Param):
            out[str(leaf.name)] = rng.normal(size=leaf.value_shape) * scale
        else:
            shape = tuple(getattr(leaf, "sequence_shape", None) or (int(leaf.shape[1]),))
            out[str(leaf.name)] = rng.normal(size=(n,) + shape)
    for p in params:
        out[f"v__{p.name}"] = rng.normal(size=p.value_shape)
    return out


class _Hvp:
    """``sd.hvp`` of ``loss`` compiled on ``backend``: ``self(arrays) -> {param name: H·v}``."""

    def __init__(self, loss, params, backend="numpy", dtype="float64"):
        self.params = list(params)
        self.directions = [_direction(p) for p in self.params]
        hv = sd.hvp(loss, self.params, self.directions)
        self.exprs = hv
        self.runner = sd.pipeline.compile_outputs({f"hvp_{p.name}": hv[p] for p in self.params}, backend, dtype)
        known = list(leaves(loss)) + self.directions
        self.inputs = [l for l in known if isinstance(l, Input)]
        self.leaves = [l for l in known if isinstance(l, Param)]
        self.dtype = dtype

    def __call__(self, arrays):
        converted, n = check_arrays(arrays, self.inputs, self.leaves, np.dtype(self.dtype))
        out = self.runner.run({k: v for k, v in converted.items() if k in self.runner.program.externals}, {}, n)
        return {str(p.name): np.asarray(out[f"hvp_{p.name}"]).reshape(p.value_shape) for p in self.params}


def _fd_hvp(loss, params, arrays, eps=1e-5):
    """Central differences of the gradient along the directions (float64)."""
    f = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")
    plain = {k: v for k, v in arrays.items() if not k.startswith("v__")}

    def moved(sign):
        a = dict(plain)
        for p in params:
            a[str(p.name)] = plain[str(p.name)] + sign * eps * arrays[f"v__{p.name}"]
        return f(**a)[1]

    plus, minus = moved(1), moved(-1)
    return {k: (plus[k] - minus[k]) / (2 * eps) for k in plus}


# --------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("sequences,backwards", [(False, False), (True, True)])
def test_hvp_matches_finite_differences_of_the_gradient(kind, sequences, backwards):
    loss, params, x, y = _loss_of(LAYERS[kind](UNITS, return_sequences=sequences, go_backwards=backwards))
    arrays = _arrays(loss, params, seed=1)
    got = _Hvp(loss, params)(arrays)
    want = _fd_hvp(loss, params, arrays)
    for name, g in want.items():
        assert np.abs(g).max() > 1e-3
        assert_close(got[name], g.reshape(got[name].shape), 1e-6, what=f"{kind} {name}")


def test_bidirectional_and_a_stack_match_finite_differences():
    x = sequence_input("x", (T, F))
    first = sd.nn.Bidirectional(sd.nn.GRU(2, return_sequences=True)).build_both(1, x, x)
    second = sd.nn.LSTM(2, go_backwards=True).build_both(2, first.train, first.train)
    y = sd.input("y", 2)
    loss = sd.losses.mse(second.train, y)
    params = first.params + second.params
    arrays = _arrays(loss, params, seed=2)
    got = _Hvp(loss, params)(arrays)
    want = _fd_hvp(loss, params, arrays)
    for name, g in want.items():
        assert_close(got[name], g.reshape(got[name].shape), 1e-6, what=name)


def test_hessian_is_symmetric_and_its_columns_are_hvps():
    loss, params, x, y = _loss_of(sd.nn.GRU(1), T=3, F=1)
    arrays = _arrays(loss, params, n=2, seed=3)
    plain = {k: v for k, v in arrays.items() if not k.startswith("v__")}
    H = sd.hessian(loss, params, backend="numpy")(**plain)
    assert H.shape == (3 + 3 + 6, 3 + 3 + 6)
    np.testing.assert_allclose(H, H.T, rtol=1e-10, atol=1e-12)
    hv = _Hvp(loss, params)(arrays)
    v = np.concatenate([arrays[f"v__{p.name}"].reshape(-1) for p in params])
    mine = np.concatenate([hv[str(p.name)].reshape(-1) for p in params])
    assert_close(mine, H @ v, 1e-10, what="H v")


def test_hvp_with_respect_to_some_parameters():
    """Directions on a subset (the input projection has no tangent: the tangent cell reads no x)."""
    loss, params, x, y = _loss_of(sd.nn.LSTM(UNITS, return_sequences=True))
    some = [params[1], params[2]]  # recurrent_kernel, bias
    arrays = _arrays(loss, some, seed=4)
    got = _Hvp(loss, some)(arrays)
    want = _fd_hvp(loss, some, arrays)
    for name, g in want.items():
        assert_close(got[name], g.reshape(got[name].shape), 1e-6, what=name)
    only_u = [params[1]]
    arrays = _arrays(loss, only_u, seed=5)
    got = _Hvp(loss, only_u)(arrays)
    want = _fd_hvp(loss, only_u, arrays)
    assert_close(got["recurrent_kernel1"], want["recurrent_kernel1"], 1e-6, what="U alone")


# --------------------------------------------------------------------------- PyTorch double backward


def _torch_loss(kind, units, sequences, backwards, bidirectional, arrays, index=1):
    """The mse loss of torch's module as a function of the Keras-layout weights (float64 tensors)."""
    torch = pytest.importorskip("torch", reason="PyTorch is the double-backward oracle")
    cls = {"SimpleRNN": torch.nn.RNN, "LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}[kind]
    F_ = arrays["x"].shape[2]
    m = cls(F_, units, batch_first=True, bidirectional=bidirectional).double()
    suffixes = ["", "_reverse"] if bidirectional else [""]
    x = torch.from_numpy(arrays["x"])
    x = torch.flip(x, [1]) if backwards else x
    y = torch.from_numpy(arrays["y"])
    u = units

    def perm(a):  # Keras (z, r, h) -> torch (r, z, n); the other cells share the gate order
        return torch.cat([a[..., u: 2 * u], a[..., :u], a[..., 2 * u:]], dim=-1) if kind == "GRU" else a

    def fn(*keras):
        weights = {}
        for i, sfx in enumerate(suffixes):
            W, Uk, b = keras[3 * i: 3 * i + 3]
            weights[f"weight_ih_l0{sfx}"] = perm(W).T
            weights[f"weight_hh_l0{sfx}"] = perm(Uk).T
            weights[f"bias_ih_l0{sfx}"] = perm(b[0]) if kind == "GRU" else b
            weights[f"bias_hh_l0{sfx}"] = perm(b[1]) if kind == "GRU" else torch.zeros_like(b)
        out, _ = torch.func.functional_call(m, weights, (x,))
        if not sequences:
            out = torch.cat([out[:, -1, :u], out[:, 0, u:]], dim=1) if bidirectional else out[:, -1]
        return ((out - y) ** 2).mean()

    return fn, torch


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("sequences,backwards,bidirectional", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, False),
    (False, False, True), (True, False, True)])
def test_hvp_matches_pytorch_double_backward(kind, sequences, backwards, bidirectional):
    layer = LAYERS[kind](UNITS, return_sequences=sequences, go_backwards=backwards)
    if bidirectional:
        layer = sd.nn.Bidirectional(layer)
    loss, params, x, y = _loss_of(layer)
    arrays = _arrays(loss, params, seed=6)
    got = _Hvp(loss, params)(arrays)
    fn, torch = _torch_loss(kind, UNITS, sequences, backwards, bidirectional, arrays)
    theta = tuple(torch.from_numpy(arrays[str(p.name)]) for p in params)
    v = tuple(torch.from_numpy(arrays[f"v__{p.name}"]) for p in params)
    _, want = torch.autograd.functional.hvp(fn, theta, v)
    for p, w in zip(params, want):
        assert_close(got[str(p.name)], w.numpy(), 1e-8, what=f"{kind} {p.name}")


# --------------------------------------------------------------------------- SymPy: the unrolled scalar loss


@pytest.mark.parametrize("cell,units,bias_rows,reverse_in,reverse_out", [
    (simple_rnn_cell(), 2, 2, True, False),  # go_backwards, a recurrent bias row
    (lstm_cell(), 1, 1, True, True),  # Bidirectional's backward half: c's carry through f
    (gru_cell(), 1, 2, False, False),  # u = 2 takes SymPy minutes here
])
def test_hvp_equals_sympy_second_derivatives_of_the_unrolled_loss(cell, units, bias_rows, reverse_in, reverse_out):
    """T = 2, one feature, n = 1: the loss unrolled into scalars (``as_explicit``), ``Σ_b ∂²L/∂θ_a∂θ_b v_b``
    by ``sp.diff`` at a random point, against the compiled hvp (NumPy backend)."""
    steps = 2
    x = sequence_input("x", (steps, 1)); y = sd.input("y", units)
    k = cell.gates
    W = sd.param("W", (1, k * units)); Uk = sd.param("U", (units, k * units)); B = sd.param("B", (bias_rows, k * units))
    S = scan(cell, x @ W, Uk, B, steps, reverse_in=reverse_in, reverse_out=reverse_out)
    h = Cols(S, 0, units) if cell.states > 1 else S
    loss = sd.losses.mse(last_step(h, steps, first=reverse_out), y)
    params = [W, Uk, B]
    arrays = _arrays(loss, params, n=1, seed=7)
    got = _Hvp(loss, params)(arrays)

    from symdl.formulas.activations import expand_activations

    concrete = loss.xreplace({sd.n: 1})
    entries, values = {}, {}
    for leaf in leaves(concrete):
        a = np.asarray(arrays[str(leaf.name)], dtype=float).reshape(tuple(int(d) for d in leaf.shape))
        for i in range(int(leaf.shape[0])):
            for j in range(int(leaf.shape[1])):
                s = sp.Symbol(f"{leaf.name}_{i}_{j}", real=True)
                entries[leaf[i, j]] = s
                values[s] = sp.Float(a[i, j], 30)
    scalar = expand_activations(concrete.as_explicit()[0, 0], use_impl=False).xreplace(entries)
    inputs = {s: v for s, v in values.items() if str(s)[0] in "xy"}
    scalar = scalar.xreplace(inputs)  # only the weights stay symbols
    thetas = [(p, i, j, entries[p[i, j]])
              for p in params for i in range(int(p.shape[0])) for j in range(int(p.shape[1]))]
    vs = {s: np.asarray(arrays[f"v__{p.name}"]).reshape(tuple(int(d) for d in p.shape))[i, j] for p, i, j, s in thetas}
    rate = sp.Add(*(sp.diff(scalar, s) * sp.Float(vs[s], 30) for _, _, _, s in thetas))  # L̇ = Σ_b ∂L/∂θ_b v_b
    at = {s: values[s] for _, _, _, s in thetas}
    for p, i, j, s in thetas:
        want = float(sp.diff(rate, s).xreplace(at).evalf(30))
        mine = got[str(p.name)].reshape(tuple(int(d) for d in p.shape))[i, j]
        assert abs(mine - want) <= 1e-10 * max(1.0, abs(want)), (str(p.name), i, j, mine, want)


def test_the_hvp_graph_unrolled_into_scalars_equals_the_compiled_hvp():
    """``as_explicit`` of the hvp expressions (what ``sd.prove`` unrolls: the tangent scan and its BPTT
    written with SymPy scalars, extras included) at the point, against the compiled program."""
    from symdl.formulas.activations import expand_activations

    steps, units = 2, 2
    x = sequence_input("x", (steps, 1)); y = sd.input("y", units)
    W = sd.param("W", (1, units)); Uk = sd.param("U", (units, units)); B = sd.param("B", (2, units))
    S = scan(simple_rnn_cell(), x @ W, Uk, B, steps, reverse_in=True)
    loss = sd.losses.mse(last_step(S, steps), y)
    params = [W, Uk, B]
    arrays = _arrays(loss, params, n=1, seed=10)
    h = _Hvp(loss, params)
    got = h(arrays)
    point = {}
    for leaf in list(leaves(loss)) + h.directions:
        one = leaf.xreplace({sd.n: 1})
        a = np.asarray(arrays[str(leaf.name)], dtype=float).reshape(int(one.shape[0]), int(one.shape[1]))
        point.update({one[i, j]: a[i, j] for i in range(a.shape[0]) for j in range(a.shape[1])})
    for p in params:
        e = h.exprs[p].xreplace({sd.n: 1}).as_explicit()
        mine = np.array([[float(expand_activations(e[i, j], use_impl=False).xreplace(point).evalf())
                          for j in range(e.shape[1])] for i in range(e.shape[0])])
        assert_close(mine.reshape(got[str(p.name)].shape), got[str(p.name)], 1e-12, what=str(p.name))


def test_the_tangent_cell_is_sp_diff_of_the_cell():
    """The tangent scan's cell: the original's first derivatives at the point (read as extras) times the
    tangents; its own ``sp.diff`` (what its BPTT uses) are the original's second derivatives."""
    from symdl.autodiff.jvp import tangents

    x = sequence_input("x", (3, 1))
    W = sd.param("W", (1, 1)); Uk = sd.param("U", (1, 1)); V = sd.param("V", (1, 1))
    S = scan(simple_rnn_cell(), x @ W, Uk, None, 3)
    tan = tangents([S], {Uk: V})[S]
    assert isinstance(tan, Scan) and tan.cell.name == "simple_rnn_tangent"
    assert str(tan).startswith("simple_rnn_tangent_scan(x*W, U, ")
    c = tan.cell
    xp, up = c.ein(0), c.eout(0)  # the point: x and u of the original step; K = h_{t-1} U̇ after p
    K = c.eout(2)
    assert sp.simplify(c.bodies[0] - (1 - sp.tanh(xp + up) ** 2) * (c.u(0) + K)) == 0
    assert sp.simplify(sp.diff(c.bodies[0], up) - sp.diff(sp.tanh(xp + up), up, 2) * (c.u(0) + K)) == 0


# --------------------------------------------------------------------------- errors and explanations


def test_explain_hvp_through_a_recurrence_is_a_clear_error():
    loss, params, x, y = _loss_of(sd.nn.SimpleRNN(2))
    with pytest.raises(NotImplementedError, match="explain_hvp.*sd.hvp and sd.hessian work"):
        sd.explain_hvp(loss, [params[0]], [_direction(params[0])])


def test_explain_prints_the_reverse_over_forward_derivation():
    """What the error above points to: ``sd.explain`` of the loss's tangent prints H·v as ``sd.hvp``
    derives it (the tangent scan, its BPTT, the original's), and its gradient is ``sd.hvp``'s."""
    from symdl.autodiff.jvp import tangents

    loss, params, x, y = _loss_of(sd.nn.LSTM(2))
    directions = [_direction(p) for p in params]
    rate = tangents([loss], dict(zip(params, directions)))[loss]
    text = str(sd.explain(rate, params))
    assert "lstm_tangent_scan(" in text and "lstm_tangent_bptt(" in text and "lstm_bptt(" in text
    hv = sd.hvp(loss, params, directions)
    assert all(hv[p] == sd.grad(rate, params)[p] for p in params)


def test_a_gradient_of_a_gradient_through_a_recurrence_is_a_clear_error():
    loss, params, x, y = _loss_of(sd.nn.SimpleRNN(2))
    g = sd.grad(loss, [params[0]])[params[0]]
    with pytest.raises(NotImplementedError, match="simple_rnn recurrence's gradient has no gradient"):
        sd.grad(sd.sum_squares(g), [params[0]])


# --------------------------------------------------------------------------- backends


def _backend_case(kind="LSTM"):
    layer = sd.nn.Bidirectional(LAYERS[kind](2, return_sequences=True)) if kind == "GRU" else \
        LAYERS[kind](2, return_sequences=True, go_backwards=True)
    loss, params, x, y = _loss_of(layer, T=3, F=2)
    return loss, params, _arrays(loss, params, n=3, seed=8)


def _matches_numpy(kind, backend, dtype="float64", tol=1e-12, threads=(None,), monkeypatch=None):
    loss, params, arrays = _backend_case(kind)
    want = _Hvp(loss, params)(arrays)
    for count in threads:
        h = _Hvp(loss, params, backend, dtype)
        if count is not None and os.environ.get("NUMBA_DISABLE_JIT") != "1":
            run_threaded(h.runner, count, monkeypatch)
        got = h(arrays)
        for name, w in want.items():
            assert_close(got[name], w, tol, what=f"{kind} {name} on {backend} ({count} threads)")


def test_onnx_backend_matches_numpy():
    pytest.importorskip("onnx", reason="the ONNX printer needs onnx")
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the printed graph")
    from symdl.backends.onnx import compile_program
    from symdl.ir.lowering import lower

    for kind in ("LSTM", "GRU", "SimpleRNN"):
        loss, params, arrays = _backend_case(kind)
        h = _Hvp(loss, params)
        want = h(arrays)
        runner = compile_program(lower({f"hvp_{p.name}": h.exprs[p] for p in params}), "float64")
        converted, n = check_arrays(arrays, h.inputs, h.leaves, np.dtype("float64"))
        out = runner.run({k: v for k, v in converted.items() if k in runner.program.externals}, {}, n)
        for p in params:
            got = np.asarray(out[f"hvp_{p.name}"]).reshape(p.value_shape)
            assert_close(got, want[str(p.name)], 1e-10, what=f"{kind} {p.name} on onnx")


def test_embedding_lstm_dense_softmax_cross_entropy():
    """Token ids -> Embedding -> LSTM -> Dense -> softmax cross-entropy: the tangent goes through the
    gather, the scan and the log-sum-exp; the hvp of every weight against differences of the gradient."""
    ids = sd.input("ids", (4,), dtype="int32")
    emb = sd.nn.Embedding(5, 3).build_both(1, ids, ids)
    lstm = sd.nn.LSTM(2).build_both(2, emb.train, emb.train)
    dense = sd.nn.Dense(3).build_both(3, lstm.train, lstm.train)
    y = sd.input("y", 3)
    loss = sd.losses.softmax_cross_entropy(dense.train, y)
    params = emb.params + lstm.params + dense.params
    rng = np.random.default_rng(9)
    arrays = {"ids": rng.integers(0, 5, size=(3, 4)), "y": np.eye(3)[rng.integers(0, 3, size=3)]}
    arrays.update({str(p.name): rng.normal(size=p.value_shape) * 0.5 for p in params})
    arrays.update({f"v__{p.name}": rng.normal(size=p.value_shape) for p in params})
    got = _Hvp(loss, params)(arrays)
    want = _fd_hvp(loss, params, arrays)
    for name, g in want.items():
        assert_close(got[name], g.reshape(got[name].shape), 1e-6, what=name)


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="LLVM IR needs the JIT")
@pytest.mark.parametrize("kind", list(LAYERS))
def test_cpu_backend_matches_numpy_with_the_same_bits_on_one_two_and_three_threads(kind, monkeypatch):
    """The hvp program's scans (the tangent ones read extras) print as LLVM IR; 1, 2 and 3 threads
    write every buffer to the same bits, and match NumPy (float64 and float32)."""
    from symdl.backends import threads as symdl_threads
    from symdl.backends.cpu import llvm_code
    from symdl.backends.formulas import formula
    from symdl.ir import kernels as ir

    loss, params, arrays = _backend_case(kind)
    want = _Hvp(loss, params)(arrays)
    for dtype, tol in (("float64", 1e-12), ("float32", 2e-4)):
        bits = None
        for count in (1, 2, 3):
            h = _Hvp(loss, params, "cpu", dtype)
            program = h.runner.program
            scans = [k for k in program.kernels if isinstance(k, (ir.Scan, ir.ScanGrad))]
            assert sum(bool(k.extras_in or k.extras_out) for k in scans) >= 2
            for k in scans:
                assert llvm_code.kernel_ir(formula(k, program), dtype) is not None, k
            run_threaded(h.runner, count, monkeypatch)
            with symdl_threads.blas_single_threaded():
                got = h(arrays)
            for name, w in want.items():
                assert_close(got[name], w, tol, what=f"{kind} {name} {dtype} on {count} thread(s)")
            buffers = h.runner.buffers(3)
            now = {k.out: np.array(buffers[k.out]).tobytes() for k in program.kernels}
            assert bits is None or now == bits, (dtype, count)
            bits = now


def test_nan_and_inf_propagate_as_in_numpy():
    from symdl.ir.lowering import lower

    loss, params, arrays = _backend_case("GRU")
    arrays["x"][0, 1, 1] = np.nan
    arrays["x"][2, 0, 0] = np.inf
    h = _Hvp(loss, params)
    converted, n = check_arrays(arrays, h.inputs, h.leaves, np.dtype("float64"), check_finite=False)
    from symdl.backends import get

    program = lower({f"hvp_{p.name}": h.exprs[p] for p in params})
    external = {k: v for k, v in converted.items() if k in program.externals}
    with np.errstate(all="ignore"):
        want = get("numpy").compile_program(program, "float64").run(external, {}, n)
    got = get("cpu").compile_program(program, "float64").run(external, {}, n)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=name)
    assert any(np.isnan(v).any() for v in want.values())


@pytest.mark.cudasim
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_cuda_simulator_matches_numpy(kind):
    loss, params, arrays = _backend_case(kind)
    want = _Hvp(loss, params)(arrays)
    got = _Hvp(loss, params, "cuda")(arrays)
    for name, w in want.items():
        assert_close(got[name], w, 1e-10, what=f"{kind} {name} on the CUDA simulator")


def test_extras_of_the_wrong_shape_are_clear_errors():
    from symdl.ops.recurrence import Cell
    from symdl.graph.nodes import VARS

    x = sequence_input("x", (3, 1))
    W = sd.param("W", (1, 2)); Uk = sd.param("U", (2, 2))
    cell = Cell("with_extra", 1, 1, (sp.tanh(VARS[0] + VARS[1]) * VARS[3],), extras_out=1)
    with pytest.raises(ValueError, match="with_extra cell reads 1 extra input"):
        scan(cell, x @ W, Uk, None, 3)
    with pytest.raises(sd.graph.nodes.ShapeMismatch, match=r"extras_out E \(n, 3\) must have the rows of x\*W and "
                                                               r"1·2 = 2 columns"):
        scan(cell, x @ W, Uk, None, 3, extras_out=sd.input("E", 3))
    S = scan(cell, x @ W, Uk, None, 3, extras_out=sequence_input("E", (3, 2)))
    assert S.extras[1] is not None and S.extras[0] is None and S.bias is None


def test_two_scans_and_two_bptt_kernels_whatever_T():
    """The hvp program: the scan, its tangent scan, and their two BPTT kernels; its size does not grow
    with T."""
    from symdl.ir import kernels as ir

    sizes = []
    for steps in (3, 30):
        loss, params, x, y = _loss_of(sd.nn.LSTM(3), T=steps)
        program = _Hvp(loss, params).runner.program
        kinds = [type(k) for k in program.kernels]
        assert kinds.count(ir.Scan) == 2 and kinds.count(ir.ScanGrad) == 2
        sizes.append(len(program.kernels))
    assert sizes[0] == sizes[1]


def test_hvp_with_respect_to_the_input_sequences():
    """Directions on the input sequences and the recurrent kernel: the tangent of ``X W`` is ``V_x W``."""
    from symdl.run.pipeline import compile_outputs

    loss, params, x, y = _loss_of(sd.nn.GRU(2, return_sequences=True), T=3, F=2)
    vx, vu = Input("v__x", *x.shape), sd.param("v__U", params[1].shape)
    hv = sd.hvp(loss, [x, params[1]], [vx, vu])
    arrays = _arrays(loss, params, n=2, seed=3)
    rng = np.random.default_rng(4)
    X, VX, VU = arrays["x"], rng.normal(size=arrays["x"].shape), rng.normal(size=params[1].value_shape)
    runner = compile_outputs({"hx": hv[x], "hu": hv[params[1]]})
    external = {"x": X.reshape(-1, 2), "y": arrays["y"].reshape(-1, 2), "v__x": VX.reshape(-1, 2), "v__U": VU,
                **{str(p.name): arrays[str(p.name)].reshape(tuple(int(d) for d in p.shape)) for p in params}}
    out = runner.run({k: v for k, v in external.items() if k in runner.program.externals}, {}, 2)
    f = sd.value_and_grad(loss, [x, params[1]], backend="numpy", dtype="float64")
    plain = {k: v for k, v in arrays.items() if not k.startswith("v__")}

    def moved(sign, eps=1e-5):
        return f(**{**plain, "x": X + sign * eps * VX,
                    "recurrent_kernel1": plain["recurrent_kernel1"] + sign * eps * VU})[1]

    plus, minus = moved(1), moved(-1)
    assert_close(out["hx"].reshape(X.shape), ((plus["x"] - minus["x"]) / 2e-5).reshape(X.shape), 1e-6, what="x")
    assert_close(out["hu"], (plus["recurrent_kernel1"] - minus["recurrent_kernel1"]) / 2e-5, 1e-6, what="U")


def test_hvp_exports_to_onnx(tmp_path):
    """``export_onnx`` of the hvp expressions (graph level): the scans unrolled, ONNX Runtime's values
    equal the NumPy backend's (float32)."""
    onnx = pytest.importorskip("onnx", reason="the export needs onnx")
    pytest.importorskip("onnxruntime", reason="ONNX Runtime runs the export")
    from symdl.backends.onnx import session
    from symdl.export import export_onnx

    loss, params, arrays = _backend_case("LSTM")
    h = _Hvp(loss, params)
    want = h(arrays)
    path = tmp_path / "hvp.onnx"  # the directions, given no values, are the graph's inputs too
    export_onnx({f"hvp_{p.name}": h.exprs[p] for p in params}, path, inputs=list(h.inputs),
                params={str(p.name): arrays[str(p.name)] for p in params})
    model = onnx.load(str(path))
    names = [o.name for o in model.graph.output]
    feed = {"x": arrays["x"].astype(np.float32), "y": arrays["y"].astype(np.float32)}
    feed.update({f"v__{p.name}": arrays[f"v__{p.name}"].astype(np.float32) for p in params})
    wanted = {i.name for i in model.graph.input}
    got = dict(zip(names, session(model).run(None, {k: v for k, v in feed.items() if k in wanted})))
    for p in params:
        assert_close(got[f"hvp_{p.name}"].reshape(p.value_shape), want[str(p.name)], 1e-4, what=str(p.name))
