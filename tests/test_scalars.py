"""The scalar vocabulary (``formulas.scalars``): NaN rules written once and kept by every printer,
one table entry per function, helpers pulled in by use."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import sympy as sp

import symdl as sd
from symdl.backends import get
from symdl.backends.scalar_code import body_code, helper_source
from symdl.formulas.scalars import SCALARS, decompose, define, template
from symdl.graph.nodes import VARS
from symdl.ir.lowering import lower

SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 5e-324, -5e-324, 1.5, -2.0, 0.25])
A, B = (a.ravel() for a in np.meshgrid(SPECIAL, SPECIAL))

#: Each decomposed function beside what NumPy says it is (the rule every backend must keep).
RULES = {
    "max": (lambda a, b: sp.Max(a, b), np.maximum),
    "min": (lambda a, b: sp.Min(a, b), np.minimum),
    "heaviside": (lambda a, b: sp.Heaviside(a, 0.25), lambda a, b: np.heaviside(a, 0.25)),
    "heaviside_at_0": (lambda a, b: sp.Heaviside(a, 0), lambda a, b: np.heaviside(a, 0.0)),
    "sign": (lambda a, b: sp.sign(a), lambda a, b: np.sign(a)),
    "piecewise": (lambda a, b: sp.Piecewise((a, a > b), (b, sp.Ne(a, 0.25)), (-a, True)),
                  lambda a, b: np.select([a > b, a != 0.25], [a, b], -a)),
    "relu": (lambda a, b: sd.functions.ReLU(a), lambda a, b: np.maximum(0, a)),
}


def _run_text(flavor, body):
    """Evaluate the printed body on every pair of special values (``a``, ``b``)."""
    lines, result = body_code(body, ["a", "b"], flavor)
    source = "\n".join(lines + [f"_out = {result}"])
    if flavor == "array":
        space = {"numpy": np, "scipy": scipy, "a": A, "b": B}
        with np.errstate(all="ignore"):
            exec(source, space)  # noqa: S102 - our own printed code
        return np.broadcast_to(np.asarray(space["_out"], float), A.shape)
    out = []
    for a, b in zip(A, B):
        space = {"math": math, "a": float(a), "b": float(b)}
        exec(source, space)  # noqa: S102
        out.append(space["_out"])
    return np.array(out, float)


def _bits(x):
    return np.asarray(x, np.float64).view(np.uint64)


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("flavor", ["array", "scalar"])
def test_printed_nan_rules_are_numpys_to_the_bit(name, flavor):
    """NaN, ±inf, ±0 and denormals: each printer's text gives what NumPy gives, sign of zero included."""
    body, reference = RULES[name]
    want = reference(A, B)
    got = _run_text(flavor, body(VARS[0], VARS[1]))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(_bits(got)[~np.isnan(want)], _bits(want)[~np.isnan(want)])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_compiled_nan_rules_agree_with_numpy_to_the_bit(dtype, threads, monkeypatch):
    """The same rules compiled: the CPU backend's loops (printed as LLVM IR) on one thread and split
    across threads, and the NumPy backend, in each dtype, to the bit."""
    from helpers import run_threaded

    x, y = sd.input("x", A.size), sd.input("y", A.size)
    prog = lower({name: sd.graph.elementwise(body, x, y) for name, (body, _) in RULES.items()})
    a, b = A.astype(dtype), B.astype(dtype)
    arrays = {"x": np.repeat(a[None, :], 5, 0), "y": np.repeat(b[None, :], 5, 0)}  # 5 rows to share
    cpu = get("cpu").compile_program(prog, dtype)
    run_threaded(cpu, threads, monkeypatch)
    with np.errstate(all="ignore"):
        outputs = [cpu.run(arrays, {}, 5), get("numpy").compile_program(prog, dtype).run(arrays, {}, 5)]
        for name, (_, reference) in RULES.items():
            want = np.repeat(np.asarray(reference(a, b), dtype)[None, :], 5, 0).ravel()
            for out in outputs:
                got = np.asarray(out[name]).ravel()
                assert np.array_equal(np.isnan(got), np.isnan(want)), name
                assert np.array_equal(got[~np.isnan(want)].tobytes(), want[~np.isnan(want)].tobytes()), name


def test_decompose_rewrites_one_node_into_primitives():
    a, b = sp.symbols("a b", real=True)
    assert decompose(sp.exp(a)) is None  # a table entry, not decomposed
    assert str(decompose(sp.Min(a, b))) == "Select(IsNaN(a) | (a < b), a, b)"
    assert str(decompose(sp.Piecewise((a, a > 0), (b, True)))) == "Select(a > 0, a, b)"
    assert str(decompose(sp.Piecewise((a, a > 0)))) == "Select(a > 0, a, nan)"  # numpy.select's default


class softsign_entry(sp.Function):  # noqa: N801 - SymPy names functions in lower case
    """``x / (1 + |x|)``: a function no backend knew, made printable by one ``define``."""

    nargs = 1

    def fdiff(self, argindex=1):
        return 1 / (1 + sp.Abs(self.args[0])) ** 2


@pytest.fixture
def softsign():
    define(softsign_entry, array=template("({0})/(1 + abs({0}))"), scalar=template("({0})/(1 + abs({0}))"),
           llvm=lambda p, x: p.b.fdiv(x, p.b.fadd(p.const(1, x.type), p.intrinsic("fabs", [x]))))
    yield softsign_entry
    del SCALARS[softsign_entry]


def test_a_new_scalar_function_is_one_table_entry(softsign):
    """Registered once with its three renderings, it trains through the NumPy and CPU backends
    (the CPU loop printed as LLVM IR by its builder) to the same numbers."""
    act = sd.activation("softsign_by_entry", lambda t: softsign(t))
    x, y = sd.input("x", 3), sd.input("y", 1)
    W1, W2 = sd.param("W1", (3, 5)), sd.param("W2", (5, 1))
    loss = sd.losses.mse(act(x @ W1) @ W2, y)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(16, 3)), rng.normal(size=(16, 1))
    start = {"W1": rng.normal(size=(3, 5)), "W2": rng.normal(size=(5, 1))}
    results = {}
    for backend in ("numpy", "cpu"):
        train = sd.compile(loss, [W1, W2], optimizer=sd.optim.SGD(0.1), backend=backend, dtype="float64")
        for k, v in start.items():
            train.params[k][...] = v
        losses = [train.step(x=X, y=Y) for _ in range(5)]
        results[backend] = losses, {k: np.array(train.params[k]) for k in start}
        if backend == "cpu":
            printed = [s for s in train.runner.kernel_sources if "abs(" in s and "def formula_kernel(" in s]
            assert printed and all("LLVM_IR" in s and "llvm.fabs" in s for s in printed)
        else:
            assert "/(1 + abs(" in train.runner.source
    np.testing.assert_allclose(results["cpu"][0], results["numpy"][0], rtol=1e-12)
    assert results["cpu"][0][-1] < results["cpu"][0][0]
    for k in start:
        np.testing.assert_allclose(results["cpu"][1][k], results["numpy"][1][k], rtol=1e-12, err_msg=k)


def test_a_function_outside_the_table_is_refused_with_the_table_named():
    with pytest.raises(ValueError, match=r"'gamma'.*allowed: .*Heaviside.*erf.*tanh"):
        sd.activation("bad_gamma", lambda t: sp.gamma(t))


def test_helpers_are_defined_by_the_modules_that_call_them():
    """Dropout's hash and the float32 tanh are declared once and pulled in by what bodies use."""
    x = sd.input("x", 3)
    plain, dropped, with_tanh = (lower({"h": h}) for h in (sd.relu(x), sd.dropout(x, 0.5, key=1), sd.tanh(x)))
    assert helper_source(plain, "array") == helper_source(plain, "scalar32", "@numba.njit") == ""
    assert "def _uniform_hash(" in helper_source(dropped, "array") and "numpy.uint64" in helper_source(dropped, "array")
    cuda = helper_source(dropped, "scalar", "@cuda.jit(device=True)")
    assert cuda.count("@cuda.jit(device=True)\ndef _uniform_hash(") == 1 and "numpy" not in cuda
    assert "def _tanh32(" in helper_source(with_tanh, "scalar32", "@numba.njit")
    assert helper_source(with_tanh, "scalar", "@numba.njit") == ""  # float64 and CUDA call math.tanh
    W = sd.param("W", (3, 2))
    sources = sd.compile(sd.total(sd.tanh(x @ W)), [W], backend="cpu", dtype="float32").runner.kernel_sources
    assert any("def _tanh32(" in s for s in sources)
    assert all(("def _tanh32(" in s) == ("_tanh32(v" in s) for s in sources)  # only where a body calls it


def _float32_loop(body_of):
    """``(grid, float64 NumPy reference, cpu float32 loop)`` of ``body_of(x)`` on a dense grid of float32
    values plus the special ones."""
    grid = np.concatenate([np.linspace(-110, 90, 200_001), np.linspace(-5, 5, 100_001), SPECIAL]).astype(np.float32)
    x = sd.input("x", 1)
    prog = lower({"y": body_of(x)})
    feed = {"x": grid.reshape(-1, 1)}
    n = len(grid)
    with np.errstate(all="ignore"):
        want = get("numpy").compile_program(prog, "float64").run({"x": feed["x"].astype(np.float64)}, {}, n)["y"]
    llvm = get("cpu").compile_program(prog, "float32").run(feed, {}, n)["y"]
    return grid, want.ravel(), llvm.ravel()


@pytest.mark.parametrize("name", ["exp", "erf"])
def test_float32_exp_and_erf_are_arithmetic_accurate_and_keep_nan_inf(name):
    """The float32 CPU loops compute ``exp`` (Cephes) and ``erf`` (Eigen's rational form) as arithmetic
    LLVM vectorises: within 1.2e-7 relative (exp, over its normal range) and 5e-7 absolute (erf) of the
    float64 values, overflow to inf and underflow to 0 where float32 does, NaN kept, erf(±4..) = ±1."""
    from symdl.graph.nodes import elementwise

    grid, want, got = _float32_loop(lambda x: elementwise(sp.exp if name == "exp" else sp.erf, x, op=name))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    if name == "exp":
        normal = finite & (want > 1.2e-38) & (want < 3.4e38)
        assert np.max(np.abs(got[normal] - want[normal]) / want[normal]) < 1.2e-7
        assert np.all(got[finite & (want > 3.5e38)] == np.inf)
        assert np.all(got[finite & (want < 1e-45)] <= 1.5e-45)  # 0, or the smallest denormal it rounds to
    else:
        assert np.max(np.abs(got[finite] - want[finite])) < 5e-7
        assert np.all(got[np.abs(grid) >= 4] == np.sign(grid[np.abs(grid) >= 4]))


def test_float32_exp_and_erf_print_no_library_call():
    """GELU′ (erf and exp per entry) as LLVM IR calls no ``expf``/``erff``: the loop can vectorise;
    float64 keeps the C library's."""
    from symdl.backends.cpu import llvm_code
    from symdl.backends.formulas import formula

    x = sd.input("x", 4)
    prog = lower({"d": sd.grad(sd.total(sd.gelu(x)), [x])[x]})
    k = prog.kernels[-1]
    text32 = llvm_code.kernel_ir(formula(k, prog), "float32")
    text64 = llvm_code.kernel_ir(formula(k, prog), "float64")
    assert "@erff" not in text32 and "llvm.exp.f32" not in text32 and "llvm.floor.f32" in text32
    assert '@"erf"(' in text64 and "llvm.exp.f64" in text64
