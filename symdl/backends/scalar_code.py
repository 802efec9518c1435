"""Print kernel bodies as Python source: array code (NumPy) or scalar code (Numba CPU and CUDA).

The body of an ``Elementwise``/``Reduction``/``Update`` kernel is a SymPy expression over
the operand symbols ``v0, v1, ...``. Activations are first replaced by their stable
implementation (``impl``), then SymPy's CSE factors repeated subexpressions into
temporaries, then a printer writes each line: every function as ``formulas.scalars``
renders it for the flavor (``array``, ``scalar``, ``scalar32``), ``Max``, ``sign``,
``Piecewise``... as their decomposition into that vocabulary's primitives (NumPy code prints
NumPy's own ``maximum``, ``sign``... instead: the reference does not share what it checks).

``loop_body`` prints what one ``(i, j)`` iteration of a scalar loop does; the CPU and
CUDA backends share it and differ only in the loop around it.

>>> from symdl.graph.nodes import VARS
>>> from symdl.formulas.activations import Sigmoid
>>> lines, result = body_code(Sigmoid(VARS[0]) * (1 - Sigmoid(VARS[0])), ["a"], "scalar")
>>> lines, result
(['_c0 = 1/(1 + math.exp(-a))'], '_c0*(1 - _c0)')
>>> body_code(sp.Max(VARS[0], VARS[1]), ["a", "b"], "scalar")[1]
'((a) if ((((a) != (a))) or ((a) > (b))) else (b))'
>>> body_code(sp.Max(VARS[0], VARS[1]), ["a", "b"], "array")[1]   # NumPy's own: the oracle
'numpy.maximum(a, b)'
"""
from __future__ import annotations

from functools import lru_cache, singledispatch

import sympy as sp
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.pycode import PythonCodePrinter

from ..formulas.activations import expand_activations
from ..formulas.scalars import NUMPY_NATIVE, SCALARS, decompose, helpers
from ..graph.nodes import INDEX_SYMBOLS, VARS
from ..ir.kernels import Elementwise, Pattern, Reduction, Update
from .base import buf


@lru_cache(maxsize=4096)
def prepared(body):
    """A body as backends evaluate it: each activation replaced by its stable implementation
    (a deep net's layers share their bodies: each is prepared once)."""
    return expand_activations(sp.sympify(body), use_impl=True)


class _TablePrinter:
    """Prints each function of ``formulas.scalars.SCALARS`` from its rendering for ``flavor``, and
    each ``DECOMPOSED`` one as its decomposition; arithmetic, numbers and symbols as SymPy's
    Python printers do."""

    flavor = None
    native = {}  # functions this flavor prints as its target's own, instead of decomposing them

    def _print(self, expr, **kwargs):
        own = self.native.get(type(expr))
        if own is not None:
            return own([self._print(a) for a in expr.args])
        primitives = decompose(expr)
        if primitives is not None:
            return self._print(primitives)
        entry = SCALARS.get(type(expr))
        if entry is None:
            return super()._print(expr, **kwargs)
        return entry.text(self.flavor)([self._print(a) for a in expr.args])


class ScalarPrinter(_TablePrinter, PythonCodePrinter):
    """Scalar code that both ``numba.njit`` and ``numba.cuda.jit`` compile (``math.*``, ternaries)."""

    flavor = "scalar"


class Float32ScalarPrinter(ScalarPrinter):
    """Scalar code for float32 CPU loops (``tanh`` is the vectorisable ``_tanh32`` helper)."""

    flavor = "scalar32"


class ArrayPrinter(_TablePrinter, NumPyPrinter):
    """Vectorised NumPy code (the reference backend): NumPy's own ``maximum``, ``heaviside``...
    (``formulas.scalars.NUMPY_NATIVE``), whose rules the other flavors' decomposition follows."""

    flavor = "array"
    native = NUMPY_NATIVE


def helper_source(program, flavor: str, decorator: str | None = None) -> str:
    """The definitions of the helpers (``formulas.scalars.Helper``) that ``program``'s bodies call
    in ``flavor``, each under ``decorator`` (a backend's njit or CUDA device decorator)."""
    bodies = [prepared(b) for k in program.kernels for b in k.bodies()]
    return "".join(h.define(decorator) + "\n" for h in helpers(bodies, flavor))


def uses_indices(body) -> bool:
    """Whether a body reads its loop indices ``(i, j)`` (array code must bind them)."""
    return bool(sp.sympify(body).free_symbols & INDEX_SYMBOLS)


PRINTERS = {"array": ArrayPrinter, "scalar": ScalarPrinter, "scalar32": Float32ScalarPrinter}

#: How scalar-loop code (CPU and CUDA) reads an operand at ``(i, j)`` for each pattern.
INDEX = {Pattern.SAME: "[i, j]", Pattern.ROW: "[0, j]", Pattern.COL: "[i, 0]", Pattern.SCALAR: "[0, 0]",
         Pattern.TRANSPOSE: "[j, i]"}


def operand_reads(operands, flat: bool = False) -> list:
    """``v0 = b_x[i, j]``-style lines for a kernel's operands (``b_x[i]`` in a flat loop, where
    every operand has the output's shape and is viewed as one vector)."""
    return [f"v{i} = {buf(o.buffer)}{'[i]' if flat else INDEX[o.pattern]}" for i, o in enumerate(operands)]


def operand_names(operands) -> list:
    return [f"v{i}" for i in range(len(operands))]


def dims(shape) -> tuple:
    """A symbolic shape as Python expressions (``n`` stays a name)."""
    return tuple(sp.pycode(sp.sympify(d)) for d in shape)


def body_code(body, names, flavor: str, *, temp_prefix: str = "_c"):
    """``(lines, result)``: assignments of CSE temporaries, then the result expression."""
    body = prepared(body)
    named = {VARS[i]: sp.Symbol(nm, real=True) for i, nm in enumerate(names)}
    body = body.xreplace(named)
    temps, (reduced,) = sp.cse(body, symbols=sp.numbered_symbols(temp_prefix, real=True), optimizations=None)
    printer = PRINTERS[flavor]({"fully_qualified_modules": True, "inline": True, "allow_unknown_functions": False})
    lines = [f"{s} = {printer.doprint(e)}" for s, e in temps]
    return lines, printer.doprint(reduced)


def lets_code(lets, names, flavor: str) -> list:
    """An ``Update``'s lets in order, each CSE'd on its own: ``_u0 = ...``."""
    lines = []
    for sym, body in lets:
        pre, result = body_code(body, names, flavor, temp_prefix=f"_c{sym}_")
        lines += pre + [f"{sym} = {result}"]
    return lines


@singledispatch
def loop_body(kernel, flavor: str, flat: bool = False) -> tuple:
    """``(lines, result)`` for one ``(i, j)`` iteration: operand reads, then the body.

    Elementwise and Update kernels store their results (``result`` is None); a
    Reduction returns the value to accumulate. ``flat``: one index ``i`` over buffers
    viewed as vectors (``formulas.runs_flat`` kernels only).
    """
    raise NotImplementedError(f"no scalar loop body for {type(kernel).__name__}")


@loop_body.register
def _(k: Elementwise, flavor, flat=False):
    lines, result = body_code(k.body, operand_names(k.operands), flavor)
    at = "[i]" if flat else "[i, j]"
    return operand_reads(k.operands, flat) + lines + [f"{buf(k.out)}{at} = {result}"], None


@loop_body.register
def _(k: Update, flavor, flat=False):
    lines = lets_code(k.lets, operand_names(k.operands), flavor)
    at = "[i]" if flat else "[i, j]"
    return operand_reads(k.operands, flat) + lines + [f"{buf(b)}{at} = {s}" for b, s in k.writes], None


@loop_body.register
def _(k: Reduction, flavor, flat=False):
    lines, result = body_code(k.body, operand_names(k.operands), flavor)
    return operand_reads(k.operands) + lines, result
