"""The pipeline's shape: no import cycles, no stage importing a later one, no module shadowed
by a function, one backend contract, and the extending guide's recipe followed from a test."""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symdl as sd
from helpers import assert_close, finite_difference

ROOT = Path(sd.__file__).parent

#: The pipeline order of docs/architecture.md: a module's stage is its folder under ``symdl/``
#: (root modules name themselves); a module may import only its own stage or earlier ones.
STAGES = [
    {"version", "registry"},
    {"graph"},
    {"formulas"},
    {"autodiff"},
    {"ir"},
    {"ops"},       # node families: each fills every rule table for its nodes
    {"backends"},
    {"run"},
    {"nn"},
    {"export", "show"},  # models leaving symdl (ONNX) and seen (SVG, HTML, LaTeX)
    {"distributed"},
    {"cli", "__main__", "__init__", "sklearn"},  # front ends: users of the package
]
STAGE = {name: i for i, names in enumerate(STAGES) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set:
    """Every ``symdl`` module ``path`` imports, at top level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("symdl"):
                continue
            for alias in node.names:  # ``from . import x`` may name a submodule
                candidate = f"{mod}.{alias.name}"
                out.add(candidate if _exists(candidate) else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("symdl"))
    out.discard(name)
    return {m for m in out if _exists(m)}


def _exists(mod: str) -> bool:
    rel = Path(*mod.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _graph() -> dict:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def test_no_import_cycle():
    graph = _graph()
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph.get(m, ()):
            if d == "symdl":
                continue
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in graph:
        if m not in state and m != "symdl":
            visit(m, [m])


def test_no_stage_imports_a_later_stage():
    def stage(mod):
        parts = mod.split(".")
        return STAGE[parts[1] if len(parts) > 1 else "__init__"]

    bad = []
    for mod, deps in _graph().items():
        if mod == "symdl":
            continue
        for d in deps:
            if d != "symdl" and stage(d) > stage(mod):
                bad.append(f"{mod} imports {d}")
            if d == "symdl" and stage(mod) < STAGE["cli"]:  # the command line is a user of the package
                bad.append(f"{mod} imports the package root")
    assert not bad, bad


def _backend_of(mod: str):
    """The backend a module belongs to: ``numpy_backend``, ``cuda_backend`` or anything under ``cpu/``."""
    parts = mod.split(".")
    if parts[1:2] != ["backends"] or len(parts) < 3:
        return None
    return parts[2] if parts[2] in {"numpy_backend", "cpu", "cuda_backend"} else None


def test_backends_never_import_each_other():
    for mod, deps in _graph().items():
        mine = _backend_of(mod)
        if mine:
            others = {d for d in deps if _backend_of(d) not in (None, mine)}
            assert not others, f"{mod} imports {others}"


def test_root_holds_only_the_package_face():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py", "registry.py",
                                                         "version.py"]
    for folder in ROOT.iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            assert folder.name in STAGE, f"symdl/{folder.name}/ has no stage in STAGES"


def test_no_public_module_is_shadowed_by_a_function():
    for info in pkgutil.walk_packages([str(ROOT)], prefix="symdl."):
        if info.name.endswith("__main__"):
            continue  # importing it runs the command line
        parent_name, _, child = info.name.rpartition(".")
        parent = importlib.import_module(parent_name)
        module = importlib.import_module(info.name)
        attr = getattr(parent, child, module)
        assert attr is module, f"{parent_name}.{child} is {attr!r}, not the module {info.name}"


def test_every_backend_keeps_one_run_contract():
    x = sd.input("x", 3); y = sd.input("y", 2); W = sd.param("W", (3, 2))
    program = sd.pipeline.gradient_program(sd.losses.mse(x @ W, y), [W])[0]
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(4, 3)), "y": rng.normal(size=(4, 2)), "W": rng.normal(size=(3, 2))}
    results = {}
    for name in ("numpy", "cpu"):
        runner = sd.backends.get(name).compile_program(program, "float64")
        out = runner.run(arrays, {}, 4)
        assert set(out) == set(program.outputs), name
        assert all(isinstance(v, np.ndarray) for v in out.values())
        results[name] = {k: np.array(v) for k, v in out.items()}
        assert runner.call([arrays[k] for k in program.externals], [], 4) == pytest.approx(float(out["loss"][0, 0]))
    for k in results["numpy"]:
        assert_close(results["cpu"][k], results["numpy"][k], 1e-12, what=k)


def test_check_rejects_broken_programs():
    from symdl.ir.kernels import Elementwise, Operand, Pattern, ProgramError, check
    from symdl.ir.lowering import lower

    x = sd.input("x", 2); W = sd.param("W", (2, 3))
    program = lower({"h": sd.tanh(x @ W)})
    check(program)
    program.kernels.insert(0, Elementwise("early", sd.graph.VARS[0], (Operand("t0", Pattern.SAME),)))
    program.buffers["early"] = (sd.n, 3)
    with pytest.raises(ProgramError, match="reads 't0' before anything writes it"):
        check(program)
    bad = lower({"h": sd.tanh(x @ W)})
    bad.kernels[-1].operands = (Operand("t0", Pattern.TRANSPOSE),)
    with pytest.raises(ProgramError, match="pattern needs"):
        check(bad)


# --------------------------------------------------------------------------- docs/extending.md, followed
# A new node type from this file alone: the mean of each row, (r, m) -> (r, 1).

from sympy.matrices.expressions import MatrixExpr  # noqa: E402

from symdl.autodiff.jvp import JVP  # noqa: E402
from symdl.autodiff.vjp import VJP  # noqa: E402
from symdl.graph.nodes import PRINT_RULES, Broadcast, Ops, Printable, elementwise  # noqa: E402
from symdl.ir.kernels import ReduceCols  # noqa: E402
from symdl.ir.lowering import LOWER  # noqa: E402


class RowMean(Printable, Ops, MatrixExpr):
    """``mean_j X_ij`` for each row: (r, m) -> (r, 1)."""

    def __new__(cls, x):
        return MatrixExpr.__new__(cls, x)

    @property
    def shape(self):
        return (self.args[0].shape[0], sp.Integer(1))

    def _entry(self, i, j, **kw):
        x = self.args[0]
        m = int(x.shape[1])
        return sum(x._entry(i, k, **kw) for k in range(m)) / m


@VJP.rule(RowMean)
def _vjp_row_mean(node, G):
    x = node.args[0]
    m = x.shape[1]
    return [(x, elementwise(lambda g: g / m, Broadcast(G, *x.shape)))]


@JVP.rule(RowMean)
def _jvp_row_mean(node, tan):
    dx = tan(node.args[0])
    return None if dx is None else RowMean(dx)  # linear: the node of the tangent


@LOWER.rule(RowMean)
def _lower_row_mean(lw, node):
    x = node.args[0]
    body, ops = lw.body_of(x)
    lw.emit(ReduceCols(lw.name(node), body / x.shape[1], ops, tuple(x.shape)), node.shape)


PRINT_RULES[RowMean] = lambda node, printer, latex: (
    r"\operatorname{rowmean}\left(" + printer._print(node.args[0]) + r"\right)" if latex
    else f"row_mean({printer._print(node.args[0])})")


def _row_mean_loss():
    x = sd.input("x", 4); W = sd.param("W", (4, 3)); y = sd.input("y", 1)
    loss = sd.losses.mse(RowMean(sd.tanh(x @ W)), y)
    return loss, W


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_extending_recipe_new_node_matches_finite_differences(backend):
    loss, W = _row_mean_loss()
    assert "row_mean(tanh(x*W))" in str(loss)
    assert "rowmean" in sd.latex(loss)
    f = sd.value_and_grad(loss, [W], backend=backend, dtype="float64")
    rng = np.random.default_rng(1)
    arrays = {"x": rng.normal(size=(5, 4)), "y": rng.normal(size=(5, 1)), "W": rng.normal(size=(4, 3))}
    fd = finite_difference(f, arrays, "W")
    assert_close(f(**arrays)[1]["W"], fd, 1e-6, what=f"d/dW on {backend}")
    x = arrays["x"] @ arrays["W"]
    assert f(**arrays)[0] == pytest.approx(np.mean((np.tanh(x).mean(1, keepdims=True) - arrays["y"]) ** 2))


def test_extending_recipe_new_node_has_forward_mode():
    """The recipe's JVP rule: explain_hvp (forward over reverse, through RowMean's tangent) equals
    sd.hvp (reverse over reverse, through its VJP twice) at a random point."""
    loss, W = _row_mean_loss()
    V = sd.param("V", (4, 3))
    explained = sd.explain_hvp(loss, [W], [V])
    assert "row_mean" in str(explained)
    out = sd.pipeline.compile_outputs({"e": explained.hvp[W], "h": sd.hvp(loss, [W], [V])[W]})
    rng = np.random.default_rng(2)
    arrays = {"x": rng.normal(size=(5, 4)), "y": rng.normal(size=(5, 1)), "W": rng.normal(size=(4, 3)),
              "V": rng.normal(size=(4, 3))}
    got = out.run(arrays, {}, 5)
    assert np.abs(got["h"]).max() > 1e-3
    assert_close(got["e"], got["h"], 1e-12, what="explain_hvp against hvp")
