"""Derivatives of derivatives: Hessians, Hessian-vector products, Jacobians, gradient penalties.

Oracles: PyTorch (``torch.autograd.functional.hessian`` / ``hvp`` / ``jacobian`` and double
backward) in float64, and finite differences of symdl's own gradient.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import symdl as sd
from symdl.lowering import lower
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
