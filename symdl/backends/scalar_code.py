"""Print kernel bodies as Python source: array code (NumPy) or scalar code (Numba CPU and CUDA).

The body of an ``Elementwise``/``Reduction``/``Update`` kernel is a SymPy expression over
the operand symbols ``v0, v1, ...``. Activations are first replaced by their stable
implementation (``impl``), then SymPy's CSE factors repeated subexpressions into
temporaries, then a printer writes each line.

``loop_body`` prints what one ``(i, j)`` iteration of a scalar loop does; the CPU and
CUDA backends share it and differ only in the loop around it.

>>> from symdl.graph.nodes import VARS
>>> from symdl.formulas.activations import Sigmoid
>>> lines, result = body_code(Sigmoid(VARS[0]) * (1 - Sigmoid(VARS[0])), ["a"], "scalar")
>>> lines, result
(['_c0 = 1/(1 + math.exp(-a))'], '_c0*(1 - _c0)')
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.pycode import PythonCodePrinter

from functools import singledispatch

from ..formulas.activations import expand_activations
from ..graph.nodes import INDEX_SYMBOLS, VARS
from ..ir.kernels import Elementwise, Pattern, Reduction, Update
from ..formulas.dropout import UniformHash
from .base import buf


def _print_uniform_hash(printer, e):
    """Dropout's draw calls the module's ``_uniform_hash`` helper (scalar and array code alike)."""
    return f"_uniform_hash({', '.join(printer._print(a) for a in e.args)})"


def _nested(printer, fn, args):
    out = printer._print(args[0])
    for a in args[1:]:
        out = f"{fn}({out}, {printer._print(a)})"
    return out


class ScalarPrinter(PythonCodePrinter):
    """Scalar code that both ``numba.njit`` and ``numba.cuda.jit`` compile (``math.*``, ternaries).

    NaN propagates as in NumPy (``numpy.maximum``, ``heaviside``, ``sign``): Python's
    ``max(0, nan)`` is 0, which would hide a NaN the reference backend shows.
    """

    def _print_Heaviside(self, e):
        at0 = e.args[1] if len(e.args) > 1 else sp.Rational(1, 2)
        x = self._print(e.args[0])
        return f"(1.0 if ({x}) > 0 else ({self._print(sp.Float(at0))} if ({x}) == 0 else (0.0 if ({x}) < 0 else ({x}))))"

    def _print_sign(self, e):
        x = self._print(e.args[0])
        return f"(1.0 if ({x}) > 0 else (-1.0 if ({x}) < 0 else ({x}) - ({x})))"  # 0 at ±0, NaN at NaN

    def _print_Max(self, e):
        return _nan_fold(self, ">", e.args)

    def _print_Min(self, e):
        return _nan_fold(self, "<", e.args)

    def _print_Abs(self, e):
        return f"abs({self._print(e.args[0])})"

    _print_UniformHash = _print_uniform_hash


def _nan_fold(printer, cmp, args):
    """``numpy.maximum``/``minimum`` as ternaries: ``a if a > b or a != a else b`` (NaN wins,
    and on ties the second operand, as NumPy does for ``±0``)."""
    out = printer._print(args[0])
    for arg in args[1:]:
        b = printer._print(arg)
        out = f"(({out}) if ({out}) {cmp} ({b}) or ({out}) != ({out}) else ({b}))"
    return out


class Float32ScalarPrinter(ScalarPrinter):
    """Scalar code for float32 CPU loops: ``tanh`` becomes the vectorisable ``_tanh32``."""

    def _print_tanh(self, e):
        return f"_tanh32({self._print(e.args[0])})"


#: Eigen's float32 tanh (the one XLA uses): a 13/6 rational fit, clamped at ±7.9053.
#: Max relative error 2.4e-7 (about 2 float32 ulps) against float64 tanh; LLVM vectorises
#: it, where a libm call (~10 ns each) does not vectorise. The coefficients (highest power
#: first) serve this Python helper and ``llvm_code``'s printed one.
TANH32_CLAMP, TANH32_TINY = 7.90531110763549805, 0.0004
TANH32_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
            1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH32_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def _horner(name: str, coefficients) -> list:
    first, second, *rest = coefficients
    return [f"{name} = x2 * {first!r} + {second!r}"] + [f"{name} = x2 * {name} + {c!r}" for c in rest]


TANH32 = "\n".join(
    ["", '@numba.njit(inline="always", error_model="numpy", cache=True)', "def _tanh32(x):"] + ["    " + line for line in [
        f"c = {TANH32_CLAMP!r}", "x = min(max(x, -c), c)", f"if abs(x) < {TANH32_TINY!r}:", "    return x", "x2 = x * x",
        *_horner("p", TANH32_P), "p = x * p", *_horner("q", TANH32_Q), "return p / q"]]) + "\n"


class ArrayPrinter(NumPyPrinter):
    """Vectorised NumPy code (the reference backend)."""

    def _print_Heaviside(self, e):
        at0 = e.args[1] if len(e.args) > 1 else sp.Rational(1, 2)
        x = self._print(e.args[0])
        return f"numpy.heaviside({x}, {self._print(sp.Float(at0))})"

    def _print_Max(self, e):
        return _nested(self, "numpy.maximum", e.args)

    def _print_Min(self, e):
        return _nested(self, "numpy.minimum", e.args)

    def _print_erf(self, e):
        return f"scipy.special.erf({self._print(e.args[0])})"

    _print_UniformHash = _print_uniform_hash


# --------------------------------------------------------------------------- the counter-based uniform
# ``stochastic.UniformHash(seed, t, key, i, j)``: murmur3's fmix32 chained over the five arguments
# (each modulo 2**32), times 2**-32. The scalar version (Numba CPU, CUDA, the simulator) works on
# int64: a product of two numbers below 2**32 may wrap, but its low 32 bits (all that is kept) are
# exact. The array version (NumPy) works on uint64, where such a product never overflows. Every
# backend therefore draws the same bits.

_MIX = ["h = h ^ ((({x}) & 0xFFFFFFFF) * 0x9E3779B9 & 0xFFFFFFFF)", "h = h ^ (h >> 16)",
        "h = (h * 0x85EBCA6B) & 0xFFFFFFFF", "h = h ^ (h >> 13)", "h = (h * 0xC2B2AE35) & 0xFFFFFFFF",
        "h = h ^ (h >> 16)"]


def uniform_hash_source(decorator: str) -> str:
    """The scalar ``_uniform_hash`` for a generated module, under ``decorator`` (njit or cuda device)."""
    lines = ["h = (int(seed) & 0xFFFFFFFF) ^ 0x6A09E667"]
    for x in ("int(t)", "int(key)", "int(i)", "int(j)"):
        lines += [m.format(x=x) for m in _MIX]
    return (f"\n{decorator}\ndef _uniform_hash(seed, t, key, i, j):\n"
            + "\n".join("    " + l for l in lines + ["return h * 2.3283064365386963e-10"]) + "\n")


UNIFORM_HASH_ARRAY = """
def _u32(x):
    return numpy.asarray(x).astype(numpy.int64).astype(numpy.uint64) & numpy.uint64(0xFFFFFFFF)


def _uniform_hash(seed, t, key, i, j):
    m = numpy.uint64(0xFFFFFFFF)
    h = _u32(seed) ^ numpy.uint64(0x6A09E667)
    for x in (t, key, i, j):
        h = h ^ ((_u32(x) * numpy.uint64(0x9E3779B9)) & m)
        h = h ^ (h >> numpy.uint64(16))
        h = (h * numpy.uint64(0x85EBCA6B)) & m
        h = h ^ (h >> numpy.uint64(13))
        h = (h * numpy.uint64(0xC2B2AE35)) & m
        h = h ^ (h >> numpy.uint64(16))
    return h * 2.3283064365386963e-10
"""


def uses_uniform_hash(program) -> bool:
    """Whether any kernel body of ``program`` draws from ``UniformHash`` (dropout)."""
    return any(sp.sympify(b).has(UniformHash) for k in program.kernels for b in k.bodies())


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
    body = expand_activations(sp.sympify(body), use_impl=True)
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
    viewed as vectors (``formulas.uniform`` kernels only).
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
