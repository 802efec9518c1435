"""Derivatives of derivatives: Hessians, Hessian-vector products, Jacobians, gradient penalties.

Oracles: PyTorch (``torch.autograd.functional.hessian`` / ``hvp`` / ``jacobian`` and double
backward) in float64, and finite differences of symdl's own gradient.
"""
from __future__ import annotations

import numpy as np
import sympy as sp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import symdl as sd
from symdl.ir.lowering import lower
from symdl.run.pipeline import compile_outputs
from helpers import assert_close, random_arrays
from test_gradients import ACTIVATIONS, TORCH_ACTS, build_mlp, mlp_arrays, torch_loss

LOSSES = ["mse", "huber", "bce_with_logits", "softmax_cross_entropy"]  # mae: the Hessian is 0 a.e., tested apart


def torch_mlp(torch, widths, acts, loss_name, params, arrays):
    """The same MLP as ``build_mlp`` as a function of one flat float64 parameter vector."""
    shapes = [p.value_shape for p in params]
    sizes = [int(np.prod(s)) for s in shapes]
    x = torch.tensor(arrays["x"], dtype=torch.float64)
    y = torch.tensor(arrays["y"], dtype=torch.float64)
    if loss_name == "softmax_cross_entropy":
        y = y.argmax(1)

    def f(flat):
        parts = dict(zip([str(p.name) for p in params],
                         [t.reshape(s) for t, s in zip(torch.split(flat, sizes), shapes)]))
        h = x
        for i in range(len(widths) - 1):
            h = h @ parts[f"W{i}"] + parts[f"b{i}"]
            if i < len(widths) - 2:
                h = getattr(torch.nn.functional, TORCH_ACTS[acts[i]])(h)
        return torch_loss(torch, loss_name, h, y)

    flat = torch.tensor(np.concatenate([arrays[str(p.name)].reshape(-1) for p in params]), dtype=torch.float64)
    return f, flat


mlp_case = st.tuples(
    st.lists(st.integers(1, 4), min_size=2, max_size=4),
    st.lists(st.sampled_from(ACTIVATIONS), min_size=3, max_size=3),
    st.sampled_from(LOSSES),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)


def _fix(widths, loss_name):
    if loss_name == "softmax_cross_entropy" and widths[-1] < 2:
        widths = widths[:-1] + [2]
    return widths


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_case)
def test_hessian_matches_pytorch(case):
    torch = pytest.importorskip("torch")
    widths, acts, loss_name, n, seed = case
    widths = _fix(widths, loss_name)
    loss, params, *_ = build_mlp(widths, acts, loss_name)
    arrays = mlp_arrays(loss_name, widths, params, n, seed)
    H = sd.hessian(loss, params, backend="numpy", dtype="float64")(**arrays)
    f, flat = torch_mlp(torch, widths, acts, loss_name, params, arrays)
    ref = torch.autograd.functional.hessian(f, flat).numpy()
    P = flat.numel()
    assert H.shape == (P, P)
    assert_close(H, ref, 1e-8, what=f"Hessian {widths} {acts} {loss_name}")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_case)
def test_hvp_matches_pytorch(case):
    torch = pytest.importorskip("torch")
    widths, acts, loss_name, n, seed = case
    widths = _fix(widths, loss_name)
    loss, params, *_ = build_mlp(widths, acts, loss_name)
    vectors = [sd.param(f"V{p.name}", p.value_shape) for p in params]
    hv = sd.hvp(loss, params, vectors)
    program = lower({f"hvp_{p.name}": hv[p] for p in params})
    runner = sd.backends.get("numpy").compile_program(program, "float64")
    arrays = mlp_arrays(loss_name, widths, params, n, seed)
    rng = np.random.default_rng(seed % 1000)
    for v in vectors:
        arrays[str(v.name)] = rng.normal(size=(int(v.shape[0]), int(v.shape[1])))
    run_arrays = {k: (a.reshape(1, -1) if a.ndim == 1 else a) for k, a in arrays.items()}
    out = runner.run(run_arrays, {}, n)
    fn, flat = torch_mlp(torch, widths, acts, loss_name, params, arrays)
    v = torch.tensor(np.concatenate([arrays[str(v.name)].reshape(-1) for v in vectors]), dtype=torch.float64)
    _, ref = torch.autograd.functional.hvp(fn, flat, v)
    mine = np.concatenate([np.asarray(out[f"hvp_{p.name}"]).reshape(-1) for p in params])
    assert_close(mine, ref.numpy(), 1e-8, what=f"H·v {widths} {acts} {loss_name}")


def _small_mlp(act="tanh"):
    x = sd.input("x", 3); y = sd.input("y", 2)
    W1 = sd.param("W1", (3, 4)); b1 = sd.param("b1", 4); W2 = sd.param("W2", (4, 2)); b2 = sd.param("b2", 2)
    out = sd.functions.get(act)(x @ W1 + b1) @ W2 + b2
    return x, y, [W1, b1, W2, b2], out


def _torch_small(torch, arrays, act="tanh"):
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in arrays.items()}
    out = getattr(torch.nn.functional, TORCH_ACTS[act])(t["x"] @ t["W1"] + t["b1"]) @ t["W2"] + t["b2"]
    return t, out


@pytest.mark.parametrize("act", ["tanh", "gelu", "softplus", "elu"])
def test_gradient_penalty_matches_pytorch_double_backward(act):
    """loss + 0.1 ‖∂loss/∂x‖²: a gradient of a gradient, trained through like any loss."""
    torch = pytest.importorskip("torch")
    x, y, params, out = _small_mlp(act)
    loss = sd.losses.mse(out, y)
    gx = sd.grad(loss, [x])[x]
    penalised = loss + 0.1 * sd.sum_squares(gx)
    arrays = random_arrays([x, y] + params, n=5, seed=4)
    value, grads = sd.value_and_grad(penalised, params, backend="numpy")(**arrays)

    t, tout = _torch_small(torch, arrays, act)
    tloss = torch.nn.functional.mse_loss(tout, t["y"])
    (tgx,) = torch.autograd.grad(tloss, t["x"], create_graph=True)
    tpen = tloss + 0.1 * (tgx**2).sum()
    tpen.backward()
    assert value == pytest.approx(tpen.item(), rel=1e-12)
    for p in params:
        assert_close(grads[str(p.name)], t[str(p.name)].grad.numpy(), 1e-8, what=str(p.name))


def test_saliency_gradient_wrt_input_matches_pytorch():
    torch = pytest.importorskip("torch")
    x, y, params, out = _small_mlp("silu")
    loss = sd.losses.softmax_cross_entropy(out, y)
    gx = sd.grad(loss, [x])[x]
    assert tuple(gx.shape) == tuple(x.shape)
    arrays = random_arrays([x] + params, n=4, seed=2)
    arrays["y"] = np.eye(2)[[0, 1, 1, 0]]
    program = lower({"gx": gx})
    runner = sd.backends.get("numpy").compile_program(program, "float64")
    mine = runner.run({k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in arrays.items()}, {}, 4)["gx"]
    t, tout = _torch_small(torch, arrays, "silu")
    torch.nn.functional.cross_entropy(tout, t["y"].argmax(1)).backward()
    assert_close(mine, t["x"].grad.numpy(), 1e-10, what="∂L/∂x")


def test_grad_rejects_what_is_not_a_leaf():
    x, y, params, out = _small_mlp()
    with pytest.raises(TypeError, match=r"sd.param\) or inputs \(sd.input"):
        sd.grad(sd.losses.mse(out, y), [out])


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_jacobian_matches_pytorch(backend):
    torch = pytest.importorskip("torch")
    x, y, params, out = _small_mlp("sigmoid")
    W1, b1 = params[:2]
    arrays = random_arrays([x] + params, n=3, seed=5)
    J = sd.jacobian(out, [W1, b1, x], backend=backend)(**arrays)
    assert J.shape == (3 * 2, 3 * 4 + 4 + 3 * 3)

    def f(w1, c1, xx):
        h = torch.sigmoid(xx @ w1 + c1) @ torch.tensor(arrays["W2"]) + torch.tensor(arrays["b2"])
        return h.reshape(-1)

    ref = torch.autograd.functional.jacobian(f, tuple(torch.tensor(arrays[k]) for k in ("W1", "b1", "x")))
    ref = np.concatenate([r.reshape(6, -1).numpy() for r in ref], axis=1)
    assert_close(J, ref, 1e-8 if backend == "cpu" else 1e-12, what="Jacobian")


def test_hessian_on_cpu_backend_matches_numpy_and_is_symmetric():
    x, y, params, out = _small_mlp("tanh")
    loss = sd.losses.bce_with_logits(out, y)
    arrays = random_arrays([x] + params, n=4, seed=6)
    arrays["y"] = (np.arange(8).reshape(4, 2) % 3 == 0).astype(float)
    H_cpu = sd.hessian(loss, params[:2], backend="cpu")(**arrays)
    H_np = sd.hessian(loss, params[:2], backend="numpy")(**arrays)
    assert H_cpu.shape == (16, 16)
    assert_close(H_cpu, H_np, 1e-12, what="cpu vs numpy")
    assert_close(H_np, H_np.T, 1e-12, what="symmetry")


def test_hessian_of_simple_losses_is_known():
    """l2: 2I; mae and l1: 0 almost everywhere (sign′ = DiracDelta is taken as 0)."""
    W = sd.param("W", (2, 3)); b = sd.param("b", 2)
    arrays = random_arrays([W, b], seed=1)
    H = sd.hessian(sd.l2(W, b), [W, b])(**arrays)
    assert_close(H, 2 * np.eye(8), 0, what="l2")
    assert not np.any(sd.hessian(sd.l1(W, b), [W, b])(**arrays))
    x = sd.input("x", 2); y = sd.input("y", 3)
    a = random_arrays([x, y, W], n=4, seed=2)
    assert not np.any(sd.hessian(sd.losses.mae(x @ W, y), [W])(**a))


def test_hvp_checks_its_directions():
    x, y, params, out = _small_mlp()
    loss = sd.losses.mse(out, y)
    with pytest.raises(ValueError, match="one per parameter"):
        sd.hvp(loss, params, params[:1])
    with pytest.raises(ValueError, match=r"must have its shape \(3, 4\)"):
        sd.hvp(loss, params[:1], [sd.param("V", (4, 3))])


def test_hvp_shares_nodes_with_the_gradient():
    """Reverse over reverse reuses the gradient's nodes: the forward activation appears once."""
    x, y, params, out = _small_mlp()
    loss = sd.losses.mse(out, y)
    vs = [sd.param(f"V{p.name}", p.value_shape) for p in params]
    hv = sd.hvp(loss, params, vs)
    g = sd.grad(loss, params)
    program = lower({**{f"g{p.name}": g[p] for p in params}, **{f"h{p.name}": hv[p] for p in params}})
    tanh_kernels = [k for k in program.kernels if "tanh" in str(k) and "gemm" not in str(k)]
    alone = lower({f"g{p.name}": g[p] for p in params})
    assert len(program.kernels) > len(alone.kernels)
    assert sum("tanh(v0 + v1)" in str(k) for k in program.kernels) == 1, [str(k) for k in tanh_kernels]


# --------------------------------------------------------------------------- prove and check_grad


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_prove_proves_every_builtin_activation(act):
    x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1)); b = sd.param("b", 1)
    proof = sd.prove(sd.losses.mse(sd.functions.get(act)(x @ W + b), y), [W, b])
    assert proof, str(proof)
    assert str(proof).startswith("proved") and "n=2 for W (2, 1), b (1,)" in str(proof)
    assert proof.entries == 3


@pytest.mark.parametrize("loss_name", ["mse", "mae", "huber", "bce_with_logits", "softmax_cross_entropy"])
def test_prove_proves_every_builtin_loss(loss_name):
    k = 2 if loss_name == "softmax_cross_entropy" else 1
    x = sd.input("x", 2); y = sd.input("y", k); W = sd.param("W", (2, k)); b = sd.param("b", k)
    loss = sd.losses.get(loss_name)(x @ W + b, y) + 0.1 * sd.l2(W) + 0.1 * sd.l1(b)
    proof = sd.prove(loss, [W, b])
    assert proof, str(proof)
    assert proof.entries == 3 * k


def test_prove_proves_rowwise_and_input_gradients_symbolically():
    x = sd.input("x", 2); y = sd.input("y", 3); W = sd.param("W", (2, 3))
    proof = sd.prove(sd.losses.mse(sd.log_softmax(x @ W), y), [W, x], sizes={"n": 1})
    assert proof and proof.method == "symbolic" and "n=1" in str(proof), str(proof)


def test_prove_and_check_grad_catch_a_wrong_custom_derivative():
    good = sd.activation("mish_ok", lambda t: t * sp.tanh(sp.log(1 + sp.exp(t))))
    wrong = sd.activation("mish_wrong", lambda t: t * sp.tanh(sp.log(1 + sp.exp(t))),
                          derivative=lambda t: sp.tanh(sp.log(1 + sp.exp(t))))  # forgets the product rule
    x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1))
    assert sd.prove(sd.losses.mse(good(x @ W), y), [W])
    proof = sd.prove(sd.losses.mse(wrong(x @ W), y), [W])
    assert not proof
    text = str(proof)
    assert text.startswith("NOT proved") and "mish_wrong(x*W)" in text and "differs by" in text, text
    arrays = random_arrays([x, y, W], n=4, seed=3)
    assert sd.check_grad(sd.losses.mse(good(x @ W), y), [W], arrays).passed
    report = sd.check_grad(sd.losses.mse(wrong(x @ W), y), [W], arrays)
    assert not report.passed and report["W"] > 1e-3 and "exceeds tol" in str(report)


def test_custom_derivative_is_used_and_compiles():
    """A straight-through estimator: the forward is sign, the backward the identity."""
    ste = sd.activation("sign_ste_test", sp.sign, derivative=lambda t: sp.Integer(1))
    x = sd.input("x", 2); W = sd.param("W", (2, 1))
    arrays = random_arrays([x, W], n=3, seed=0)
    value, grads = sd.value_and_grad(sd.total(ste(x @ W)), [W])(**arrays)
    assert value == pytest.approx(np.sign(arrays["x"] @ arrays["W"]).sum())
    assert_close(grads["W"], arrays["x"].sum(0).reshape(2, 1), 1e-12, what="straight-through")


def test_check_grad_matches_gradcheck_semantics_on_a_random_mlp():
    loss, params, *_ = build_mlp([3, 4, 2], ["gelu"], "bce_with_logits")
    arrays = mlp_arrays("bce_with_logits", [3, 4, 2], params, 5, 0)
    report = sd.check_grad(loss, params, arrays)
    assert set(report) == {"W0", "b0", "W1", "b1"} and report.passed and max(report.values()) < 1e-7, str(report)


# --------------------------------------------------------------------------- reading the formulas


def test_relu_derivative_reads_as_an_indicator():
    x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 3)); V = sd.param("V", (3, 1))
    g = sd.grad(sd.losses.mse(sd.relu(x @ W) @ V, y), [W])[W]
    assert str(g) == "x.T*(((2*(relu(x*W)*V - y)/n)*V.T)⊙1[x*W > 0])"
    assert r"\odot \mathbb{1}\left[x W > 0\right]" in sd.latex(g) and "Heaviside" not in str(g) + sd.latex(g)


def test_no_odot_next_to_a_scalar():
    x = sd.input("x", 2); W = sd.param("W", (2, 3))
    lr = sp.Symbol("lr")
    assert str(lr * sd.tanh(x @ W)) == "lr*tanh(x*W)" and str(2 * sd.tanh(x @ W)) == "2*tanh(x*W)"
    assert sd.latex(lr * sd.tanh(x @ W)) == r"lr \tanh{\left(x W \right)}"
    assert sd.latex(2 * sd.tanh(x @ W)) == r"2 \tanh{\left(x W \right)}"
    assert sd.latex(sd.hadamard(sd.tanh(x @ W), sd.relu(x @ W))).count(r"\odot") == 1


def test_hvp_prints_like_a_gradient():
    x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1)); V = sd.param("V", (2, 1))
    hv = sd.hvp(sd.losses.mse(x @ W, y), [W], [V])[W]
    assert str(hv) == "x.T*(2*(x*V)/n)"


# --------------------------------------------------------------------------- convolutions


def _small_cnn(pool_stride):
    """conv -> relu -> max-pool (windows overlap at stride 1) -> conv -> tanh -> avg-pool -> dense."""
    x = sd.input("x", (8, 8, 2)); y = sd.input("y", 3)
    K1 = sd.param("K1", (3, 3, 2, 3)); c1 = sd.param("c1", 3); K2 = sd.param("K2", (2, 2, 3, 2))
    c2 = sd.param("c2", 2)
    h = sd.max_pool2d(sd.relu(sd.conv2d(x, K1, padding="same") + c1), 2, pool_stride)
    h = sd.avg_pool2d(sd.tanh(sd.conv2d(h, K2, stride=2) + c2), (2, 1), 1)
    W = sd.param("W", (sd.flatten(h).shape[1], 3)); b = sd.param("b", 3)
    params = [K1, c1, K2, c2, W, b]
    return sd.losses.softmax_cross_entropy(sd.flatten(h) @ W + b, y), params


@pytest.mark.parametrize("pool_stride", [1, 2])
def test_explain_hvp_of_a_cnn_equals_hvp_and_finite_differences_of_the_gradient(pool_stride):
    """Forward over reverse through every conv-family node (explain_hvp's tangents: maxpool's is
    pick_max) equals reverse over reverse (sd.hvp, through route_max's own gradient, pick_max
    again) and central differences of the gradient."""
    loss, params = _small_cnn(pool_stride)
    vectors = [sd.param(f"V_{p.name}", p.value_shape) for p in params]
    e = sd.explain_hvp(loss, params, vectors)
    hv = sd.hvp(loss, params, vectors)
    text = str(e)
    assert "Ż2 = V_c2 + patches(pick_max(A1, Ȧ1))*K2 + patches(maxpool(A1))*V_K2" in text, text
    assert "(Hv)_K1 = patches(x).T*δ̇1" in text and "pick_max(A, V): each window's V" in text
    both = compile_outputs({**{f"e_{p.name}": e.hvp[p] for p in params}, **{f"h_{p.name}": hv[p] for p in params}})
    f = sd.value_and_grad(loss, params, backend="numpy")
    for seed in range(3):
        rng = np.random.default_rng(seed)
        arrays = {**random_arrays(params, seed=seed), "x": rng.normal(size=(3, 8, 8, 2)), "y": np.eye(3)[[0, 2, 1]]}
        directions = random_arrays(vectors, seed=seed + 100)
        out = both.run({k: a.reshape(-1, a.shape[-1]) for k, a in {**arrays, **directions}.items()}, {}, 3)
        eps = 1e-6
        up, down = (f(**{**arrays, **{str(p.name): arrays[str(p.name)] + s * eps * directions[f"V_{p.name}"]
                                      for p in params}})[1] for s in (1, -1))
        for p in params:
            explained, reverse = out[f"e_{p.name}"], out[f"h_{p.name}"]
            assert_close(explained, reverse, rtol=1e-12, atol=1e-12, what=str(p.name))
            assert np.abs(reverse).max() > 1e-4, p.name  # not trivially zero
            difference = (up[str(p.name)] - down[str(p.name)]) / (2 * eps)
            assert_close(reverse.reshape(difference.shape), difference, rtol=1e-6, atol=1e-7,
                         what=f"finite differences, {p.name}")
