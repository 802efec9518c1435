"""Print a formula's serial CPU loop straight as LLVM IR, for llvmlite to compile.

Numba spends most of a loop formula's compile time in its own typing and lowering passes
(LLVM itself is a fifth of it: docs/performance.md has the profile); LLVM alone compiles the
same loop about ten times faster. A
loop formula (``Elementwise``, ``Update``, ``Reduction``) is a fixed loop nest around a
SymPy expression, so this module prints the IR directly: the loops read the same frame
as the Numba kernel (``cpu_backend._prologue``), and the expression is printed node by
node, each distinct subexpression once (SSA values are their own common-subexpression
elimination), each function by its LLVM builder in ``formulas.scalars.SCALARS`` (dropout's
hash included: the loop indices ``i, j`` a body reads are bound as float64 values). ``emit``
has one handler per kernel class: the loop formulas here, the image kernels in ``llvm_image``.
``kernel_ir`` returns None for what it does not print (a function without a builder); Numba
compiles those formulas' Python loop. Every kernel runs the iterations ``begin:end`` of its outer
loop (``Frame.each``): the step's threads share them (``cpu.runtime``).

Arithmetic follows NumPy's float32 rules: a value that depends on an array entry is
computed in the kernel's dtype, one that depends only on scalars (``beta1**t``) in
float64; sums over a reduction accumulate in float64 (in the output's dtype for a column
sum, as the Numba kernel does; a float32 log-sum-exp sums blocks of ``LSE_BLOCK`` exps in float32
lanes, then the blocks in float64). NaN propagates as in NumPy: ``Max``, ``sign``, ``Piecewise``...
are printed as their decomposition into ``formulas.scalars``' primitives, where each rule is
written once. Numba's float32 loops (the fallback) promote Python's float64 constants instead, so
in float32 a formula Numba compiles may differ in the last digits (tested against NumPy).

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
from functools import singledispatch

import sympy as sp
from llvmlite import ir

from ...formulas.scalars import SCALARS, decompose
from ...graph.nodes import COL_INDEX, ROW_INDEX, VARS
from ...ir.kernels import (
    Elementwise, Pattern, ReduceAll, ReduceCols, ReduceLogSumExp, ReduceRows, Reduction, Update,
)
from ..formulas import Formula, runs_flat
from ..scalar_code import prepared as _prepared

I1, I64 = ir.IntType(1), ir.IntType(64)
F32, F64 = ir.FloatType(), ir.DoubleType()
TYPES = {"float32": F32, "float64": F64}

#: A slot's fields in a kernel's frame: its address, rows and columns (``cpu_backend._prologue``).
SLOT_FIELDS = 3


class Unsupported(Exception):
    """A body this printer does not print (the formula stays Numba's)."""


def _const(t, value) -> ir.Constant:
    return ir.Constant(t, float(value))


class Body:
    """Prints SymPy expressions as IR at the builder's position; ``env`` binds symbols to
    values. A value depending on an array entry has the dtype ``work``; one depending only
    on scalars and numbers is float64, truncated where it meets a ``work`` value.

    Arithmetic is printed here; every function and primitive by its LLVM builder in
    ``formulas.scalars.SCALARS``, called with this printer and its arguments' values (the
    builders use ``b``, ``const``, ``select``, ``compare``, ``intrinsic``, ``libm``, and for integer
    work ``integer`` and ``to_float``)."""

    def __init__(self, builder: ir.IRBuilder, work: ir.Type, env: dict):
        self.b, self.work, self.env, self.memo = builder, work, dict(env), {}

    # ---------------------------------------------------------------- what builders use
    def cast(self, v, t):
        if v.type == t:
            return v
        return self.b.fptrunc(v, t) if t == F32 else self.b.fpext(v, t)

    def unify(self, values):
        t = self.work if any(v.type == self.work for v in values) else F64
        return [self.cast(v, t) for v in values], t

    def const(self, value, t):
        return _const(t, value)

    @staticmethod
    def is_float32(v) -> bool:
        return v.type == F32

    def intrinsic(self, name, args):
        return intrinsic(self.b, name, args)

    def integer(self, x):
        """A float value as an ``i64``, truncated toward zero (Python's and Numba's ``int(x)``);
        a Python int as an ``i64`` constant."""
        return ir.Constant(I64, x) if isinstance(x, int) else self.b.fptosi(x, I64)

    def to_float(self, h):
        """An ``i64`` as a float64 (as Python multiplies an int by a float)."""
        return self.b.sitofp(h, F64)

    def libm(self, name, x):
        return call(self.b, name + ("f" if x.type == F32 else ""), [x], x.type)

    def select(self, cond, a, b):
        (a, b), _ = self.unify([a, b])
        return self.b.select(cond, a, b)

    def compare(self, op, a, b):
        """Ordered (false with a NaN), as Python compares, except ``!=`` (true with a NaN)."""
        (a, b), _ = self.unify([a, b])
        return self.b.fcmp_unordered(op, a, b) if op == "!=" else self.b.fcmp_ordered(op, a, b)

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
        elif type(e) in ARITHMETIC:
            v = ARITHMETIC[type(e)](self, e)
        else:
            v = self.function(e)
        self.memo[e] = v
        return v

    def function(self, e):
        """A function's value: its decomposition's, or its builder's in ``SCALARS``."""
        primitives = decompose(e)
        if primitives is not None:
            return self.value(primitives)
        entry = SCALARS.get(type(e))
        if entry is None or entry.llvm is None:
            raise Unsupported(type(e).__name__)
        return entry.llvm(self, *(self.value(a) for a in e.args))

    def _fold(self, op, args):
        values, _ = self.unify([self.value(a) for a in args])
        out = values[0]
        for v in values[1:]:
            out = op(out, v)
        return out

    # ---------------------------------------------------------------- arithmetic
    def add(self, e):
        return self._fold(self.b.fadd, e.as_ordered_terms())  # the order Python's printer adds in

    def mul(self, e):
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

    def pow(self, e):
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


#: The arithmetic ``Body`` prints itself (functions come from ``SCALARS``).
ARITHMETIC = {sp.Add: Body.add, sp.Mul: Body.mul, sp.Pow: Body.pow}


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


def for_range(b: ir.IRBuilder, count, body, name: str = "i", first=None):
    """``for i in range(count): body(i)``, or ``range(first, count)`` (``body`` may open loops of
    its own); ``count`` and ``first`` are i64 values or Python ints."""
    count = ir.Constant(I64, count) if isinstance(count, int) else count
    first = ir.Constant(I64, first or 0) if first is None or isinstance(first, int) else first
    start = b.block
    loop = b.append_basic_block(name + ".loop")
    after = b.append_basic_block(name + ".after")
    b.cbranch(b.icmp_signed(">", count, first), loop, after)
    b.position_at_end(loop)
    i = b.phi(I64, name=name)
    i.add_incoming(first, start)
    body(i)
    following = b.add(i, ir.Constant(I64, 1))
    i.add_incoming(following, b.block)
    b.cbranch(b.icmp_signed("<", following, count), loop, after)
    b.position_at_end(after)


def local(b: ir.IRBuilder, t: ir.Type, name: str):
    """A variable of type ``t`` (an ``alloca`` at the top of the entry block, which LLVM turns
    into registers), for a value a loop updates."""
    here = b.block
    b.position_at_start(b.function.entry_basic_block)
    slot = b.alloca(t, name=name)
    b.position_at_end(here)
    return slot


class Frame:
    """A formula's frame (``cpu_backend._prologue``) read in the kernel's entry block, and the
    range ``begin, end`` of its outer loop's iterations that this call runs (``cpu_runtime``)."""

    def __init__(self, b: ir.IRBuilder, pointer, f: Formula, dtype: ir.Type, begin=None, end=None):
        self.b, self.pointer, self.dtype, self.begin, self.end = b, pointer, dtype, begin, end
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

    def each(self, body, name: str = "i"):
        """The kernel's outer loop: ``for i in range(begin, end): body(i)`` (its units,
        ``cpu_backend.units``)."""
        for_range(self.b, self.end, body, name, first=self.begin)

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
    """The operands' values at ``(i, j)``, and the loop indices themselves as float64 (a body may
    read them: dropout's hash, ``formulas.scalars.UNIFORM_HASH``, takes them back as integers)."""
    env = {VARS[m]: _read(frame, op, i, j, flat) for m, op in enumerate(operands)}
    if not flat:
        env[ROW_INDEX], env[COL_INDEX] = frame.b.sitofp(i, F64), frame.b.sitofp(j, F64)
    return env


def _body(frame: Frame, env: dict) -> Body:
    return Body(frame.b, frame.dtype, {**frame.scalars, **env})


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

    if flat:  # units: entries
        frame.each(lambda i: iteration(i, None))
    else:  # units: rows
        frame.each(lambda i: for_range(b, cols, lambda j: iteration(i, j), "j"))


def _lanes(instruction):
    """A float32 loop's float64 running sum marked ``reassoc``: LLVM may keep it in vector lanes (a
    strict left-to-right sum forbids vectorising). Every row is summed by one thread with the same
    code, so results do not depend on the thread count; they differ from a serial sum by rounding
    in float64, far below float32's. float64 loops keep the serial order (NumPy's bits)."""
    instruction.flags.append("reassoc")
    return instruction


class _Sums:
    """What a reduction's loops share: its sizes, a float64 accumulator ``acc``, the body's value
    at ``(i, j)`` and the store of a result into the output."""

    def __init__(self, frame: Frame, k: Reduction):
        self.frame, self.b, self.operands = frame, frame.b, k.operands
        self.rows, self.cols = (frame.size(sp.sympify(d)) for d in k.shape)
        self.expr = _prepared(k.body)
        self.out = frame.slots[0][0]
        self.acc = self.b.alloca(F64, name="acc")
        self.zero = _const(F64, 0)

    def term(self, i, j) -> tuple:
        """``(body, value)``: the body printed at ``(i, j)``."""
        body = _body(self.frame, _operand_env(self.frame, self.operands, i, j, False))
        return body, body.value(self.expr)

    def add_term(self, i, j, lanes: bool = False):
        body, v = self.term(i, j)
        total = self.b.fadd(self.b.load(self.acc), body.cast(v, F64))
        self.b.store(_lanes(total) if lanes and self.frame.dtype == F32 else total, self.acc)

    def put(self, index, value):
        dtype = self.frame.dtype
        self.b.store(value if value.type == dtype else self.b.fptrunc(value, dtype), self.b.gep(self.out, [index]))


def _emit_reduction(frame: Frame, k: Reduction):
    _reduce(k, _Sums(frame, k))


@singledispatch
def _reduce(k, s: _Sums):
    """Print reduction ``k``'s loops: one handler per reduction class."""
    raise Unsupported(f"no LLVM printer for {type(k).__name__}")


@_reduce.register
def _reduce_all(k: ReduceAll, s: _Sums):
    """One unit: a total is summed by one thread, in one order (the loss is reproducible)."""
    b = s.b
    b.store(s.zero, s.acc)
    for_range(b, s.rows, lambda i: for_range(b, s.cols, lambda j: s.add_term(i, j), "j"))
    s.put(ir.Constant(I64, 0), b.load(s.acc))


@_reduce.register
def _reduce_cols(k: ReduceCols, s: _Sums):
    b = s.b

    def row(i):  # float32: a row's sum in vector lanes (each row one thread's: any thread count, same bits)
        b.store(s.zero, s.acc)
        for_range(b, s.cols, lambda j: s.add_term(i, j, lanes=True), "j")
        s.put(i, b.load(s.acc))

    s.frame.each(row)


#: A float32 log-sum-exp sums its exps in float32 vector lanes this many entries at a time, and
#: those partial sums in float64 (a float64 running sum kept LLVM to 4 lanes: 2.2 ns an entry).
LSE_BLOCK = 64


@_reduce.register
def _reduce_log_sum_exp(k: ReduceLogSumExp, s: _Sums):
    b, dtype = s.b, s.frame.dtype
    largest = b.alloca(dtype, name="largest")
    part = b.alloca(F32, name="part")

    def row(i):
        b.store(_const(dtype, float("-inf")), largest)

        def bigger(j):  # maxnum(m, v) is m for a NaN v (the NaN reaches the sum), and LLVM keeps it in
            body, v = s.term(i, j)  # vector lanes (a compare and select chain ran scalar, ~3 ns an entry)
            b.store(intrinsic(b, "maxnum", [b.load(largest), body.cast(v, dtype)]), largest)

        for_range(b, s.cols, bigger, "j")
        b.store(s.zero, s.acc)
        narrow = b.load(largest)
        top = b.fpext(narrow, F64) if dtype == F32 else narrow

        if dtype == F32:  # float32's exp as arithmetic (scalars.EXP32), 8 lanes wide: each block of
            # LSE_BLOCK entries summed in float32 lanes, the blocks in float64

            def block(q):
                first = b.mul(q, I64(LSE_BLOCK))
                last = b.add(first, I64(LSE_BLOCK))
                last = b.select(b.icmp_signed("<", last, s.cols), last, s.cols)
                b.store(_const(F32, 0.0), part)

                def add_exp(j):
                    body, v = s.term(i, j)
                    term = SCALARS[sp.exp].llvm(body, b.fsub(body.cast(v, F32), narrow))
                    b.store(_lanes(b.fadd(b.load(part), term)), part)

                for_range(b, last, add_exp, "j", first=first)
                b.store(b.fadd(b.load(s.acc), b.fpext(b.load(part), F64)), s.acc)

            blocks = b.sdiv(b.add(s.cols, I64(LSE_BLOCK - 1)), I64(LSE_BLOCK))
            for_range(b, blocks, block, "q")
        else:
            def add_exp(j):
                body, v = s.term(i, j)
                shifted = b.fsub(body.cast(v, F64), top)
                b.store(b.fadd(b.load(s.acc), intrinsic(b, "exp", [shifted])), s.acc)

            for_range(b, s.cols, add_exp, "j")
        s.put(i, b.fadd(top, intrinsic(b, "log", [b.load(s.acc)])))

    s.frame.each(row)


@_reduce.register
def _reduce_rows(k: ReduceRows, s: _Sums):
    """Column sums in the output's dtype, row by row (vectorises along j); units: the columns.
    A thread adds its rows in the serial order into its own columns, kept on its stack until the
    end: accumulating in ``out`` itself, two threads whose columns share a cache line took the
    line from each other at every row (6.3x slower than one thread for a conv bias's 6 columns)."""
    b, out, dtype = s.b, s.out, s.frame.dtype
    begin, end = s.frame.begin, s.frame.end
    sums = b.alloca(dtype, size=b.sub(end, begin), name="sums")
    for_range(b, b.sub(end, begin), lambda j: b.store(_const(dtype, 0), b.gep(sums, [j])), "j0")

    def add_row(i):
        def add(j):
            body, v = s.term(i, j)
            address = b.gep(sums, [b.sub(j, begin)])
            b.store(b.fadd(b.load(address), body.cast(v, dtype)), address)

        for_range(b, end, add, "j", first=begin)

    for_range(b, s.rows, add_row)
    for_range(b, end, lambda j: b.store(b.load(b.gep(sums, [b.sub(j, begin)])), b.gep(out, [j])), "j1", first=begin)


@singledispatch
def emit(k, frame: Frame) -> None:
    """Print kernel ``k``'s serial loops at ``frame``'s builder: one handler per kernel class (the
    loop formulas here, the image kernels in ``llvm_image``; a product calls ``cpu.gemm``)."""
    raise Unsupported(f"no LLVM printer for {type(k).__name__}")


@emit.register(Elementwise)
@emit.register(Update)
def _emit_elementwise(k, frame: Frame) -> None:
    _emit_loop(frame, k, runs_flat(k))


@emit.register
def _emit_reduction_kernel(k: Reduction, frame: Frame) -> None:
    _emit_reduction(frame, k)


def printable(f: Formula) -> bool:
    """Whether ``kernel_ir`` prints this formula's kernel class (its body may still hold a function
    without an LLVM builder, which ``kernel_ir`` finds as it prints)."""
    return emit.dispatch(type(f.kernel)) is not emit.dispatch(object)


def kernel_ir(f: Formula, dtype: str) -> str | None:
    """The kernel of ``f`` as an LLVM module defining ``void <symbol>(i64 *frame, i64 begin, i64
    end)``, its symbol ``symdl_`` and a hash of the code; None when this printer does not print it."""
    if not printable(f):
        return None
    module = ir.Module(name="symdl_formula")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64.as_pointer(), I64, I64]), "KERNEL")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    frame = Frame(b, fn.args[0], f, TYPES[dtype], fn.args[1], fn.args[2])
    try:
        emit(f.kernel, frame)
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
