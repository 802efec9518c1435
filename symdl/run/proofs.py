"""Proofs a user can run: symdl's matrix chain rule against SymPy's scalar calculus.

``prove(loss, params)`` makes the shapes concrete and tiny (the batch size ``n`` becomes a
small integer), expands the loss into one scalar formula of every weight entry, lets SymPy
differentiate it by each scalar weight, and compares that with symdl's matrix gradient
entry by entry: *symbolically* (the difference simplifies to 0) where SymPy's
simplification gets there, else at exact random rational points evaluated to 50 digits (and
the report says which). Before that it checks every elementwise node's local derivative
(the one the chain rule uses, possibly a user-supplied one) against ``sp.diff`` of its
formula, so a wrong derivative is reported with the node that uses it.

Conventions shared with the backends: ``Heaviside(0) = 0`` (``relu′(0) = 0``, as PyTorch),
and ``DiracDelta`` (a step's derivative) is 0 almost everywhere.

``check_grad(loss, params, arrays)`` is the numerical counterpart (like
``torch.autograd.gradcheck``): central finite differences in float64.

>>> import symdl as sd
>>> x = sd.input("x", 2); y = sd.input("y", 1)
>>> W = sd.param("W", (2, 1)); b = sd.param("b", 1)
>>> print(sd.prove(sd.losses.mse(sd.tanh(x @ W + b), y), [W, b]))
proved symbolically on shapes n=2 for W (2, 1), b (1,): all 3 entries equal SymPy's scalar derivatives
"""
from __future__ import annotations

import random

import numpy as np
import sympy as sp

from ..autodiff.vjp import grad, scalar_derivative
from ..formulas.activations import expand_activations, heaviside_at_zero
from ..graph.nodes import VARS, Input, Map, Param, leaves, n as N, topological
from ..registry import rich_display
from .pipeline import value_and_grad

#: Above this many operations an entry's difference goes to random points, not ``simplify``.
SIMPLIFY_LIMIT = 60


def _reference(expr):
    """The formula as the reference differentiates it: activations expanded, steps at 0 = 0."""
    return heaviside_at_zero(expand_activations(expr, use_impl=False))


def _zero(d):
    d = heaviside_at_zero(d)
    if d.has(sp.DiracDelta):
        d = d.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
    return d


def _is_zero_symbolically(d) -> bool:
    if d == 0:
        return True
    try:
        d = sp.expand(d)
        if d == 0:
            return True
        return sp.count_ops(d) <= SIMPLIFY_LIMIT and sp.simplify(d) == 0
    except Exception:  # noqa: BLE001 - a simplification SymPy cannot do is not a failure
        return False


def _at_random_points(d, symbols, points: int, rng) -> float:
    """The largest ``|d|`` at ``points`` random rational points (50 significant digits)."""
    worst = 0.0
    symbols = sorted(symbols, key=str)
    d = d.xreplace({f: sp.Rational(f) for f in d.atoms(sp.Float)})  # a float constant, exactly
    for _ in range(points):
        at = {s: sp.Rational(rng.randint(-200, 200), rng.randint(50, 150)) for s in symbols}
        v = sp.N(d.xreplace(at), 50)
        if not v.is_number or v.has(sp.nan, sp.zoo):
            return float("nan")
        worst = max(worst, abs(complex(v)))
    return worst


class Proof:
    """What ``prove`` found: ``bool(proof)``, ``proof.method``, ``proof.differences``.

    ``symbolic`` entries had a difference that simplified to 0; ``by_points`` entries (where
    simplification stalled) were equal at exact random rational points, to 50 digits.
    """

    def _repr_mimebundle_(self, include=None, exclude=None):  # a notebook's display (symdl.show)
        return rich_display(self, include, exclude)

    def __init__(self, params, n_value, symbolic, by_points, points, differences):
        self.params, self.n_value = params, n_value
        self.symbolic, self.by_points, self.points, self.differences = symbolic, by_points, points, differences

    @property
    def entries(self) -> int:
        return self.symbolic + self.by_points

    @property
    def method(self) -> str:
        return "symbolic" if not self.by_points else f"symbolic and {self.points} exact random rational points"

    @property
    def proved(self) -> bool:
        return not self.differences

    def __bool__(self):
        return self.proved

    def __str__(self):
        shapes = ", ".join(f"{p.name} {_value_shape(p)}" for p in self.params)
        if self.proved:
            if not self.by_points:
                return (f"proved symbolically on shapes n={self.n_value} for {shapes}: all {self.entries} entries "
                        "equal SymPy's scalar derivatives")
            return (f"proved on shapes n={self.n_value} for {shapes}: {self.symbolic} of {self.entries} entries "
                    f"symbolically; the other {self.by_points} (simplification stalled) equal at {self.points} exact "
                    "random rational points, to 50 digits")
        where, diff = self.differences[0]
        k = len(self.differences) - 1
        more = f" ({k} more difference{'s' if k > 1 else ''})" if k else ""
        return f"NOT proved on shapes n={self.n_value}: {where} differs by {diff}{more}"

    __repr__ = __str__


def _value_shape(p):
    if isinstance(p, Param):
        s = p.value_shape
        return "(" + ", ".join(map(str, s)) + (",)" if len(s) == 1 else ")")
    return "(" + ", ".join(map(str, p.shape)) + ")"


def _local_differences(loss) -> list:
    """Each elementwise node's derivative (as the chain rule takes it) against ``sp.diff``."""
    out, seen = [], set()
    for node in topological([loss]):
        if not isinstance(node, Map):
            continue
        body = node.lam.expr
        for v in node.lam.variables:
            key = (body, v)
            if key in seen:
                continue
            seen.add(key)
            mine = _reference(scalar_derivative(body, v))
            ref = _zero(sp.diff(expand_activations(body, use_impl=False), v))
            d = sp.simplify(mine - ref)
            if d != 0:
                what = str(node) if len(str(node)) <= 80 else str(node)[:77] + "..."
                k = len(node.lam.variables)
                vars_ = {VARS[0]: sp.Symbol("t")} if k == 1 else {w: sp.Symbol(f"t{i}") for i, w in enumerate(VARS[:k])}
                operand = node.operands[node.lam.variables.index(v)]
                out.append((f"the derivative of node {what} with respect to {operand} (used: "
                            f"{sp.sstr(mine.xreplace(vars_))}, sp.diff: {sp.sstr(ref.xreplace(vars_))})",
                            d.xreplace(vars_)))
    return out


def prove(loss, params, sizes=None, *, points: int = 3, seed: int = 0) -> Proof:
    """Prove symdl's gradient of ``loss`` equal to SymPy's scalar derivatives on tiny shapes.

    ``sizes`` maps the batch symbol (``sd.n`` or ``"n"``) to the integer used (default 2).
    Returns a ``Proof``: truthy when every entry agrees; its text says how (symbolically, or
    at ``points`` exact random rational points where simplification stalls) or names the
    first node whose derivative differs and the difference.

    >>> import sympy as sp, symdl as sd
    >>> x = sd.input("x", 1); W = sd.param("W", (1, 1))
    >>> bad = sd.activation("cube_bad", lambda t: t**3, derivative=lambda t: 2 * t**2)
    >>> print(sd.prove(sd.total(bad(x @ W)), [W]))
    NOT proved on shapes n=2: the derivative of node cube_bad(x*W) with respect to x*W (used: 2*t**2, sp.diff: 3*t**2) differs by -t**2
    """
    params = list(params)
    for p in params:
        if not isinstance(p, (Param, Input)):
            raise TypeError(f"prove: parameters (sd.param) or inputs (sd.input), got {p!r}")
    sizes = dict(sizes or {})
    n_value = int(sizes.pop(N, sizes.pop("n", 2)))
    if sizes:
        raise ValueError(f"prove: unknown size(s) {list(sizes)}; only the batch size n is symbolic")
    differences = _local_differences(loss)

    concrete = loss.xreplace({N: n_value})
    entries = {}
    for leaf in leaves(concrete):
        for i in range(int(leaf.shape[0])):
            for j in range(int(leaf.shape[1])):
                entries[leaf[i, j]] = sp.Symbol(f"{leaf.name}_{i}_{j}", real=True)
    # Activations stay opaque here (SymPy differentiates them through ``fdiff``, the
    # derivative symdl uses); the local check above proved each of those equal to
    # ``sp.diff`` of the formula. What this compares is the matrix chain rule itself.
    scalar = heaviside_at_zero(concrete.as_explicit()[0, 0]).xreplace(entries)
    gradients = grad(loss, params)
    symbolic, by_points, rng = 0, 0, random.Random(seed)
    for p in params:
        mine = heaviside_at_zero(gradients[p].xreplace({N: n_value}).as_explicit()).xreplace(entries)
        cp = p.xreplace({N: n_value})
        for i in range(int(cp.shape[0])):
            for j in range(int(cp.shape[1])):
                ref = _zero(sp.diff(scalar, entries[cp[i, j]]))
                d = _zero(ref - mine[i, j])
                if _is_zero_symbolically(d):
                    symbolic += 1
                    continue
                by_points += 1
                d, ref = _reference(d), _reference(ref)
                worst = _at_random_points(d, d.free_symbols, points, rng)
                if not worst <= 1e-30 * max(1.0, _scale(ref, ref.free_symbols, rng)):
                    text = sp.sstr(d) if len(sp.sstr(d)) <= 120 else f"{worst:.3g} at a random rational point"
                    differences.append((f"∂L/∂{p.name}[{i}, {j}] (symdl's minus SymPy's)", text))
    return Proof(params, n_value, symbolic, by_points, points, differences)


def _scale(expr, symbols, rng) -> float:
    v = _at_random_points(expr, symbols, 1, rng)
    return v if np.isfinite(v) else 1.0


class GradCheck(dict):
    """``{param name: max relative error}`` from ``check_grad``; ``passed`` against its tolerance."""

    def _repr_mimebundle_(self, include=None, exclude=None):  # a notebook's display (symdl.show)
        return rich_display(self, include, exclude)

    def _repr_pretty_(self, p, cycle):  # IPython's text view: the verdict, not the dict
        p.text(str(self))

    def __init__(self, errors, tol):
        super().__init__(errors)
        self.tol = tol

    @property
    def passed(self) -> bool:
        return all(e <= self.tol for e in self.values())

    def __str__(self):
        rows = [f"  {k}: {e:.2e}" + ("" if e <= self.tol else "  <-- exceeds tol") for k, e in self.items()]
        head = "gradient check " + ("passed" if self.passed else "FAILED") + f" (tol {self.tol:.0e}, max relative error)"
        return "\n".join([head] + rows)


def check_grad(loss, params, arrays, *, eps: float = 1e-6, tol: float = 1e-5) -> GradCheck:
    """Central finite differences in float64 against symdl's gradient, per parameter.

    The error of a parameter is ``max |g − fd| / max(max |fd|, 1)``: the largest entry's
    difference relative to the gradient's scale (as ``torch.autograd.gradcheck``'s
    ``atol + rtol·|fd|`` with ``atol = rtol``). Returns a ``GradCheck`` (a dict).

    >>> import numpy as np, symdl as sd
    >>> x = sd.input("x", 2); W = sd.param("W", (2, 1))
    >>> rng = np.random.default_rng(0)
    >>> arrays = {"x": rng.normal(size=(4, 2)), "W": rng.normal(size=(2, 1))}
    >>> r = sd.check_grad(sd.total(sd.tanh(x @ W)), [W], arrays)
    >>> r.passed, r["W"] < 1e-8
    (True, True)
    """
    params = list(params)
    f = value_and_grad(loss, params, backend="numpy", dtype="float64")
    base = {k: np.array(v, dtype=np.float64) for k, v in arrays.items()}
    _, grads = f(**base)
    errors = {}
    for p in params:
        name = str(p.name)
        x = base[name]
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + eps
            up = f(**base)[0]
            x[idx] = old - eps
            down = f(**base)[0]
            x[idx] = old
            fd[idx] = (up - down) / (2 * eps)
        g = grads[name]
        errors[name] = float(np.max(np.abs(g - fd)) / max(float(np.max(np.abs(fd))), 1.0)) if fd.size else 0.0
    return GradCheck(errors, tol)
