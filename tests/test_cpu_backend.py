"""The Numba CPU backend agrees with the NumPy reference on every construct and optimizer."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from hypothesis import HealthCheck, given, settings

import symdl as sd
from helpers import assert_close
from test_gradients import ACTIVATIONS, build_mlp, mlp_arrays, mlp_strategy

ROOT = Path(__file__).resolve().parents[1]
TOL = {"float64": 1e-10, "float32": 1e-4}


def compare_backends(loss, params, arrays, dtype):
    ref_v, ref_g = sd.value_and_grad(loss, params, backend="numpy", dtype=dtype)(**arrays)
    v, g = sd.value_and_grad(loss, params, backend="cpu", dtype=dtype)(**arrays)
    assert v == pytest.approx(ref_v, rel=TOL[dtype], abs=TOL[dtype])
    for k in ref_g:
        assert_close(g[k], ref_g[k], TOL[dtype], atol=TOL[dtype] * 1e-2, what=f"{k} ({dtype})")


def every_construct_loss():
    x = sd.input("x", 3); y = sd.input("y", 4); c = sd.input("c", 4)
    W = sd.param("W", (3, 4)); b = sd.param("b", 4); V = sd.param("V", (4, 4))
    z = x @ W + b
    h = [sd.functions.get(a)(z) for a in ACTIVATIONS]
    mix = h[0]
    for t in h[1:]:
        mix = mix + t
    out = mix @ V
    loss = (sd.losses.softmax_cross_entropy(out, y) + sd.losses.mse(sd.softmax(z), c) + sd.losses.mae(z, c)
            + sd.losses.huber(out, c) + sd.losses.bce_with_logits(z, y) + sd.mean(sd.log_softmax(out))
            + 1e-2 * sd.l1(W) + 1e-2 * sd.l2(V, b) + sd.total(sd.hadamard(z, z)) / 50 + sd.total(V.T @ V) / 100)
    return loss, [W, b, V]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_construct_matches_numpy(dtype):
    loss, params = every_construct_loss()
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(7, 3)), "y": np.eye(4)[rng.integers(0, 4, 7)], "c": rng.normal(size=(7, 4)),
              "W": rng.normal(size=(3, 4)), "b": rng.normal(size=4), "V": rng.normal(size=(4, 4)) * 0.5}
    compare_backends(loss, params, arrays, dtype)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_strategy)
def test_random_mlps_cpu_matches_numpy(case):
    widths, acts, loss_name, n, seed = case
    if loss_name == "softmax_cross_entropy" and widths[-1] < 2:
        widths = widths[:-1] + [2]
    loss, params, *_ = build_mlp(widths, acts, loss_name)
    compare_backends(loss, params, mlp_arrays(loss_name, widths, params, n, seed), "float64")


def test_a_large_product_heavy_step_leaves_threads_to_blas_and_both_ways_agree(monkeypatch):
    """A product-heavy step (an MLP) runs on one thread, BLAS threading its products; forced onto
    the step's threads (products split by rows, BLAS on one) it gives NumPy's answer too."""
    from symdl.backends.cpu import backend as cpu_backend

    from helpers import run_threaded

    x = sd.input("x", 64); y = sd.input("y", 10)
    W1 = sd.param("W1", (64, 128)); b1 = sd.param("b1", 128); W2 = sd.param("W2", (128, 10))
    loss = sd.losses.softmax_cross_entropy(sd.relu(x @ W1 + b1) @ W2, y)
    rng = np.random.default_rng(1)
    arrays = {"x": rng.normal(size=(1100, 64)), "y": np.eye(10)[rng.integers(0, 10, 1100)],
              "W1": rng.normal(size=(64, 128)) * 0.1, "b1": rng.normal(size=128), "W2": rng.normal(size=(128, 10)) * 0.1}
    f = sd.value_and_grad(loss, [W1, b1, W2], backend="cpu")
    assert not cpu_backend.threaded(f.program, 1100)  # products are 98% of the work
    compare_backends(loss, [W1, b1, W2], arrays, "float64")
    ref_v, ref_g = sd.value_and_grad(loss, [W1, b1, W2], backend="numpy")(**arrays)
    run_threaded(f.runner, 2, monkeypatch)
    v, g = f(**arrays)
    assert v == pytest.approx(ref_v, rel=1e-10)
    for k in ref_g:
        assert_close(g[k], ref_g[k], 1e-10, atol=1e-12, what=k)
    assert f.runner._ready[1100][0][:, 2].sum() >= 3  # its products were split


def test_loop_dominated_step_threads_its_loops_and_agrees():
    """Elementwise-heavy work runs on the step's threads (BLAS held to one thread) and agrees."""
    from symdl.backends.cpu import backend as cpu_backend

    x = sd.input("x", 64); y = sd.input("y", 2); W = sd.param("W", (64, 2))
    h = x
    for act in ACTIVATIONS * 2:
        h = sd.functions.get(act)(h + 0.1)
    loss = sd.losses.mse(h @ W, y) + sd.mean(h)
    rng = np.random.default_rng(2)
    arrays = {"x": rng.normal(size=(3000, 64)), "y": rng.normal(size=(3000, 2)), "W": rng.normal(size=(64, 2)) * 0.1}
    f = sd.value_and_grad(loss, [W], backend="cpu")
    assert cpu_backend.threaded(f.program, 3000)
    assert f.runner.uses_parallel(3000)
    compare_backends(loss, [W], arrays, "float64")


# --------------------------------------------------------------------------- optimizers


def textbook(name, hyper, p, g, state, t):
    """Each optimizer from its textbook / PyTorch-documentation definition, in NumPy."""
    lr = hyper["lr"]
    if name == "SGD":
        return p - lr * g
    if name in ("Momentum", "Nesterov"):
        mu = hyper["momentum"]
        state["b"] = mu * state.get("b", 0) + g
        return p - lr * (g + mu * state["b"] if name == "Nesterov" else state["b"])
    if name in ("Adam", "AdamW"):
        b1, b2, eps = hyper["beta1"], hyper["beta2"], hyper["eps"]
        if name == "AdamW":
            p = p * (1 - lr * hyper["weight_decay"])
        state["m"] = b1 * state.get("m", 0) + (1 - b1) * g
        state["v"] = b2 * state.get("v", 0) + (1 - b2) * g * g
        mhat, vhat = state["m"] / (1 - b1**t), state["v"] / (1 - b2**t)
        return p - lr * mhat / (np.sqrt(vhat) + eps)
    if name == "RMSProp":
        state["v"] = hyper["alpha"] * state.get("v", 0) + (1 - hyper["alpha"]) * g * g
        return p - lr * g / (np.sqrt(state["v"]) + hyper["eps"])
    if name == "Adagrad":
        state["G"] = state.get("G", 0) + g * g
        return p - lr * g / (np.sqrt(state["G"]) + hyper["eps"])
    raise AssertionError(name)


def small_regression():
    x = sd.input("x", 3); y = sd.input("y", 2)
    W1 = sd.param("W1", (3, 5)); b1 = sd.param("b1", 5); W2 = sd.param("W2", (5, 2))
    loss = sd.losses.mse(sd.tanh(x @ W1 + b1) @ W2, y) + 1e-3 * sd.l2(W1)
    return loss, [W1, b1, W2]


OPTIMIZERS = ["SGD", "Momentum", "Nesterov", "Adam", "AdamW", "RMSProp", "Adagrad"]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_optimizer_matches_textbook(name, backend):
    loss, params = small_regression()
    rng = np.random.default_rng(2)
    init = {str(p.name): rng.normal(size=p.value_shape) * 0.5 for p in params}
    X, Y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    opt = sd.optim.OPTIMIZERS[name](0.05)
    train = sd.compile(loss, params, optimizer=opt, backend=backend, dtype="float64")
    for k, v in init.items():
        train.params[k][...] = v
    grad_fn = sd.value_and_grad(loss, params)
    ref, states = {k: v.copy() for k, v in init.items()}, {k: {} for k in init}
    for t in range(1, 6):
        if t == 4:
            opt.lr = 0.01  # hyper-parameters change between steps without recompiling
        value, grads = grad_fn(x=X, y=Y, **ref)
        assert train.step(x=X, y=Y) == pytest.approx(value, rel=1e-12)
        for k in ref:
            ref[k] = textbook(name, opt.values, ref[k], grads[k], states[k], t)
    for k in ref:
        assert_close(train.params[k], ref[k], 1e-12, what=f"{name} {k}")
        for s, v in states[k].items():
            assert_close(train.state[k][s], v, 1e-12, what=f"{name} state {s} of {k}")


TORCH_OPT = {
    "SGD": ("SGD", {}), "Momentum": ("SGD", {"momentum": 0.9}), "Nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "Adam": ("Adam", {}), "AdamW": ("AdamW", {}), "RMSProp": ("RMSprop", {"eps": 1e-8}), "Adagrad": ("Adagrad", {}),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_matches_torch_optim(name):
    torch = pytest.importorskip("torch")
    loss, params = small_regression()
    rng = np.random.default_rng(3)
    init = {str(p.name): rng.normal(size=p.value_shape) * 0.5 for p in params}
    X, Y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    train = sd.compile(loss, params, optimizer=sd.optim.OPTIMIZERS[name](0.05), backend="cpu", dtype="float64")
    for k, v in init.items():
        train.params[k][...] = v
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    cls, kw = TORCH_OPT[name]
    opt = getattr(torch.optim, cls)(tp.values(), lr=0.05, **kw)
    tx, ty = torch.tensor(X), torch.tensor(Y)
    for _ in range(5):
        train.step(x=X, y=Y)
        opt.zero_grad()
        out = torch.tanh(tx @ tp["W1"] + tp["b1"]) @ tp["W2"]
        (torch.nn.functional.mse_loss(out, ty) + 1e-3 * (tp["W1"] ** 2).sum()).backward()
        opt.step()
    for k in init:
        assert_close(train.params[k], tp[k].detach().numpy(), 1e-10, what=f"{name} {k}")


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_coupled_parameters_update_from_the_old_values(backend):
    """∂/∂A sum(A⊙B) = B and ∂/∂B = A: each update must read the other's value from *before* the step."""
    A = sd.param("A", (2, 3)); B = sd.param("B", (2, 3)); x = sd.input("x", 3)
    loss = sd.total(sd.hadamard(A, B)) + sd.mean(x @ A.T)
    train = sd.compile(loss, [A, B], optimizer=sd.optim.SGD(0.1), backend=backend, dtype="float64")
    rng = np.random.default_rng(0)
    a0, b0 = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    train.params["A"][...] = a0
    train.params["B"][...] = b0
    X = rng.normal(size=(4, 3))
    train.step(x=X)
    ga = b0 + np.tile(X.sum(0) / (4 * 2), (2, 1))  # mean over the n*2 entries of x Aᵀ
    np.testing.assert_allclose(train.params["A"], a0 - 0.1 * ga, rtol=1e-12)
    np.testing.assert_allclose(train.params["B"], b0 - 0.1 * a0, rtol=1e-12)


def test_optimizer_formulas_are_sympy():
    for name in OPTIMIZERS:
        opt = sd.optim.OPTIMIZERS[name](0.1)
        states, new_p = opt.rule()
        assert isinstance(new_p, sp.Expr) and sp.Symbol("g", real=True) in new_p.free_symbols
        assert opt.formulas()[-1].startswith("p ← ") and r"\leftarrow" in opt.latex()
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        sd.optim.Adam(1e-3, beta3=0.5)


def test_float32_training_matches_numpy_backend():
    loss, params = small_regression()
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(9, 3)).astype(np.float32), rng.normal(size=(9, 2)).astype(np.float32)
    out = {}
    for backend in ("numpy", "cpu"):
        train = sd.compile(loss, params, optimizer=sd.optim.Adam(1e-2), backend=backend)
        assert train.params["W1"].dtype == np.float32
        r = np.random.default_rng(5)
        for p in params:
            train.params[str(p.name)][...] = r.normal(size=p.value_shape)
        for _ in range(10):
            train.step(x=X, y=Y)
        out[backend] = {k: v.copy() for k, v in train.params.items()}
    for k in out["cpu"]:
        assert_close(out["cpu"][k], out["numpy"][k], 1e-4, what=k)


def test_short_last_batch_and_changing_batch_sizes():
    loss, params = small_regression()
    train = sd.compile(loss, params, backend="cpu", dtype="float64")
    rng = np.random.default_rng(6)
    for n in (8, 8, 3, 8, 1):
        assert np.isfinite(train.step(x=rng.normal(size=(n, 3)), y=rng.normal(size=(n, 2))))


def test_step_rejects_bad_batches_clearly():
    loss, params = small_regression()
    train = sd.compile(loss, params, backend="cpu", dtype="float64")
    with pytest.raises(ValueError, match=r"'x' has shape \(4, 2\), expected \(n, 3\)"):
        train.step(x=np.ones((4, 2)), y=np.ones((4, 2)))
    with pytest.raises(ValueError, match="'y' contains NaN"):
        train.step(x=np.ones((4, 3)), y=np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="unknown array"):
        train.step(x=np.ones((4, 3)), y=np.ones((4, 2)), W1=np.ones((3, 5)))


def test_source_kernels_and_inspect():
    loss, params = small_regression()
    train = sd.compile(loss, params, optimizer=sd.optim.Adam(1e-3), backend="cpu", dtype="float32")
    assert "def formula_kernel(" in train.source and ("np.dot(" in train.source or "_acc +=" in train.source)
    with pytest.raises(RuntimeError, match="call step"):
        train.inspect("llvm")
    train.step(x=np.ones((4, 3), np.float32), y=np.ones((4, 2), np.float32))
    table = str(train.kernels)
    assert "gemm" in table and "update" in table and "total FLOPs per step" in table
    if os.environ.get("NUMBA_DISABLE_JIT") != "1":
        assert "define" in train.inspect("llvm")
        assert train.inspect("asm").strip()
    state = train.state_dict()
    train2 = sd.compile(loss, params, optimizer=sd.optim.Adam(1e-3), backend="cpu", dtype="float32")
    train2.load_state_dict(state)
    assert train2.t == 1 and np.array_equal(train2.state["W1"]["m"], train.state["W1"]["m"])


def test_set_num_threads():
    sd.set_num_threads(1)
    assert sd.get_num_threads() == 1
    sd.set_num_threads(None)
    with pytest.raises(ValueError, match="between 1 and"):
        sd.set_num_threads(10_000)


# --------------------------------------------------------------------------- cache & debugging

CACHE_SCRIPT = textwrap.dedent(
    """
    import numpy as np, symdl as sd
    x = sd.input("x", 3); y = sd.input("y", 2)
    W = sd.param("W", (3, 2)); b = sd.param("b", 2)
    train = sd.compile(sd.losses.mse(sd.tanh(x @ W + b), y), [W, b], optimizer=sd.optim.Adam(1e-2), backend="cpu")
    train.step(x=np.ones((4, 3), np.float32), y=np.zeros((4, 2), np.float32))
    # this model's formulas (the prebuilt products, like the driver, are compiled once per machine)
    kernels = [k for k in train.runner.kernels() if k.py_func.__module__.startswith("symdl_cpu_")]
    print("STATS", sum(not k.compiled for k in kernels), sum(k.compiled for k in kernels))
    runner = train.runner  # a formula's module (the products' module only names the prebuilt kernel)
    print("PATH", next(m.__file__ for m, s in zip(runner.kernel_modules, runner.kernel_sources) if "def formula_kernel(" in s))
    """
)


def run_script(cache_dir, script=CACHE_SCRIPT):
    env = dict(os.environ, SYMDL_CACHE_DIR=str(cache_dir))
    env.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    stats = next(l for l in out.stdout.splitlines() if l.startswith("STATS")).split()[1:]
    path = next(l for l in out.stdout.splitlines() if l.startswith("PATH")).split(maxsplit=1)[1]
    return [int(s) for s in stats], Path(path)


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no compilation to cache")
def test_second_process_reuses_the_compile_cache(tmp_path):
    (hits1, misses1), path = run_script(tmp_path)
    assert misses1 >= 1 and hits1 == 0
    assert path.is_relative_to(tmp_path)
    (hits2, misses2), _ = run_script(tmp_path)
    assert misses2 == 0 and hits2 == misses1, "the second process compiled again"


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no compilation to cache")
def test_corrupt_cache_entries_are_rebuilt(tmp_path):
    _, path = run_script(tmp_path)
    saved = list(path.parent.glob("*.o"))  # the formula's machine code (backends/objects.py)
    assert saved
    for f in saved:
        f.write_bytes(b"garbage")
    (hits, misses), _ = run_script(tmp_path)
    assert misses >= 1  # not trusted: compiled afresh, and saved again
    (hits, misses), _ = run_script(tmp_path)
    assert misses == 0 and hits >= 1
    path.write_text("this is not python (")  # a corrupt generated module
    (hits, misses), _ = run_script(tmp_path)
    assert misses >= 1  # rewritten and compiled afresh
    assert "def formula_kernel(" in path.read_text()


def test_correctness_suite_under_numba_disable_jit():
    """NUMBA_DISABLE_JIT=1 runs the generated code as plain Python (fast debugging)."""
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        pytest.skip("already running without the JIT")
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    tests = ["tests/test_cpu_backend.py::test_every_construct_matches_numpy",
             "tests/test_cpu_backend.py::test_optimizer_matches_textbook",
             "tests/test_cpu_backend.py::test_loop_dominated_step_threads_its_loops_and_agrees"]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_cuda_without_a_gpu_says_so_and_names_the_way_out():
    from numba import config, cuda

    if config.ENABLE_CUDASIM or cuda.is_available():
        pytest.skip("a GPU (or the simulator) is available here")
    from symdl.backends.cuda_backend import CudaUnavailable

    x = sd.input("x", 2); W = sd.param("W", (2, 1))
    with pytest.raises(CudaUnavailable, match=r"backend='cpu'.*NUMBA_ENABLE_CUDASIM=1"):
        sd.value_and_grad(sd.total(x @ W), [W], backend="cuda")


def test_float32_tanh_is_within_3e7_of_float64():
    """float32 CPU loops use Eigen's rational tanh (vectorisable); it stays within ~2 float32 ulps."""
    import numba

    from symdl.formulas.scalars import TANH32

    namespace = {"numba": numba}
    exec(TANH32.define('@numba.njit(inline="always", error_model="numpy")'), namespace)  # noqa: S102 - our own helper
    tanh32 = namespace["_tanh32"]

    @numba.njit
    def apply(x, out):
        for i in range(x.size):
            out[i] = tanh32(x[i])

    x = np.concatenate([np.linspace(-20, 20, 200_001), [0.0, 1e-30, -3e-4, 7.9, -7.95, 1e4]]).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    exact = np.tanh(x.astype(np.float64))
    rel = np.abs(out - exact) / np.maximum(np.abs(exact), np.finfo(np.float32).tiny)
    assert rel.max() < 3e-7
    loss, params = small_regression()  # one graph: each sd.param call is its own parameter
    assert "_tanh32(" in sd.compile(loss, params, backend="cpu").source
    assert "_tanh32(" not in sd.compile(loss, params, backend="cpu", dtype="float64").source


# --------------------------------------------------------------------------- one kernel per formula


def deep_tanh_mlp(hidden: int, width: int = 8, inputs: int = 5, classes: int = 3):
    x = sd.input("x", inputs); y = sd.input("y", classes)
    h, params, fan_in = x, [], inputs
    for i in range(hidden):
        W = sd.param(f"W{i}", (fan_in, width)); b = sd.param(f"b{i}", width)
        h, fan_in = sd.tanh(h @ W + b), width
        params += [W, b]
    W = sd.param("Wout", (fan_in, classes)); b = sd.param("bout", classes)
    return sd.losses.softmax_cross_entropy(h @ W + b, y), params + [W, b]


def test_compiled_formulas_do_not_grow_with_depth():
    """Every hidden layer's activation, derivative and update is one compiled formula."""
    counts = []
    for hidden in (3, 16):
        loss, params = deep_tanh_mlp(hidden)
        train = sd.compile(loss, params, optimizer=sd.optim.Adam(1e-2), backend="cpu")
        counts.append(len(train.runner.kernel_sources))
        assert len(train.program.kernels) > 3 * hidden
    assert counts[0] == counts[1]


def test_each_formula_is_printed_once_and_that_print_serves_every_use():
    """The runner prints a formula once per distinct ``Formula.key``; printing each use afresh
    gives the same module."""
    from symdl.backends.cpu.backend import kernel_source

    loss, params = deep_tanh_mlp(4)
    for dtype, flavor in (("float32", "scalar32"), ("float64", "scalar")):
        runner = sd.compile(loss, params, optimizer=sd.optim.Adam(1e-2), backend="cpu", dtype=dtype).runner
        for use, op in zip(runner.uses, runner.ops):
            assert kernel_source(use, flavor, dtype) == runner.kernel_sources[op]


def test_deep_net_trains_on_cpu_like_numpy():
    """A 16-hidden-layer net: gradients and five Adam steps agree with the NumPy reference."""
    loss, params = deep_tanh_mlp(16)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(11, 5)); Y = np.eye(3)[rng.integers(0, 3, 11)]
    arrays = {"x": X, "y": Y, **{str(p.name): rng.normal(size=p.value_shape) * 0.5 for p in params}}
    compare_backends(loss, params, arrays, "float64")
    steps = {b: sd.compile(loss, params, optimizer=sd.optim.Adam(1e-2), backend=b, dtype="float64")
             for b in ("numpy", "cpu")}
    losses = {b: [s.step(x=X, y=Y) for _ in range(5)] for b, s in steps.items()}
    assert_close(np.array(losses["cpu"]), np.array(losses["numpy"]), 1e-10, what="losses")
    for name, value in steps["numpy"].params.items():
        assert_close(steps["cpu"].params[name], value, 1e-10, atol=1e-12, what=name)


def test_short_last_batch_uses_the_compiled_step_of_the_full_batch():
    """digits with batch 64 leaves a short last batch: it keeps the full batch's threading and
    compiles nothing."""
    x = sd.input("x", 64); y = sd.input("y", 2); W = sd.param("W", (64, 2))
    h = x
    for act in ACTIVATIONS * 2:  # loop-heavy, so the usual batch runs threaded
        h = sd.functions.get(act)(h + 0.1)
    train = sd.compile(sd.losses.mse(h @ W, y) + sd.mean(h), [W], backend="cpu")
    rng = np.random.default_rng(0)
    train.step(x=rng.normal(size=(3000, 64)), y=rng.normal(size=(3000, 2)))
    runner = train.runner
    assert not runner.will_compile(3)
    train.step(x=rng.normal(size=(3, 64)), y=rng.normal(size=(3, 2)))
    assert runner.uses_parallel(3000) and runner.uses_parallel(3)


FORMULA_SCRIPT = textwrap.dedent(
    """
    import numpy as np, symdl as sd
    widths = {widths}
    x = sd.input("x", widths[0]); y = sd.input("y", widths[-1])
    h, params = x, []
    for i, (a, b) in enumerate(zip(widths[:-2], widths[1:-1])):
        W = sd.param(f"W{{i}}", (a, b)); c = sd.param(f"c{{i}}", b)
        h = sd.tanh(h @ W + c); params += [W, c]
    W = sd.param("Wo", (widths[-2], widths[-1])); c = sd.param("co", widths[-1])
    train = sd.compile(sd.losses.softmax_cross_entropy(h @ W + c, y), params + [W, c],
                       optimizer=sd.optim.Adam(1e-2), backend="cpu")
    rng = np.random.default_rng(0)
    train.step(x=rng.normal(size=(9, widths[0])), y=np.eye(widths[-1])[rng.integers(0, widths[-1], 9)])
    kernels = [k for k in train.runner.kernels() if k.py_func.__module__.startswith("symdl_cpu_")]
    print("KERNELS", sum(not k.compiled for k in kernels), sum(k.compiled for k in kernels))
    """
)


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no compilation to cache")
def test_a_second_model_of_other_widths_and_depth_reuses_the_compiled_formulas(tmp_path):
    env = dict(os.environ, SYMDL_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_DISABLE_JIT", None)

    def run(widths):
        out = subprocess.run([sys.executable, "-c", FORMULA_SCRIPT.format(widths=widths)], env=env,
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert out.returncode == 0, out.stderr
        line = next(l for l in out.stdout.splitlines() if l.startswith("KERNELS"))
        return [int(v) for v in line.split()[1:]]

    hits, misses = run([6, 16, 16, 4])
    assert misses > 0 and hits == 0
    hits, misses = run([7, 32, 24, 24, 24, 5])  # other widths, other depth, the same formulas
    assert misses == 0 and hits > 0, "a formula compiled by the first model was compiled again"


def test_inputs_are_read_in_place_or_copied_when_not_contiguous():
    """The step reads a large C-contiguous input where it lies, and copies any other; all agree."""
    from symdl.backends.cpu.backend import IN_PLACE_MIN_BYTES

    loss, params = small_regression()
    train = sd.compile(loss, params, optimizer=sd.optim.SGD(0.1), backend="cpu", dtype="float64")
    state = train.state_dict()
    rng = np.random.default_rng(0)
    rows = IN_PLACE_MIN_BYTES // (8 * 2) + 1  # y (rows, 2) in float64 is just large enough, so x is too
    X = rng.normal(size=(rows, 3)); Y = rng.normal(size=(rows, 2))
    first = [train.step(x=X, y=Y) for _ in range(3)]
    assert all(spot is not None for spot in train.runner._ready[rows][3]), "both inputs are read in place"
    train.load_state_dict(state)
    Xf, Yf = np.asfortranarray(X), np.asfortranarray(Y)
    again = [train.step(x=Xf, y=Yf) for _ in range(3)]
    assert first == again
    ref = sd.compile(loss, params, optimizer=sd.optim.SGD(0.1), backend="numpy", dtype="float64")
    ref.load_state_dict(train.state_dict())
    for _ in range(3):  # a fresh array each step: its address is read, not the last one's
        Xn, Yn = rng.normal(size=(rows, 3)), rng.normal(size=(rows, 2))
        assert train.step(x=Xn, y=Yn) == pytest.approx(ref.step(x=Xn, y=Yn), rel=1e-12)


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_and_serial_steps_agree_on_every_buffer(threads):
    """The step on one thread and on several (flat loops, Adam's update, column sums, products
    split by rows) writes the same buffers: each thread runs the serial loop on its units."""
    from symdl.backends.cpu import runtime as cpu_runtime

    x = sd.input("x", 600); y = sd.input("y", 300); W = sd.param("W", (600, 300)); b = sd.param("b", 300)
    loss = sd.losses.mse(sd.tanh(x @ W + b), y) + sd.mean(sd.sigmoid(x @ W))
    train = sd.compile(loss, [W, b], optimizer=sd.optim.Adam(1e-2), backend="cpu", dtype="float64")
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(700, 600)), rng.normal(size=(700, 300))
    train.step(x=X, y=Y)  # compiles and fills the buffers
    runner = train.runner
    start = {k: v.copy() for k, v in runner.persist.views.items()}
    results = []
    for count in (1, threads):
        for k, v in start.items():
            runner.persist.views[k][...] = v
        runner.workspace.get(700).views["x"][...] = X
        runner.workspace.get(700).views["y"][...] = Y
        runner._scal[:-1] = [1.0 if str(s) == "t" else train.optimizer.values.get(str(s), 0.0)
                             for s in runner.program.scalars]
        runner._scal[-1] = 700
        frames = runner.frames(700, count > 1)
        assert frames[:, 2].sum() >= (5 if count > 1 else 0)
        from symdl.backends import threads as symdl_threads
        with symdl_threads.blas_single_threaded():
            cpu_runtime.run(frames, count)
        results.append({k: v.copy() for k, v in runner.buffers(700).items()})
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-12, atol=1e-12, err_msg=name)


def _numba_compiles_the_python_loops(runner):
    """Each formula's serial kernel replaced by Numba's compile of its Python loop (the text the
    LLVM printer follows), so a second run computes what Numba's kernels compute."""
    from symdl.backends.cpu.runtime import Kernel

    for module in runner.kernel_modules:
        kernel = module.formula_kernel
        if kernel.llvm is not None and "gemm" not in kernel.py_func.__module__:
            library, symbol = Kernel(kernel.py_func)._compile()
            kernel._address, kernel._numba = library.get_pointer_to_function(symbol), library
    runner._ready.clear()


PRINTED_BODIES = {  # each through the LLVM printer (llvm_code) and through Numba, float64
    "division by a root": lambda a, b: a / sp.sqrt(b * b + 1),
    "powers": lambda a, b: a**3 / (b * b + 1) ** 2 - a ** sp.Rational(3, 2) + 2 ** a,
    "activations": lambda a, b: sp.tanh(a) * b - sp.exp(-a) + sp.log(1 + b**2) + sp.erf(a) + sp.Abs(b) ** 3,
    "nan rules": lambda a, b: sp.Max(a, b) - sp.Min(a, 0) + sp.sign(a) + sp.Heaviside(b) + sp.Heaviside(a, 0.25),
    "branches": lambda a, b: sp.Piecewise((a, a > b), (b * 2, sp.Ne(a, 0.5)), (-a, True)),
}


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="compares compiled kernels")
@pytest.mark.parametrize("name", list(PRINTED_BODIES))
def test_printed_llvm_loops_agree_with_numbas_kernels_and_numpy(name):
    """The serial kernel printed as LLVM IR computes what Numba's compile of the same formula does,
    to the last bit or two (float64, special values included; sums may round in another order), and
    what NumPy does: a flat loop, a broadcast row, a sum and a row's log-sum-exp."""
    from symdl.backends import get
    from symdl.ir.lowering import lower

    fn = PRINTED_BODIES[name]
    x, y, r = sd.input("x", 3), sd.input("y", 3), sd.param("r", (1, 3))
    h = sd.graph.elementwise(fn, x, y)
    prog = lower({"h": h, "row": sd.graph.elementwise(fn, x, r), "total": sd.total(sd.hadamard(h, r)),
                  "logsumexp": sd.log_softmax(h)})
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(7, 3)) * 3, rng.normal(size=(7, 3))
    X[0, :], Y[1, :] = [np.nan, np.inf, -np.inf], [0.0, -0.0, 0.5]
    X[2, 1] = Y[2, 1] = 0.5
    arrays = {"x": X, "y": Y, "r": np.array([[0.5, -1.0, np.nan]])}
    runner = get("cpu").compile_program(prog, "float64")
    with np.errstate(all="ignore"):
        want = {k: np.array(v) for k, v in get("numpy").compile_program(prog, "float64").run(arrays, {}, 7).items()}
    printed = {k: np.array(v) for k, v in runner.run(arrays, {}, 7).items()}
    assert all("LLVM_IR" in s for s in runner.kernel_sources if "def formula_kernel(" in s)
    _numba_compiles_the_python_loops(runner)
    numba_out = {k: np.array(v) for k, v in runner.run(arrays, {}, 7).items()}
    for k in want:
        np.testing.assert_allclose(printed[k], numba_out[k], rtol=1e-15, atol=1e-300, equal_nan=True, err_msg=k)
        np.testing.assert_allclose(printed[k], want[k], rtol=1e-12, atol=1e-300, equal_nan=True, err_msg=k)


def _image_program():
    """Every image kernel class and geometry branch: a padded and a strided valid convolution
    (``Im2Col``, ``Col2Im``), disjoint and overlapping max and average pools (their gradients by
    window and by pixel), ``flatten`` (``Reshape``), and a dropout (the hash reads ``i, j``)."""
    from symdl.ir.lowering import lower

    x = sd.input("x", (6, 6, 2)); K = sd.param("K", (3, 3, 2, 3)); K2 = sd.param("K2", (2, 2, 3, 2))
    a = sd.conv2d(x, K, padding="same")
    disjoint, overlapping = sd.max_pool2d(a, 2), sd.max_pool2d(a, 3, stride=1)
    mean, overlapping_mean = sd.avg_pool2d(a, 2), sd.avg_pool2d(a, 3, stride=2)
    c2 = sd.dropout(sd.flatten(sd.conv2d(overlapping, K2, stride=2)), 0.4, key=5)
    loss = (sd.sum_squares(sd.flatten(disjoint)) + sd.total(c2) + sd.sum_squares(sd.flatten(mean))
            + sd.total(sd.flatten(overlapping_mean)))
    g = sd.grad(loss, [K, x, K2])
    return lower({"loss": loss, "gK": g[K], "gx": g[x], "gK2": g[K2], "c2": c2})


def _every_kind_programs():
    """``[(program, n, persistent arrays)]`` holding every kernel class between them
    (``ir.KERNELS``): a CNN's step (``_image_program``), a dense net's loss and gradients (products,
    row-broadcast elementwise loops, the four reductions) and Adam's update of its weights with an
    L2 penalty (flat loops, ``Update``)."""
    from symdl.ops.embedding import embedding
    from symdl.run.pipeline import gradient_program, update_program

    x = sd.input("x", 5); y = sd.input("y", 4); W = sd.param("W", (5, 4)); b = sd.param("b", 4)
    loss = sd.losses.softmax_cross_entropy(sd.tanh(x @ W + b), y) + 1e-3 * sd.l2(W)
    dense, _ = gradient_program(loss, [W, b])
    update, _ = update_program([W, b], sd.optim.Adam(1e-2), penalty=sd.l2(W))
    ids = sd.input("ids", (3,), dtype="int32"); E = sd.param("E", (6, 5))  # gather and scatter-add
    tokens, _ = gradient_program(sd.total(sd.tanh(embedding(E, ids) @ W)), [E])
    from symdl.graph.nodes import sequence_input
    from symdl.ops.attention import causal, mix, scores

    q = sequence_input("q", (4, 5))  # products within sequences (BlockGemm), every orientation, a causal mask
    P = sd.softmax(causal(scores(q @ W, q @ W, 4), 4))
    attention, _ = gradient_program(sd.sum_squares(mix(P, q @ W, 4)), [W])
    lstm = sd.nn.LSTM(3, return_sequences=True).build_both(1, q, q)  # a scan and its BPTT
    recurrent, _ = gradient_program(sd.sum_squares(lstm.train), lstm.params)
    from symdl.ir.lowering import lower

    directions = [sd.param(f"v{i}", p.shape) for i, p in enumerate(lstm.params)]  # scans with extra inputs
    hv = sd.hvp(sd.sum_squares(lstm.train), lstm.params, directions)
    tangent = lower({f"hvp{i}": hv[p] for i, p in enumerate(lstm.params)})
    return [(_image_program(), 3, {}), (dense, 9, {}), (update, 1, {"W": ("W", (5, 4)), "b": ("b", (1, 4))}),
            (tokens, 9, {}), (attention, 5, {}), (recurrent, 5, {}), (tangent, 5, {})]


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="threads need the compiled driver")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("threads", [2, 3])
def test_every_kernel_kind_split_across_threads_matches_one_thread_and_numpy(dtype, threads, monkeypatch):
    """Every kernel class split across the step's threads (each thread its share of the units)
    writes every buffer exactly as one thread does, NaN and Inf included, and as NumPy does."""
    from symdl.backends import get
    from symdl.backends import threads as symdl_threads
    from symdl.graph.nodes import TokenInput
    from symdl.ir.kernels import KERNELS, at_batch

    from helpers import run_threaded

    seen = set()
    rng = np.random.default_rng(3)
    for prog, n, persistent in _every_kind_programs():
        arrays = {name: rng.normal(size=tuple(at_batch(d, n) for d in prog.shape_of(name))).astype(dtype)
                  for name in prog.externals}
        first = arrays[prog.externals[0]]
        first.flat[1], first.flat[4] = np.nan, np.inf
        for leaf in prog.inputs:  # token ids are row numbers (ops.embedding): integers inside the table
            if isinstance(leaf, TokenInput):
                arrays[str(leaf.name)] = rng.integers(0, 6, size=arrays[str(leaf.name)].shape).astype(dtype)
        start = {name: rng.normal(size=shape).astype(dtype) for name, (_, shape) in persistent.items()}
        scalars = {str(s): 2.0 for s in prog.scalars}
        outs = []
        for count in (1, threads):
            runner = get("cpu").compile_program(prog, dtype)
            for name, array in runner.persistent_arrays(persistent).items():
                array[...] = start[name]
            run_threaded(runner, count, monkeypatch)
            with symdl_threads.blas_single_threaded():
                runner.run(arrays, scalars, n)
            outs.append({k: np.array(v) for k, v in runner.buffers(n).items()})
            if count > 1:
                assert runner._ready[n][0][:, 2].sum() >= len(prog.kernels) // 2  # most kernels split
        for k in prog.kernels:
            np.testing.assert_array_equal(outs[1][k.out], outs[0][k.out], err_msg=f"{k.out}: {k.kind}")
            seen.add(type(k))
        reference = get("numpy").compile_program(prog, dtype)
        for name, array in reference.persistent_arrays(persistent).items():
            array[...] = start[name]
        with np.errstate(all="ignore"):
            want = reference.run(arrays, scalars, n)
        for name, value in want.items():
            np.testing.assert_allclose(outs[1][prog.outputs[name]], value, rtol=TOL[dtype], atol=TOL[dtype],
                                       equal_nan=True, err_msg=name)
    assert seen == set(KERNELS)


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="compares compiled kernels")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_printed_llvm_image_kernels_agree_with_numbas_kernels_to_the_bit(dtype):
    """Image kernels and dropout's hash printed as LLVM IR (``llvm_image``, ``UniformHash``'s builder)
    write every buffer of a CNN's step exactly as Numba's compile of their Python loops does, NaN,
    Inf and max-pool ties included, and match NumPy."""
    from symdl.backends import get

    prog = _image_program()
    kinds = {k.kind for k in prog.kernels}
    assert {"im2col", "col2im", "maxpool", "maxpool_grad", "avgpool", "avgpool_grad", "reshape"} <= kinds
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3 * 36, 2))
    X[3, 0], X[10, 1], X[50, 0] = np.nan, np.inf, -np.inf
    X[20:24, :] = 0.5  # a window of equal entries: the first is the arg-max
    arrays = {"x": X.astype(dtype), "K": rng.normal(size=(18, 3)).astype(dtype),
              "K2": rng.normal(size=(12, 2)).astype(dtype)}
    scalars = {"seed": 7.0, "t": 2.0}
    runner = get("cpu").compile_program(prog, dtype)
    loops = [s for s in runner.kernel_sources if "def formula_kernel(" in s]
    assert all("LLVM_IR" in s for s in loops)
    runner.run(arrays, scalars, 3)
    printed = {k: np.array(v) for k, v in runner.buffers(3).items()}
    _numba_compiles_the_python_loops(runner)
    runner.run(arrays, scalars, 3)
    numba_out = {k: np.array(v) for k, v in runner.buffers(3).items()}
    checked = set()
    for k in prog.kernels:  # each kernel whose inputs agree writes the same bits
        if k.kind == "gemm" or not all(np.array_equal(printed[o.buffer], numba_out[o.buffer], equal_nan=True)
                                       for o in k.reads()):
            continue
        if dtype == "float32" and k.kind == "elementwise":  # Numba's float32 loops promote float64 constants
            np.testing.assert_allclose(printed[k.out], numba_out[k.out], rtol=1e-6, equal_nan=True, err_msg=k.out)
        else:
            np.testing.assert_array_equal(printed[k.out], numba_out[k.out], err_msg=f"{k.out}: {k}")
        checked.add(k.kind)
    assert kinds - {"gemm"} <= checked
    assert any(np.isnan(v).any() for v in printed.values()) and any(np.isfinite(v).all() for v in printed.values())
    with np.errstate(all="ignore"):
        want = get("numpy").compile_program(prog, dtype).run(arrays, scalars, 3)
    tol = TOL[dtype]
    for name in ("gx", "c2"):
        np.testing.assert_allclose(printed[name], want[name], rtol=tol, atol=tol, equal_nan=True, err_msg=name)
