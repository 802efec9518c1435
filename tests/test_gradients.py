"""Three independent gradient oracles: finite differences, explicit-scalar SymPy, PyTorch autograd."""
from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import symdl as sd
from helpers import assert_close, finite_difference, random_arrays
from symdl.graph.nodes import leaves, n as N
from symdl.formulas.activations import expand_activations

ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus", "gelu", "silu"]
REGRESSION_LOSSES = ["mse", "mae", "huber"]


def fd_check(loss, params, arrays=None, rtol=1e-6, n=5, seed=0):
    f = sd.value_and_grad(loss, params, backend="numpy", dtype="float64")
    arrays = arrays or random_arrays(leaves(loss), n=n, seed=seed)
    _, grads = f(**arrays)
    for p in params:
        num = finite_difference(f, arrays, str(p.name))
        assert_close(grads[str(p.name)], num, rtol, atol=1e-9, what=f"∂L/∂{p.name}")
    return f, arrays


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_finite_differences(act):
    x = sd.input("x", 3); y = sd.input("y", 2)
    W = sd.param("W", (3, 2)); b = sd.param("b", 2)
    fn = sd.functions.get(act)
    fd_check(sd.losses.mse(fn(x @ W + b), y), [W, b])


@pytest.mark.parametrize("loss", REGRESSION_LOSSES)
def test_regression_loss_finite_differences(loss):
    x = sd.input("x", 3); y = sd.input("y", 2)
    W = sd.param("W", (3, 2)); b = sd.param("b", 2)
    fd_check(sd.losses.get(loss)(x @ W + b, y), [W, b], seed=3)


def test_bce_with_logits_finite_differences():
    x = sd.input("x", 3); y = sd.input("y", 1)
    W = sd.param("W", (3, 1)); b = sd.param("b", 1)
    arrays = random_arrays(leaves(x @ W), n=6)
    arrays.update(y=(np.arange(6) % 2).reshape(6, 1).astype(float), b=np.array([0.3]))
    fd_check(sd.losses.bce_with_logits(x @ W + b, y), [W, b], arrays=arrays)


def test_softmax_cross_entropy_finite_differences():
    x = sd.input("x", 3); y = sd.input("y", 4)
    W = sd.param("W", (3, 4)); b = sd.param("b", 4)
    arrays = random_arrays([x, W, b], n=6)
    arrays["y"] = np.eye(4)[np.arange(6) % 4]
    fd_check(sd.losses.softmax_cross_entropy(x @ W + b, y), [W, b], arrays=arrays)


@pytest.mark.parametrize("rowwise", ["softmax", "log_softmax"])
def test_rowwise_finite_differences(rowwise):
    x = sd.input("x", 3); y = sd.input("y", 4)
    W = sd.param("W", (3, 4))
    out = getattr(sd, rowwise)(x @ W)
    fd_check(sd.losses.mse(out, y), [W])


@pytest.mark.parametrize("reg", ["l1", "l2"])
def test_regularizer_finite_differences(reg):
    W = sd.param("W", (3, 2)); V = sd.param("V", 4)
    loss = getattr(sd, reg)(W, V)
    f = sd.value_and_grad(loss, [W, V])
    arrays = random_arrays([W, V], seed=1)
    value, grads = f(**arrays)
    expected = sum(np.abs(a).sum() if reg == "l1" else (a**2).sum() for a in arrays.values())
    assert value == pytest.approx(expected, rel=1e-12)
    for k in ("W", "V"):
        assert_close(grads[k], finite_difference(f, arrays, k), 1e-6, what=k)


def test_reductions_and_scalars_finite_differences():
    x = sd.input("x", 3); W = sd.param("W", (3, 2))
    z = x @ W
    loss = sd.mean(sd.softplus(z)) - 0.5 * sd.total(z) / 7 + sd.total(sd.hadamard(z, z)) ** 2 / 100
    fd_check(loss, [W])


def test_shared_node_adjoints_are_summed():
    x = sd.input("x", 2); W = sd.param("W", (2, 2))
    h = sd.tanh(x @ W)
    loss = sd.total(h @ W) + sd.mean(h) + sd.total(sd.hadamard(h, h))  # W and h each used twice
    fd_check(loss, [W])


def test_matmul_chain_and_transpose_finite_differences():
    x = sd.input("x", 3); A = sd.param("A", (3, 3)); B = sd.param("B", (3, 2))
    loss = sd.total(sd.hadamard(x @ A @ B, x @ A.T @ B)) + sd.total(B.T @ A.T)
    fd_check(loss, [A, B])


def test_custom_activation_finite_differences():
    mish = sd.activation("mish", lambda t: t * sp.tanh(sp.log(1 + sp.exp(t))))
    x = sd.input("x", 2); y = sd.input("y", 2); W = sd.param("W", (2, 2))
    fd_check(sd.losses.mse(mish(x @ W), y), [W])


# --------------------------------------------------------------------------- random MLPs


def build_mlp(widths, acts, loss_name):
    x = sd.input("x", widths[0])
    y = sd.input("y", widths[-1])
    params, h = [], x
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        W = sd.param(f"W{i}", (a, b)); c = sd.param(f"b{i}", b)
        params += [W, c]
        h = h @ W + c
        if i < len(widths) - 2:
            h = sd.functions.get(acts[i])(h)
    loss = sd.losses.get(loss_name)(h, y)
    return loss, params, x, y


def mlp_arrays(loss_name, widths, params, n, seed):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.normal(size=(n, widths[0]))}
    k = widths[-1]
    if loss_name == "softmax_cross_entropy":
        arrays["y"] = np.eye(k)[rng.integers(0, k, n)]
    elif loss_name == "bce_with_logits":
        arrays["y"] = rng.integers(0, 2, (n, k)).astype(float)
    else:
        arrays["y"] = rng.normal(size=(n, k))
    for p in params:
        arrays[str(p.name)] = rng.normal(scale=0.8, size=p.value_shape)
    return arrays


mlp_strategy = st.tuples(
    st.lists(st.integers(1, 5), min_size=2, max_size=5),  # depth 1-4
    st.lists(st.sampled_from(ACTIVATIONS), min_size=4, max_size=4),
    st.sampled_from(REGRESSION_LOSSES + ["bce_with_logits", "softmax_cross_entropy"]),
    st.integers(1, 6),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_strategy)
def test_random_mlps_match_finite_differences(case):
    widths, acts, loss_name, n, seed = case
    if loss_name == "softmax_cross_entropy" and widths[-1] < 2:
        widths = widths[:-1] + [2]
    loss, params, *_ = build_mlp(widths, acts, loss_name)
    fd_check(loss, params, arrays=mlp_arrays(loss_name, widths, params, n, seed))


# --------------------------------------------------------------------------- explicit-scalar oracle


def explicit_scalar_gradients(loss, params, arrays, n_value):
    """Expand the loss into one scalar, differentiate each weight with SymPy, evaluate."""
    concrete = loss.xreplace({N: n_value})
    entries, values = {}, {}  # every matrix entry as a real scalar symbol, and its value
    for leaf in leaves(concrete):
        a = np.asarray(arrays[str(leaf.name)], dtype=float).reshape(int(leaf.shape[0]), int(leaf.shape[1]))
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                s = sp.Symbol(f"{leaf.name}_{i}_{j}", real=True)
                entries[leaf[i, j]] = s
                values[s] = sp.Float(a[i, j], 30)
    scalar = expand_activations(concrete.as_explicit()[0, 0], use_impl=False).xreplace(entries)
    out = {}
    for p in params:
        rows, cols = int(p.shape[0]), int(p.shape[1])
        g = np.zeros((rows, cols))
        for i in range(rows):
            for j in range(cols):
                g[i, j] = float(sp.diff(scalar, sp.Symbol(f"{p.name}_{i}_{j}", real=True)).xreplace(values).evalf(30))
        out[str(p.name)] = g.reshape(p.value_shape)
    return float(scalar.xreplace(values).evalf(30)), out


@pytest.mark.parametrize(
    "act,loss_name",
    [("tanh", "bce_with_logits"), ("sigmoid", "mse"), ("gelu", "huber"), ("silu", "softmax_cross_entropy"),
     ("elu", "mae"), ("softplus", "mse")],
)
def test_explicit_scalar_oracle(act, loss_name):
    widths = [2, 2, 2]
    loss, params, *_ = build_mlp(widths, [act], loss_name)
    loss = loss + 1e-2 * sd.l2(params[0]) + 1e-2 * sd.l1(params[2])
    arrays = mlp_arrays(loss_name, widths, params, 2, seed=7)
    value, grads = sd.value_and_grad(loss, params)(**arrays)
    ref_value, ref = explicit_scalar_gradients(loss, params, arrays, 2)
    assert value == pytest.approx(ref_value, rel=1e-12)
    for k in ref:
        assert_close(grads[k], ref[k], 1e-10, what=k)


def test_explicit_scalar_oracle_on_symbolic_formula():
    """symdl's matrix formula, made explicit, equals SymPy's scalar derivative entry by entry."""
    x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1)); b = sd.param("b", 1)
    loss = sd.losses.bce_with_logits(sd.tanh(x @ W + b), y)
    g = sd.grad(loss, [W])[W]
    concrete = loss.xreplace({N: 2})
    scalar = expand_activations(concrete.as_explicit()[0, 0], use_impl=False)
    mine = expand_activations(g.xreplace({N: 2}).as_explicit(), use_impl=False)
    Wc = W.xreplace({N: 2})
    rng = np.random.default_rng(0)
    point = {}
    for leaf in leaves(concrete):
        for i in range(int(leaf.shape[0])):
            for j in range(int(leaf.shape[1])):
                point[leaf[i, j]] = sp.Float(rng.normal(), 30)
    for i in range(2):
        diff = (sp.diff(scalar, Wc[i, 0]) - mine[i, 0]).xreplace(point).evalf(30)
        assert abs(float(diff)) < 1e-20


# --------------------------------------------------------------------------- PyTorch autograd


TORCH_ACTS = {
    "sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu", "leaky_relu": "leaky_relu", "elu": "elu",
    "softplus": "softplus", "gelu": "gelu", "silu": "silu",
}


def torch_loss(torch, name, out, y):
    F = torch.nn.functional
    if name == "softmax_cross_entropy":
        return F.cross_entropy(out, y)
    return {"mse": F.mse_loss, "mae": F.l1_loss, "huber": F.huber_loss,
            "bce_with_logits": F.binary_cross_entropy_with_logits}[name](out, y)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_strategy)
def test_random_mlps_match_pytorch(case):
    torch = pytest.importorskip("torch")
    widths, acts, loss_name, n, seed = case
    if loss_name == "softmax_cross_entropy" and widths[-1] < 2:
        widths = widths[:-1] + [2]
    loss, params, *_ = build_mlp(widths, acts, loss_name)
    loss = loss + 1e-3 * sd.l2(*params[::2])
    arrays = mlp_arrays(loss_name, widths, params, n, seed)
    value, grads = sd.value_and_grad(loss, params)(**arrays)

    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in arrays.items()}
    h = t["x"]
    for i in range(len(widths) - 1):
        h = h @ t[f"W{i}"] + t[f"b{i}"]
        if i < len(widths) - 2:
            h = getattr(torch.nn.functional, TORCH_ACTS[acts[i]])(h)
    y = t["y"].argmax(1) if loss_name == "softmax_cross_entropy" else t["y"]
    tl = torch_loss(torch, loss_name, h, y) + 1e-3 * sum((t[str(p.name)] ** 2).sum() for p in params[::2])
    tl.backward()
    assert value == pytest.approx(tl.item(), rel=1e-12, abs=1e-14)
    for p in params:
        assert_close(grads[str(p.name)], t[str(p.name)].grad.numpy(), 1e-8, what=str(p.name))
