"""The scalar vocabulary: every function a kernel body may call, and how each backend says it.

A kernel body is a SymPy expression over its operands. As a backend prints one,
``decompose`` rewrites the functions whose NaN, ±0 and tie rules differ between targets
(``Heaviside``, ``sign``, ``Max``, ``Min``, ``Piecewise``) into three primitives: comparisons
(SymPy's, ordered: false when a NaN is compared, except ``!=``), ``IsNaN`` and
``Select(condition, a, b)``. NumPy's rules are written once, here, in those primitives:

* ``max(a, b)`` is ``a`` where ``a > b`` or ``a`` is NaN, else ``b``: NaN wins, and on a tie
  (``±0``) the second operand, as ``numpy.maximum`` (``min`` likewise);
* ``heaviside(x, h)`` is 1 above 0, 0 below, NaN at NaN, ``h`` at ``±0``;
* ``sign(x)`` is ±1, NaN at NaN, 0 at ``±0``;
* a ``Piecewise`` is a chain of selects, NaN where no condition holds (``numpy.select``).

``Abs`` stays a function: every target has it as one operation (``abs``, LLVM's ``fabs``) with
the same rules (``|-0| = +0``, NaN kept), which a select on the sign would not give.

``SCALARS`` is the one table from each function (and primitive) to its renderings: NumPy
text (the reference backend), scalar Python text (Numba CPU loops and ``numba.cuda``), the
float32 CPU loops' text where it differs, and an LLVM builder (``backends.cpu.llvm_code``;
None leaves the formula to Numba). A text is a function of the printed arguments; a
``Helper`` is such a function that a generated module must define (dropout's hash, the
float32 ``tanh``): its source is declared once and ``helpers`` tells a backend which of them a
program's bodies call. A new scalar function is one ``define`` call.

>>> x, y = sp.symbols("x y", real=True)
>>> decompose(sp.Max(x, y))
Select(IsNaN(x) | (x > y), x, y)
>>> SCALARS[sp.exp].scalar(["x"]), SCALARS[sp.exp].array(["x"])
('math.exp(x)', 'numpy.exp(x)')
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import sympy as sp
from sympy.core.logic import fuzzy_and
from sympy.codegen.cfunctions import expm1, log1p
from sympy.logic.boolalg import BooleanFunction

from .dropout import UniformHash


class Select(sp.Function):
    """``a`` where ``condition`` holds, else ``b`` (``numpy.where``, a ternary, LLVM's ``select``)."""

    nargs = 3

    @classmethod
    def eval(cls, condition, a, b):
        if condition is sp.true:
            return a
        if condition is sp.false:
            return b

    def _eval_is_extended_real(self):
        return fuzzy_and(branch.is_extended_real for branch in self.args[1:])


class IsNaN(BooleanFunction):
    """Whether ``x`` is NaN (a number never is: SymPy's ``nan`` does not reach a body)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_number:
            return sp.false


# --------------------------------------------------------------------------- the decomposition


def _nan_fold(compare, args):
    """``numpy.maximum``/``minimum`` over ``args``, left to right."""
    out = args[0]
    for b in args[1:]:
        out = Select(sp.Or(compare(out, b), IsNaN(out)), out, b)
    return out


def _zero_or_nan(x, at_zero):
    """Where ``x`` is neither above nor below 0: NaN stays NaN, ``±0`` gives ``at_zero``."""
    return Select(IsNaN(x), x, at_zero)


def _heaviside(x, at_zero=sp.S.Half):
    return Select(x > 0, sp.Float(1), Select(x < 0, sp.Float(0), _zero_or_nan(x, sp.Float(at_zero))))


def _sign(x):
    return Select(x > 0, sp.Float(1), Select(x < 0, sp.Float(-1), _zero_or_nan(x, sp.Float(0))))


def _piecewise(*pieces):
    out = sp.nan
    for value, condition in reversed(pieces):
        out = value if condition is sp.true else Select(condition, value, out)
    return out


#: Each decomposed function and its rewrite into the primitives (of its arguments).
DECOMPOSED = {
    sp.Max: lambda *args: _nan_fold(sp.StrictGreaterThan, args),
    sp.Min: lambda *args: _nan_fold(sp.StrictLessThan, args),
    sp.Heaviside: _heaviside,
    sp.sign: _sign,
    sp.Piecewise: lambda *pairs: _piecewise(*(pair.args for pair in pairs)),
}


def decompose(e):
    """``e``, a call of a ``DECOMPOSED`` function, as ``Select``, comparisons and ``IsNaN`` of its
    arguments (else None). Printers rewrite each such node as they meet it, so a body's term
    order and common subexpressions stay those of the body as written (and so do its numbers);
    the arguments are rewritten when the printer reaches them.

    >>> x = sp.Symbol("x", real=True)
    >>> decompose(sp.sign(x))
    Select(x > 0, 1.0, Select(x < 0, -1.0, Select(IsNaN(x), x, 0.0)))
    """
    rule = DECOMPOSED.get(type(e))
    return None if rule is None else rule(*e.args)


# --------------------------------------------------------------------------- renderings


def call(name: str):
    """Text ``name(a, b, ...)``."""
    return lambda args: f"{name}({', '.join(args)})"


def template(text: str):
    """Text from a template over the printed arguments ``{0}, {1}, ...``."""
    return lambda args: text.format(*args)


def infix(op: str):
    """Text ``(a) op (b) op ...``."""
    return lambda args: f" {op} ".join(f"({a})" for a in args)


def _nested_text(name, args):
    out = args[0]
    for a in args[1:]:
        out = f"{name}({out}, {a})"
    return out


def nested(name: str):
    """Text ``name(name(a, b), c)``: a binary function folded over the arguments."""
    return lambda args: _nested_text(name, args)


#: NumPy's own function for each decomposed one whose rules the decomposition reproduces. The
#: reference backend prints these, so the oracle the compiled backends are checked against does
#: not share the decomposition it checks (tests/test_scalars.py holds the two equal, bit for bit).
NUMPY_NATIVE = {
    sp.Max: nested("numpy.maximum"),
    sp.Min: nested("numpy.minimum"),
    sp.Heaviside: lambda args: f"numpy.heaviside({', '.join(args)})",
    sp.sign: lambda args: f"numpy.sign({args[0]})",
}


@dataclass(frozen=True)
class Helper:
    """A function a generated module defines when one of its bodies calls it: rendered as a
    call to ``name``; ``source`` is its definition (a backend puts its decorator above it)."""

    name: str
    source: str

    def __call__(self, args) -> str:
        return f"{self.name}({', '.join(args)})"

    def define(self, decorator: str | None) -> str:
        return ("\n" + decorator if decorator else "") + "\n" + self.source


@dataclass(frozen=True)
class Scalar:
    """One function's renderings: NumPy text, scalar text (float32 CPU loops may differ) and
    an LLVM builder ``(printer, *argument values) -> value`` (``llvm_code.Body``)."""

    array: Callable
    scalar: Callable
    llvm: Callable | None
    scalar32: Callable | None = None

    def text(self, flavor: str) -> Callable:
        """The text rendering for ``flavor`` (``array``, ``scalar`` or ``scalar32``)."""
        if flavor == "scalar32" and self.scalar32 is not None:
            return self.scalar32
        return self.array if flavor == "array" else self.scalar


#: Each function (SymPy class) a printed body may call, and its renderings.
SCALARS: dict = {}


def define(function, *, array, scalar, llvm=None, scalar32=None) -> None:
    """Add a scalar function to the vocabulary: every backend then prints it, and an activation
    may use it. ``array``/``scalar``/``scalar32``: NumPy's, Numba's and float32 CPU loops' text
    (a ``call`` name, a ``template``, a ``Helper``, or any function of the printed arguments);
    ``llvm``: its LLVM builder, or None to leave those formulas to Numba.

    >>> class cube(sp.Function):
    ...     def fdiff(self, argindex=1):
    ...         return 3 * self.args[0] ** 2
    >>> define(cube, array=template("({0})**3"), scalar=template("({0})**3"),
    ...        llvm=lambda p, x: p.b.fmul(x, p.b.fmul(x, x)))
    >>> SCALARS[cube].scalar(["v"])
    '(v)**3'
    >>> del SCALARS[cube]
    """
    SCALARS[function] = Scalar(_text(array), _text(scalar), llvm, _text(scalar32) if scalar32 else None)


def _text(rendering):
    return call(rendering) if isinstance(rendering, str) else rendering


def printable(function) -> bool:
    """Whether every backend prints ``function`` (a SymPy class): a table entry or decomposed."""
    return function in SCALARS or function in DECOMPOSED


def helpers(exprs, flavor: str) -> list:
    """The helpers ``exprs`` call in ``flavor``, each once, by name (``DECOMPOSED`` functions
    call none)."""
    used = {type(f) for e in exprs for f in sp.sympify(e).atoms(sp.Function)}
    found = {r.name: r for r in (SCALARS[c].text(flavor) for c in used if c in SCALARS) if isinstance(r, Helper)}
    return [found[name] for name in sorted(found)]


# --------------------------------------------------------------------------- LLVM builders


def intrinsic(name: str):
    """LLVM's ``llvm.<name>.f32/f64`` on the arguments."""
    return lambda p, *args: p.intrinsic(name, list(args))


def libm(name: str):
    """The C library's ``name`` (``namef`` in float32), as Numba's ``math`` calls it."""
    return lambda p, x: p.libm(name, x)


def compare(op: str):
    """An ordered comparison (false with a NaN), unordered for ``!=`` (true with a NaN), as Python."""
    return lambda p, a, b: p.compare(op, a, b)


def _fold_bool(op: str):
    def build(p, *conditions):
        out = conditions[0]
        for c in conditions[1:]:
            out = getattr(p.b, op)(out, c)
        return out

    return build


# --------------------------------------------------------------------------- helpers


#: Eigen's float32 tanh (the one XLA uses): a 13/6 rational fit, clamped at ±7.9053. Max
#: relative error 2.4e-7 (about 2 float32 ulps) against float64 tanh; LLVM vectorises it, where
#: a libm call (~10 ns each) does not. The coefficients (highest power first) serve the Python
#: helper and the LLVM builder alike.
TANH32_CLAMP, TANH32_TINY = 7.90531110763549805, 0.0004
TANH32_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
            1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH32_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def _horner(name: str, coefficients) -> list:
    first, second, *rest = coefficients
    return [f"{name} = x2 * {first!r} + {second!r}"] + [f"{name} = x2 * {name} + {c!r}" for c in rest]


TANH32 = Helper("_tanh32", "\n".join(["def _tanh32(x):"] + ["    " + line for line in [
    f"c = {TANH32_CLAMP!r}", "x = min(max(x, -c), c)", f"if abs(x) < {TANH32_TINY!r}:", "    return x", "x2 = x * x",
    *_horner("p", TANH32_P), "p = x * p", *_horner("q", TANH32_Q), "return p / q"]]) + "\n")


def _tanh32_llvm(p, x):
    """``TANH32`` as LLVM IR (NaN kept: it compares false and passes the clamps)."""
    b, c, neg = p.b, p.const(TANH32_CLAMP, x.type), p.const(-TANH32_CLAMP, x.type)
    y = b.select(b.fcmp_ordered("<", x, neg), neg, x)
    y = b.select(b.fcmp_ordered(">", y, c), c, y)
    y2 = b.fmul(y, y)

    def horner(coefficients):
        out = p.const(coefficients[0], x.type)
        for coefficient in coefficients[1:]:
            out = b.fadd(b.fmul(y2, out), p.const(coefficient, x.type))
        return out

    small = b.fcmp_ordered("<", p.intrinsic("fabs", [y]), p.const(TANH32_TINY, x.type))
    return b.select(small, y, b.fdiv(b.fmul(y, horner(TANH32_P)), horner(TANH32_Q)))


def _tanh_llvm(p, x):
    return _tanh32_llvm(p, x) if p.is_float32(x) else p.libm("tanh", x)


# float32 ``exp`` and ``erf`` as arithmetic, so LLVM vectorises the loops that call them (a libm call
# per entry is scalar: a GELU′ loop spent ~15 ns an entry in ``erff`` and ``expf``). ``exp``: Cephes's
# ``expf`` (``x = n·ln2 + r``, a degree-6 polynomial in ``r``, then ``2^n`` as two exponent-bit scalings
# so no ``n`` in ``[-126, 128]`` leaves the exponent range): 8e-8 relative error at most (under one
# float32 ulp), overflow to inf above 88.72, NaN kept, and 0 below ln(FLT_MIN) = -87.34, where float32's
# own exp is subnormal (< 1.2e-38): a product with a subnormal result costs a microcode assist on x86
# (an exp loop ran 3-4x slower on this AMD Zen machine when its inputs were a causal softmax's masked
# scores), so none is ever computed: the input is clamped to -87.34 and the result set to 0 below it. ``erf``: Eigen's
# rational approximation on ``(-4, 4)``, ±1 exactly beyond (as float32's erf): 4.2e-7 absolute error at most.
# float64 loops keep the C library's.
EXP32_RANGE = (-87.33654, 88.8)  # ln(FLT_MIN): the smallest normal result; overflow
EXP32_LOG2E, EXP32_C1, EXP32_C2 = 1.44269504088896341, 0.693359375, -2.12194440e-4
EXP32_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
ERF32_CLAMP = 4.0
ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
           -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
           -1.42647390514189e-02)


def _horner_in(name: str, var: str, coefficients) -> list:
    first, second, *rest = coefficients
    return [f"{name} = {var} * {first!r} + {second!r}"] + [f"{name} = {var} * {name} + {c!r}" for c in rest]


EXP32 = Helper("_exp32", "\n".join(["def _exp32(x):"] + ["    " + line for line in [
    "if x != x:", "    return x", f"if x < {EXP32_RANGE[0]!r}:", "    return 0.0", f"x = min(x, {EXP32_RANGE[1]!r})",
    f"fx = math.floor(x * {EXP32_LOG2E!r} + 0.5)", f"r = x - fx * {EXP32_C1!r} - fx * {EXP32_C2!r}",
    *_horner_in("y", "r", EXP32_P), "y = y * r * r + r + 1.0", "k = int(fx)", "h = k >> 1",
    "return y * 2.0 ** h * 2.0 ** (k - h)"]]) + "\n")

ERF32 = Helper("_erf32", "\n".join(["def _erf32(x):"] + ["    " + line for line in [
    f"if x >= {ERF32_CLAMP!r}:", "    return 1.0", f"if x <= {-ERF32_CLAMP!r}:", "    return -1.0", "x2 = x * x", *_horner("p", ERF32_P), "p = x * p",
    *_horner("q", ERF32_Q), "return p / q"]]) + "\n")


def _polynomial(p, variable, coefficients):
    b, out = p.b, p.const(coefficients[0], variable.type)
    for coefficient in coefficients[1:]:
        out = b.fadd(b.fmul(variable, out), p.const(coefficient, variable.type))
    return out


def _exp_llvm(p, x):
    """``EXP32`` as LLVM IR for a float32 value (NaN kept: the clamps compare false, and ``n`` is read
    as 0 there so no conversion sees a NaN; 0 below ``EXP32_RANGE[0]``, so every product is normal);
    float64 the intrinsic (the C library's)."""
    if not p.is_float32(x):
        return p.intrinsic("exp", [x])
    from llvmlite import ir  # the LLVM printer's own library: imported only when it prints

    b, t = p.b, x.type
    lo, hi = p.const(EXP32_RANGE[0], t), p.const(EXP32_RANGE[1], t)
    y = b.select(b.fcmp_ordered("<", x, lo), lo, x)
    y = b.select(b.fcmp_ordered(">", y, hi), hi, y)
    nan = b.fcmp_unordered("uno", x, x)
    fx = p.intrinsic("floor", [b.fadd(b.fmul(y, p.const(EXP32_LOG2E, t)), p.const(0.5, t))])
    fx = b.select(nan, p.const(0.0, t), fx)
    r = b.fsub(b.fsub(y, b.fmul(fx, p.const(EXP32_C1, t))), b.fmul(fx, p.const(EXP32_C2, t)))
    poly = b.fadd(b.fadd(b.fmul(b.fmul(_polynomial(p, r, EXP32_P), r), r), r), p.const(1.0, t))
    i32 = ir.IntType(32)
    k = b.fptosi(fx, i32)
    half = b.ashr(k, ir.Constant(i32, 1))

    def power(e):  # 2**e for e in [-126, 127]: its exponent bits
        return b.bitcast(b.shl(b.add(e, ir.Constant(i32, 127)), ir.Constant(i32, 23)), t)

    out = b.fmul(b.fmul(poly, power(half)), power(b.sub(k, half)))
    out = b.select(b.fcmp_ordered("<", x, lo), p.const(0.0, t), out)  # below ln(FLT_MIN): 0, never a subnormal
    return b.select(nan, x, out)


def _erf_llvm(p, x):
    """``ERF32`` as LLVM IR for a float32 value (NaN kept through the clamps); float64 the C library's."""
    if not p.is_float32(x):
        return p.libm("erf", x)
    b, t = p.b, x.type
    c, neg = p.const(ERF32_CLAMP, t), p.const(-ERF32_CLAMP, t)
    y = b.select(b.fcmp_ordered("<", x, neg), neg, x)
    y = b.select(b.fcmp_ordered(">", y, c), c, y)
    y2 = b.fmul(y, y)
    out = b.fdiv(b.fmul(y, _polynomial(p, y2, ERF32_P)), _polynomial(p, y2, ERF32_Q))
    out = b.select(b.fcmp_ordered(">=", x, c), p.const(1.0, t), out)  # ±1 exactly from ±4 on
    return b.select(b.fcmp_ordered("<=", x, neg), p.const(-1.0, t), out)


# ``UniformHash(seed, t, key, i, j)`` (``formulas.dropout``): murmur3's fmix32 chained over the
# five arguments (each modulo 2**32), times 2**-32. The scalar version (Numba CPU, CUDA, the
# simulator) works on int64: a product of two numbers below 2**32 may wrap, but its low 32 bits
# (all that is kept) are exact. The array version (NumPy) works on uint64, where such a product
# never overflows. Every backend therefore draws the same bits.

_MIX = ["h = h ^ ((({x}) & 0xFFFFFFFF) * 0x9E3779B9 & 0xFFFFFFFF)", "h = h ^ (h >> 16)",
        "h = (h * 0x85EBCA6B) & 0xFFFFFFFF", "h = h ^ (h >> 13)", "h = (h * 0xC2B2AE35) & 0xFFFFFFFF",
        "h = h ^ (h >> 16)"]

UNIFORM_HASH = Helper("_uniform_hash", "def _uniform_hash(seed, t, key, i, j):\n" + "\n".join(
    "    " + line for line in ["h = (int(seed) & 0xFFFFFFFF) ^ 0x6A09E667"]
    + [m.format(x=x) for x in ("int(t)", "int(key)", "int(i)", "int(j)") for m in _MIX]
    + ["return h * 2.3283064365386963e-10"]) + "\n")

UNIFORM_HASH_ARRAY = Helper("_uniform_hash", """def _u32(x):
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
""")


# --------------------------------------------------------------------------- the table

#: The primitives the NaN rules are written in.
define(Select, array=call("numpy.where"), scalar=template("(({1}) if ({0}) else ({2}))"),
       llvm=lambda p, condition, a, b: p.select(condition, a, b))
define(IsNaN, array=call("numpy.isnan"), scalar=template("(({0}) != ({0}))"),
       llvm=lambda p, x: p.b.fcmp_unordered("uno", x, x))
for _relation, _op in ((sp.StrictGreaterThan, ">"), (sp.StrictLessThan, "<"), (sp.GreaterThan, ">="),
                       (sp.LessThan, "<="), (sp.Equality, "=="), (sp.Unequality, "!=")):
    define(_relation, array=infix(_op), scalar=infix(_op), llvm=compare(_op))
define(sp.And, array=nested("numpy.logical_and"), scalar=infix("and"), llvm=_fold_bool("and_"))
define(sp.Or, array=nested("numpy.logical_or"), scalar=infix("or"), llvm=_fold_bool("or_"))
define(sp.Not, array=call("numpy.logical_not"), scalar=template("(not ({0}))"), llvm=lambda p, c: p.b.not_(c))

#: Functions: LLVM intrinsics where LLVM has one, else the C library's (as Numba's ``math``).
for _function, _intrinsic in ((sp.log, "log"), (sp.sin, "sin"), (sp.cos, "cos")):
    define(_function, array=f"numpy.{_intrinsic}", scalar=f"math.{_intrinsic}", llvm=intrinsic(_intrinsic))
define(sp.exp, array="numpy.exp", scalar="math.exp", scalar32=EXP32, llvm=_exp_llvm)
define(sp.Abs, array="abs", scalar="abs", llvm=intrinsic("fabs"))  # abs: a Python float stays one
for _function, _numpy in ((sp.sinh, "numpy.sinh"), (sp.cosh, "numpy.cosh"), (sp.tan, "numpy.tan"),
                          (sp.atan, "numpy.arctan"), (sp.asinh, "numpy.arcsinh"), (sp.atanh, "numpy.arctanh"),
                          (sp.erfc, "scipy.special.erfc"), (log1p, "numpy.log1p"),
                          (expm1, "numpy.expm1")):
    _name = _function.__name__
    define(_function, array=_numpy, scalar=f"math.{_name}", llvm=libm(_name))
define(sp.tanh, array="numpy.tanh", scalar="math.tanh", scalar32=TANH32, llvm=_tanh_llvm)
define(sp.erf, array="scipy.special.erf", scalar="math.erf", scalar32=ERF32, llvm=_erf_llvm)


def _mod_llvm(p, a, b):
    (a, b), _ = p.unify([a, b])
    return p.b.frem(a, b)


#: The remainder, for a body that reads its position (a causal mask: ``j > i mod T``). Its
#: arguments there are non-negative, where C's ``fmod`` (LLVM's ``frem``) is Python's ``%``.
define(sp.Mod, array=call("numpy.mod"), scalar=template("(({0}) % ({1}))"), llvm=_mod_llvm)


def _uniform_hash_llvm(p, *args):
    """``UNIFORM_HASH`` as LLVM IR: the same operations on ``i64`` (``int()`` truncates toward zero;
    a product wraps as Numba's int64 does, its low 32 bits exact), so the same bits."""
    b, mask = p.b, p.integer(0xFFFFFFFF)
    seed, *rest = (p.integer(a) for a in args)
    h = b.xor(b.and_(seed, mask), p.integer(0x6A09E667))
    for x in rest:
        h = b.xor(h, b.and_(b.mul(b.and_(x, mask), p.integer(0x9E3779B9)), mask))
        h = b.xor(h, b.lshr(h, p.integer(16)))
        h = b.and_(b.mul(h, p.integer(0x85EBCA6B)), mask)
        h = b.xor(h, b.lshr(h, p.integer(13)))
        h = b.and_(b.mul(h, p.integer(0xC2B2AE35)), mask)
        h = b.xor(h, b.lshr(h, p.integer(16)))
    value = p.to_float(h)
    return b.fmul(value, p.const(2.3283064365386963e-10, value.type))


#: Dropout's counter-based uniform (its bodies read the loop indices ``i, j``, which the LLVM
#: printer binds as float64 values).
define(UniformHash, array=UNIFORM_HASH_ARRAY, scalar=UNIFORM_HASH, llvm=_uniform_hash_llvm)
