"""Print a formula's serial CPU loop straight as LLVM IR, for llvmlite to compile.

Numba compiles a loop formula in 0.25-0.4 s, most of it in its own typing and lowering
passes (measured on this project's 2-core machine: ``native_lowering`` about 60%, type
inference 23%, LLVM itself 15-20%); LLVM alone compiles the same loop in 20-40 ms. A
loop formula (``Elementwise``, ``Update``, ``Reduction``) is a fixed loop nest around a
SymPy expression, so this module prints the IR directly: the loops read the same frame
as the Numba kernel (``cpu_backend._prologue``), and the expression is printed node by
node, each distinct subexpression once (SSA values are their own common-subexpression
elimination). ``kernel_ir`` returns None for what it does not print (bodies that read the
loop indices or draw random numbers, functions outside ``FUNCTIONS``); those formulas, the
threaded variants and the image kernels stay Numba's.

Arithmetic follows NumPy's float32 rules: a value that depends on an array entry is
computed in the kernel's dtype, one that depends only on scalars (``beta1**t``) in
float64; sums over a reduction accumulate in float64 (in the output's dtype for a column
sum, as the Numba kernel does). NaN propagates as in NumPy (``scalar_code.ScalarPrinter``
documents each rule; this printer keeps them). Numba's float32 loops (the threaded twins)
promote Python's float64 constants instead, so in float32 the two variants of one formula may
differ in the last digits (both are tested against NumPy; this one is the closer).

>>> import symdl as sd
>>> from symdl.ir.lowering import lower
>>> from symdl.backends.formulas import formula
>>> x = sd.input("x", 2)
>>> prog = lower({"h": sd.tanh(x)})
>>> text = kernel_ir(formula(prog.kernels[0], prog), "float64")
>>> entry_symbol(text).startswith("symdl_"), 'call double @"tanh"' in text
(True, True)
"""
from __future__ import annotations

import hashlib

import sympy as sp
from llvmlite import ir

from ...formulas.activations import expand_activations
from ...graph.nodes import INDEX_SYMBOLS, VARS
from ...ir.kernels import Elementwise, Pattern, Reduction, ReduceKind, Update
from ..formulas import Formula, uniform
from ..scalar_code import TANH32_CLAMP, TANH32_P, TANH32_Q, TANH32_TINY

I1, I64 = ir.IntType(1), ir.IntType(64)
F32, F64 = ir.FloatType(), ir.DoubleType()
TYPES = {"float32": F32, "float64": F64}

#: A slot's fields in a kernel's frame: its address, rows and columns (``cpu_backend._prologue``).
SLOT_FIELDS = 3

#: Functions printed as a call to the C library (``<name>f`` in float32), as Numba's
#: ``math`` module does; ``Numba`` registers them with LLVM under these names.
LIBM = {"tanh": "tanh", "log1p": "log1p", "expm1": "expm1", "erf": "erf", "erfc": "erfc", "sinh": "sinh",
        "cosh": "cosh", "atan": "atan", "asinh": "asinh", "atanh": "atanh", "tan": "tan"}

#: Functions printed as LLVM intrinsics (``llvm.<name>.f32``/``.f64``).
INTRINSICS = {"exp": "exp", "log": "log", "sin": "sin", "cos": "cos", "Abs": "fabs"}


class Unsupported(Exception):
    """A body this printer does not print (the formula stays Numba's)."""


def _const(t, value) -> ir.Constant:
    return ir.Constant(t, float(value))


class Body:
    """Prints SymPy expressions as IR at the builder's position; ``env`` binds symbols to
    values. A value depending on an array entry has the dtype ``work``; one depending only
    on scalars and numbers is float64, truncated where it meets a ``work`` value."""

    def __init__(self, builder: ir.IRBuilder, work: ir.Type, env: dict):
        self.b, self.work, self.env, self.memo = builder, work, dict(env), {}

    # ---------------------------------------------------------------- helpers
    def cast(self, v, t):
        if v.type == t:
            return v
        return self.b.fptrunc(v, t) if t == F32 else self.b.fpext(v, t)

    def unify(self, values):
        t = self.work if any(v.type == self.work for v in values) else F64
        return [self.cast(v, t) for v in values], t

    def intrinsic(self, name, args):
        return intrinsic(self.b, name, args)

    def libm(self, name, x):
        return call(self.b, name + ("f" if x.type == F32 else ""), [x], x.type)

    def select(self, cond, a, b):
        (a, b), _ = self.unify([a, b])
        return self.b.select(cond, a, b)

    # ---------------------------------------------------------------- dispatch
    def value(self, e):
        """The IR value of ``e`` (a float, or an ``i1`` for a condition)."""
        e = sp.sympify(e)
        if e in self.memo:
            return self.memo[e]
        if e.is_Symbol:
            if e not in self.env:
                raise Unsupported(f"free symbol {e}")
            v = self.env[e]
        elif e.is_Number or isinstance(e, sp.NumberSymbol):
            v = _const(F64, e)
        elif e is sp.true or e is sp.false:
            v = ir.Constant(I1, int(bool(e)))
        else:
            method = getattr(self, "_" + type(e).__name__, None)
            if method is None:
                raise Unsupported(type(e).__name__)
            v = method(e)
        self.memo[e] = v
        return v

    def _fold(self, op, args):
        values, _ = self.unify([self.value(a) for a in args])
        out = values[0]
        for v in values[1:]:
            out = op(out, v)
        return out

    # ---------------------------------------------------------------- arithmetic
    def _Add(self, e):
        return self._fold(self.b.fadd, e.as_ordered_terms())  # the order Python's printer adds in

    def _Mul(self, e):
        """``a*b/(c*d)`` as Python prints it: the numerator's product over the denominator's."""
        num, den = [], []
        for a in e.args:
            if a.is_Pow and a.exp.is_Rational and a.exp.is_negative:  # x/sqrt(y), as Python prints it
                den.append(a.base if a.exp == -1 else sp.Pow(a.base, -a.exp, evaluate=False))
            else:
                num.append(a)
        negate = len(num) > 1 and num[0] == -1  # -x: a negation, exact
        num = num[1:] if negate else num
        num_value = self._fold(self.b.fmul, num) if num else _const(F64, 1)
        if negate:
            num_value = self.b.fneg(num_value)
        if not den:
            return num_value
        (n, d), _ = self.unify([num_value, self._fold(self.b.fmul, den)])
        return self.b.fdiv(n, d)

    def _Pow(self, e):
        base, exp = e.args
        if exp.is_Integer:
            k = int(exp)
            if k == 0:
                return _const(F64, 1)
            x = self.value(base)
            out, square, m = None, x, abs(k)
            while m:  # binary powering
                if m & 1:
                    out = square if out is None else self.b.fmul(out, square)
                m >>= 1
                if m:
                    square = self.b.fmul(square, square)
            return out if k > 0 else self.b.fdiv(_const(x.type, 1), out)
        if exp == sp.Rational(1, 2):
            return self.intrinsic("sqrt", [self.value(base)])
        if exp == sp.Rational(-1, 2):
            root = self.intrinsic("sqrt", [self.value(base)])
            return self.b.fdiv(_const(root.type, 1), root)
        values, _ = self.unify([self.value(base), self.value(exp)])
        return self.intrinsic("pow", values)

    # ---------------------------------------------------------------- functions
    def _unary(self, e):
        name = type(e).__name__
        x = self.value(e.args[0])
        if name in INTRINSICS:
            return self.intrinsic(INTRINSICS[name], [x])
        return self.libm(LIBM[name], x)

    _exp = _log = _sin = _cos = _Abs = _unary
    _log1p = _expm1 = _erf = _erfc = _sinh = _cosh = _atan = _asinh = _atanh = _tan = _unary

    def _tanh(self, e):
        x = self.value(e.args[0])
        return self.tanh32(x) if x.type == F32 else self.libm("tanh", x)

    def _Max(self, e):
        return self._nan_fold("ogt", e.args)

    def _Min(self, e):
        return self._nan_fold("olt", e.args)

    def _nan_fold(self, cmp, args):
        """``a if a > b or a != a else b``: NaN wins; on ties the second operand (NumPy's rule)."""
        out = self.value(args[0])
        for arg in args[1:]:
            (a, b), _ = self.unify([out, self.value(arg)])
            take = self.b.or_(self.b.fcmp_ordered(cmp, a, b), self.b.fcmp_unordered("uno", a, a))
            out = self.b.select(take, a, b)
        return out

    def _sign(self, e):
        x = self.value(e.args[0])
        zero = _const(x.type, 0)
        rest = self.b.select(self.b.fcmp_ordered("<", x, zero), _const(x.type, -1), self.b.fsub(x, x))
        return self.b.select(self.b.fcmp_ordered(">", x, zero), _const(x.type, 1), rest)

    def _Heaviside(self, e):
        x = self.value(e.args[0])
        at0 = _const(x.type, e.args[1] if len(e.args) > 1 else sp.Rational(1, 2))
        zero, t = _const(x.type, 0), x.type
        rest = self.b.select(self.b.fcmp_ordered("<", x, zero), _const(t, 0), x)  # NaN stays NaN
        rest = self.b.select(self.b.fcmp_ordered("==", x, zero), at0, rest)
        return self.b.select(self.b.fcmp_ordered(">", x, zero), _const(t, 1), rest)

    def _Piecewise(self, e):
        *pieces, (last, cond) = e.args
        if cond is not sp.true:
            raise Unsupported("a Piecewise without a final True branch")
        out = self.value(last)
        for expr, c in reversed(pieces):
            out = self.select(self.value(c), self.value(expr), out)
        return out

    # ---------------------------------------------------------------- conditions
    def _relation(self, e):
        """A comparison: ordered (False with a NaN), as Python compares, except ``!=`` (True)."""
        op = RELATIONS[type(e)]
        (a, b), _ = self.unify([self.value(e.lhs), self.value(e.rhs)])
        return self.b.fcmp_unordered(op, a, b) if op == "!=" else self.b.fcmp_ordered(op, a, b)

    _StrictGreaterThan = _StrictLessThan = _GreaterThan = _LessThan = _Equality = _Unequality = _relation

    def _And(self, e):
        return self._fold_bool(self.b.and_, e.args)

    def _Or(self, e):
        return self._fold_bool(self.b.or_, e.args)

    def _fold_bool(self, op, args):
        out = self.value(args[0])
        for a in args[1:]:
            out = op(out, self.value(a))
        return out

    def _Not(self, e):
        return self.b.not_(self.value(e.args[0]))

    def tanh32(self, x):
        """Eigen's float32 ``tanh`` (``scalar_code.TANH32``: no libm call, so LLVM vectorises it), NaN kept."""
        b, c = self.b, _const(F32, TANH32_CLAMP)
        neg = _const(F32, -TANH32_CLAMP)
        y = b.select(b.fcmp_ordered("<", x, neg), neg, x)  # NaN compares false: kept
        y = b.select(b.fcmp_ordered(">", y, c), c, y)
        y2 = b.fmul(y, y)

        def horner(coefficients):
            out = _const(F32, coefficients[0])
            for coefficient in coefficients[1:]:
                out = b.fadd(b.fmul(y2, out), _const(F32, coefficient))
            return out

        small = b.fcmp_ordered("<", self.intrinsic("fabs", [y]), _const(F32, TANH32_TINY))
        return b.select(small, y, b.fdiv(b.fmul(y, horner(TANH32_P)), horner(TANH32_Q)))


#: SymPy's comparisons and LLVM's names for them.
RELATIONS = {sp.StrictGreaterThan: ">", sp.StrictLessThan: "<", sp.GreaterThan: ">=", sp.LessThan: "<=",
             sp.Equality: "==", sp.Unequality: "!="}


def call(b: ir.IRBuilder, name: str, args, t):
    """Call the function ``name`` returning ``t``, declared in the module on first use."""
    fn = b.module.globals.get(name)
    if fn is None:
        fn = ir.Function(b.module, ir.FunctionType(t, [a.type for a in args]), name)
    return b.call(fn, args)


def intrinsic(b: ir.IRBuilder, name: str, args):
    """``llvm.<name>.f32``/``.f64`` on ``args`` (their type names it)."""
    t = args[0].type
    return call(b, f"llvm.{name}.{'f32' if t == F32 else 'f64'}", args, t)


# --------------------------------------------------------------------------- loops


def for_range(b: ir.IRBuilder, count, body, name: str = "i"):
    """``for i in range(count): body(i)`` (``body`` may open loops of its own)."""
    start = b.block
    loop = b.append_basic_block(name + ".loop")
    after = b.append_basic_block(name + ".after")
    zero = ir.Constant(I64, 0)
    b.cbranch(b.icmp_signed(">", count, zero), loop, after)
    b.position_at_end(loop)
    i = b.phi(I64, name=name)
    i.add_incoming(zero, start)
    body(i)
    following = b.add(i, ir.Constant(I64, 1))
    i.add_incoming(following, b.block)
    b.cbranch(b.icmp_signed("<", following, count), loop, after)
    b.position_at_end(after)


class Frame:
    """A formula's frame (``cpu_backend._prologue``) read in the kernel's entry block."""

    def __init__(self, b: ir.IRBuilder, pointer, f: Formula, dtype: ir.Type):
        self.b, self.pointer, self.dtype = b, pointer, dtype
        n_slots = len(f.slots)
        self.slots = [(self.pointer_at(SLOT_FIELDS * k), self.field(SLOT_FIELDS * k + 1),
                       self.field(SLOT_FIELDS * k + 2)) for k in range(n_slots)]
        at = SLOT_FIELDS * n_slots
        self.sizes = {sym: self.field(at + k) for k, sym in enumerate(f.size_symbols)}
        at += len(f.size_symbols)
        self.scalars = {}
        for k, sym in enumerate(f.scalars):
            address = b.inttoptr(self.field(at + k), F64.as_pointer())
            self.scalars[sym] = b.load(address, name=str(sym))

    def field(self, k: int):
        return self.b.load(self.b.gep(self.pointer, [ir.Constant(I64, k)]))

    def pointer_at(self, k: int):
        return self.b.inttoptr(self.field(k), self.dtype.as_pointer())

    def size(self, d):
        return ir.Constant(I64, int(d)) if d.is_Integer else self.sizes[d]

    def element(self, slot: int, flat_index):
        return self.b.gep(self.slots[slot][0], [flat_index])

    def at(self, slot: int, i, j):
        """The address of entry ``(i, j)`` of a slot (its own column count)."""
        return self.element(slot, self.b.add(self.b.mul(i, self.slots[slot][2]), j))


def _slot(name: str) -> int:
    return int(name[1:])  # formulas.slot: "s<k>"


def _read(frame: Frame, operand, i, j, flat: bool):
    """An operand's entry for iteration ``(i, j)`` by its pattern (``scalar_code.INDEX``)."""
    k, b = _slot(operand.buffer), frame.b
    zero = ir.Constant(I64, 0)
    if flat:
        return b.load(frame.element(k, i))
    where = {Pattern.SAME: (i, j), Pattern.ROW: (zero, j), Pattern.COL: (i, zero), Pattern.SCALAR: (zero, zero),
             Pattern.TRANSPOSE: (j, i)}[operand.pattern]
    return b.load(frame.at(k, *where))


def _operand_env(frame, operands, i, j, flat) -> dict:
    return {VARS[m]: _read(frame, op, i, j, flat) for m, op in enumerate(operands)}


def _body(frame: Frame, env: dict) -> Body:
    return Body(frame.b, frame.dtype, {**frame.scalars, **env})


def _prepared(body):
    return expand_activations(sp.sympify(body), use_impl=True)


def _store(frame: Frame, body: Body, value, address):
    frame.b.store(body.cast(value, frame.dtype), address)


def _emit_loop(frame: Frame, k, flat: bool):
    """Elementwise and Update: every entry of the output's shape, reads first, then the stores."""
    rows, cols = frame.slots[0][1], frame.slots[0][2]
    b = frame.b

    def iteration(i, j):
        body = _body(frame, _operand_env(frame, k.operands, i, j, flat))
        address = (lambda s: frame.element(s, i)) if flat else (lambda s: frame.at(s, i, j))
        if isinstance(k, Elementwise):
            _store(frame, body, body.value(_prepared(k.body)), address(0))
            return
        for sym, let in k.lets:  # an Update: its lets in order, then its writes
            body.env[sym] = body.value(_prepared(let))
            body.memo.pop(sym, None)
        values = [(w, body.env[s]) for w, s in k.writes]
        for w, v in values:
            _store(frame, body, v, address(_slot(w)))

    if flat:
        for_range(b, b.mul(rows, cols), lambda i: iteration(i, None))
    else:
        for_range(b, rows, lambda i: for_range(b, cols, lambda j: iteration(i, j), "j"))


def _emit_reduction(frame: Frame, k: Reduction):
    b = frame.b
    rows, cols = (frame.size(sp.sympify(d)) for d in k.shape)
    expr = _prepared(k.body)
    out = frame.slots[0][0]
    acc = b.alloca(F64, name="acc")
    zero = _const(F64, 0)

    def term(i, j):
        body = _body(frame, _operand_env(frame, k.operands, i, j, False))
        return body, body.value(expr)

    def add_term(i, j):
        body, v = term(i, j)
        b.store(b.fadd(b.load(acc), body.cast(v, F64)), acc)

    def put(index, value):
        b.store(value if value.type == frame.dtype else b.fptrunc(value, frame.dtype), b.gep(out, [index]))

    if k.over == ReduceKind.ALL:
        b.store(zero, acc)
        for_range(b, rows, lambda i: for_range(b, cols, lambda j: add_term(i, j), "j"))
        put(ir.Constant(I64, 0), b.load(acc))
    elif k.over == ReduceKind.COLS:
        def row(i):
            b.store(zero, acc)
            for_range(b, cols, lambda j: add_term(i, j), "j")
            put(i, b.load(acc))

        for_range(b, rows, row)
    elif k.over == ReduceKind.LOGSUMEXP:
        largest = b.alloca(F64, name="largest")

        def row(i):
            b.store(_const(F64, float("-inf")), largest)

            def bigger(j):
                body, v = term(i, j)
                v, m = body.cast(v, F64), b.load(largest)
                b.store(b.select(b.fcmp_ordered(">", v, m), v, m), largest)  # max(m, v): NaN reaches the sum

            for_range(b, cols, bigger, "j")
            b.store(zero, acc)

            def add_exp(j):
                body, v = term(i, j)
                shifted = b.fsub(body.cast(v, F64), b.load(largest))
                b.store(b.fadd(b.load(acc), intrinsic(b, "exp", [shifted])), acc)

            for_range(b, cols, add_exp, "j")
            m = b.load(largest)
            put(i, b.fadd(m, intrinsic(b, "log", [b.load(acc)])))

        for_range(b, rows, row)
    elif k.over == ReduceKind.ROWS:  # column sums in the output's dtype, row by row (vectorises along j)
        for_range(b, cols, lambda j: b.store(_const(frame.dtype, 0), b.gep(out, [j])), "j0")

        def add_row(i):
            def add(j):
                body, v = term(i, j)
                address = b.gep(out, [j])
                b.store(b.fadd(b.load(address), body.cast(v, frame.dtype)), address)

            for_range(b, cols, add, "j")

        for_range(b, rows, add_row)
    else:
        raise Unsupported(f"reduction over {k.over}")


def printable(f: Formula) -> bool:
    """Whether ``kernel_ir`` prints this formula: a loop whose bodies read no loop index."""
    k = f.kernel
    if not isinstance(k, (Elementwise, Update, Reduction)):
        return False
    return not any(sp.sympify(b).free_symbols & INDEX_SYMBOLS for b in k.bodies())


def kernel_ir(f: Formula, dtype: str) -> str | None:
    """The serial kernel of ``f`` as an LLVM module defining ``void <symbol>(i64 *frame)``, its
    symbol ``symdl_`` and a hash of the code; None when this printer does not print it."""
    if not printable(f):
        return None
    module = ir.Module(name="symdl_formula")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64.as_pointer()]), "KERNEL")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    frame = Frame(b, fn.args[0], f, TYPES[dtype])
    try:
        if isinstance(f.kernel, Reduction):
            _emit_reduction(frame, f.kernel)
        else:
            _emit_loop(frame, f.kernel, uniform(f.kernel))
    except (Unsupported, TypeError, KeyError, ValueError):  # what SymPy or the frame cannot give a value
        return None
    b.ret_void()
    text = named(str(module))
    if '"""' in text or "\\" in text:  # the module quotes it in a plain Python string (never seen)
        return None
    return text


def named(text: str) -> str:
    """``text`` with its function ``KERNEL`` named after a hash of the code (names are global
    to the JIT engine, and equal code may share one)."""
    return text.replace('@"KERNEL"(', "@symdl_" + hashlib.sha256(text.encode()).hexdigest()[:20] + "(")


def entry_symbol(text: str) -> str:
    """The name of the function a printed module defines."""
    start = text.index("define void @") + len("define void @")
    return text[start: text.index("(", start)].strip('"')
