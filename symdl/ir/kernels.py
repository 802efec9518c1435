"""The kernel IR: what lowering produces and every backend prints.

A ``Program`` is a flat list of kernels over named buffers, one class per kernel (``KERNELS``
lists them; a backend has one handler per class):

* ``Gemm``         ``out = alpha * op(a) @ op(b)``, ``op`` the identity or a transpose *view*;
* ``Elementwise``  one fused loop: ``out[i, j] = body(operands at (i, j))``;
* ``Reduction``    a fused loop reducing ``body``: ``ReduceRows``, ``ReduceCols``, ``ReduceAll``
                   (sums) and ``ReduceLogSumExp`` (row-wise, the row max subtracted);
* ``Update``       one fused loop with several outputs written in place: ``lets`` in
                   order, then ``writes`` (an optimizer step: new state, new parameter);
* ``ImageKernel``  a gather over NHWC image batches (``Geometry``): ``Im2Col``, ``Col2Im``,
                   ``MaxPool``, ``MaxPoolGrad``, ``AvgPool``, ``AvgPoolGrad``;
* ``Reshape``      the same row-major memory read as another ``(rows, cols)``;
* ``Gather``       a row lookup ``table[ids]`` (embeddings) and ``ScatterAdd``, its adjoint;
* ``BlockGemm``    a product per block of ``block`` rows (a sequence): attention's scores and mixes;
* ``ColumnCopy``   columns of a matrix copied into columns of another, zero elsewhere (a column slice,
                   its adjoint placement; concat is a sum of them).

An ``Operand`` reads a buffer at ``(i, j)`` through a ``Pattern``. Shapes are SymPy
expressions in the batch symbol ``n``. ``check(program)`` validates a program: every
buffer read is a leaf or written earlier, shapes fit the patterns, bodies use only
their operands and the program's scalars.

>>> import symdl as sd
>>> from symdl.ir.lowering import lower
>>> x = sd.input("x", 2); W = sd.param("W", (2, 3))
>>> prog = lower({"h": sd.tanh(x @ W)})
>>> print(prog)
t0 (n, 3) = gemm(x, W)
h (n, 3) = elementwise[tanh(v0)](t0:ij)
>>> check(prog); prog.externals
['x', 'W']
"""
from __future__ import annotations

from collections.abc import Mapping

import enum
import functools
from dataclasses import dataclass, field

import sympy as sp

from ..graph.nodes import INDEX_SYMBOLS, VARS, Input, Param, State, n as N

Shape = tuple  # (rows, cols), SymPy expressions in n


@functools.lru_cache(maxsize=4096)
def at_batch(size, n_value: int) -> int:
    """A size or work expression in ``n`` as an int at batch size ``n_value`` (memoised: the
    kernels of a deep net ask the same few, and SymPy's ``subs`` costs tens of µs a call).

    >>> at_batch(2 * N + 1, 5), at_batch(7, 5)
    (11, 7)
    """
    return int(sp.sympify(size).subs(N, n_value))


#: What one call of a function such as ``exp``, ``erf``, ``tanh`` counts for in ``operation_count``: float32
#: loops compute them as polynomials of 10-20 operations (``formulas.scalars``); an ``exp`` loop took
#: about 6x an ``x + y`` loop's time per entry on this machine.
FUNCTION_OPS = 8

#: Functions that are a compare or two, not a polynomial: counted as one operation.
_CHEAP = (sp.Piecewise, sp.Mod, sp.Max, sp.Min, sp.Abs, sp.sign, sp.Heaviside, sp.floor, sp.ceiling)


@functools.lru_cache(maxsize=4096)
def operation_count(bodies: tuple) -> int:
    """The operations of a loop's bodies (SymPy's ``count_ops``, each function call counted as
    ``FUNCTION_OPS``; memoised: every layer's activation is the same body), at least 1.

    >>> x = VARS[0]
    >>> operation_count((x + 1,)), operation_count((sp.exp(x - 1),))
    (1, 9)
    """
    total = 0
    for b in bodies:
        b = sp.sympify(b)
        calls = sum(1 for e in sp.preorder_traversal(b) if isinstance(e, sp.Function) and not isinstance(e, _CHEAP))
        total += sp.count_ops(b) + (FUNCTION_OPS - 1) * calls
    return max(1, total)


class Pattern(enum.Enum):
    """How an operand is read at ``(i, j)`` of the loop."""

    SAME = "ij"  # same shape
    ROW = "j"  # a (1, m) row broadcast down the rows
    COL = "i"  # an (r, 1) column broadcast along the columns
    SCALAR = "0"  # a (1, 1) value broadcast everywhere
    TRANSPOSE = "ji"  # the transpose of an (m, r) buffer

    def __str__(self):
        return self.value


@dataclass(frozen=True)
class Operand:
    buffer: str
    pattern: Pattern = Pattern.SAME

    def __str__(self):
        return f"{self.buffer}:{self.pattern}"


@dataclass
class Gemm:
    out: str
    a: str
    b: str
    trans_a: bool
    trans_b: bool
    alpha: sp.Expr = sp.Integer(1)
    kind = "gemm"  # how generated code, train.kernels and CUDA kernel names spell it

    def reads(self) -> list:
        return [Operand(self.a), Operand(self.b)]

    def bodies(self) -> list:
        return []

    def __str__(self):
        alpha = "" if self.alpha == 1 else f"{self.alpha}*"
        return f"{alpha}gemm({self.a}{'.T' if self.trans_a else ''}, {self.b}{'.T' if self.trans_b else ''})"


@dataclass
class BlockGemm:
    """A product within every block (a sequence): for each block ``s``, ``out_s = alpha * op(a_s) @
    op(b_s)``, ``x_s`` the ``s``-th block of ``rows[x]`` rows of ``x``, where ``rows = (out's, a's,
    b's)`` rows per block (a query sequence of ``T`` tokens against a key sequence of ``S``). Every
    buffer holds the same number of blocks. A loop's units are the blocks: a thread computes whole
    sequences.
    """

    out: str
    a: str
    b: str
    trans_a: bool
    trans_b: bool
    rows: tuple  # rows per block of (out, a, b): ints
    alpha: sp.Expr = sp.Integer(1)
    kind = "block_gemm"  # how generated code, train.kernels and CUDA kernel names spell it

    def reads(self) -> list:
        return [Operand(self.a), Operand(self.b)]

    def bodies(self) -> list:
        return []

    def inner(self, program) -> sp.Expr:
        """``k``: the length of each dot product (the columns of ``op(a_s)``)."""
        return sp.sympify(self.rows[1] if self.trans_a else program.shape_of(self.a)[1])

    def blocks(self, program) -> sp.Expr:
        return sp.sympify(program.shape_of(self.out)[0] / self.rows[0])

    def __str__(self):
        alpha = "" if self.alpha == 1 else f"{self.alpha}*"
        return (f"{alpha}block_gemm[{','.join(map(str, self.rows))}]({self.a}{'.T' if self.trans_a else ''}, "
                f"{self.b}{'.T' if self.trans_b else ''})")


@dataclass
class ColumnCopy:
    """``out[i, at + j] = x[i, start + j]`` for ``j < width``, every other column of ``out`` zero: a
    column slice (``cols``: ``at`` 0, ``out`` ``width`` wide) or its adjoint (``place``: ``start`` 0).
    ``operands = (x,)`` read whole; a loop's units are the rows."""

    out: str
    operands: tuple  # (x,): an Operand (Pattern.SAME)
    start: int
    at: int
    width: int
    kind = "column_copy"  # how generated code, train.kernels and CUDA kernel names spell it

    def reads(self) -> list:
        return list(self.operands)

    def bodies(self) -> list:
        return []

    def __str__(self):
        return f"column_copy[{self.start}:{self.start + self.width} -> {self.at}]({self.operands[0]})"


@dataclass
class Elementwise:
    out: str
    body: sp.Expr  # over VARS[:len(operands)] and scalar symbols
    operands: tuple
    kind = "elementwise"  # how generated code, train.kernels and CUDA kernel names spell it

    def reads(self) -> list:
        return list(self.operands)

    def bodies(self) -> list:
        return [self.body]

    def __str__(self):
        return f"elementwise[{self.body}]({', '.join(map(str, self.operands))})"


@dataclass
class Reduction:
    """A fused loop reducing ``body`` over the entries of its input (of shape ``shape``); the
    subclasses say how (a ``Reduction`` itself is no kernel: ``check`` refuses it)."""

    out: str
    body: sp.Expr
    operands: tuple
    shape: Shape  # of the reduced (input) array
    kind = "reduction"  # how generated code, train.kernels and CUDA kernel names spell it
    label = ""  # how printed programs and CUDA kernel names spell the subclass

    def reads(self) -> list:
        return list(self.operands)

    def bodies(self) -> list:
        return [self.body]

    def __str__(self):
        return f"{self.label}[{self.body}]({', '.join(map(str, self.operands))})"


class ReduceRows(Reduction):
    """``(r, m) -> (1, m)``: the sum over the rows (a bias gradient)."""

    label = "reduce_rows"


class ReduceCols(Reduction):
    """``(r, m) -> (r, 1)``: the sum along each row."""

    label = "reduce_cols"


class ReduceAll(Reduction):
    """``(r, m) -> (1, 1)``: the sum of every entry."""

    label = "reduce_all"


class ReduceLogSumExp(Reduction):
    """``(r, m) -> (r, 1)``: each row's log-sum-exp, its maximum subtracted before ``exp``."""

    label = "reduce_logsumexp"


@dataclass
class Update:
    """Several outputs of one loop, written in place: ``lets`` in order, then ``writes``.

    ``lets`` are ``(symbol, body)`` pairs over the operands ``VARS[i]`` and earlier lets;
    ``writes`` are ``(buffer, symbol)``. Every operand is read before any write.
    """

    out: str  # the buffer whose shape the loop runs over (the parameter)
    lets: tuple
    writes: tuple
    operands: tuple
    kind = "update"  # how generated code, train.kernels and CUDA kernel names spell it

    def reads(self) -> list:
        return list(self.operands)

    def bodies(self) -> list:
        return [b for _, b in self.lets]

    def __str__(self):
        lets = "; ".join(f"{s} = {b}" for s, b in self.lets)
        writes = ", ".join(f"{b} <- {s}" for b, s in self.writes)
        return f"[{lets}] {writes} ({', '.join(map(str, self.operands))})"


class Geometry(tuple):
    """An image operation's geometry: ``(H, W, C, kh, kw, sh, sw, pt, pl, OH, OW)`` (ints).

    An image batch ``(n, H, W, C)`` is the matrix ``(n·H·W, C)`` (NHWC memory); a window
    ``kh x kw`` moves with strides ``(sh, sw)``; ``pt``/``pl`` zero rows/columns pad the top
    and left (the bottom and right padding is whatever the output size ``OH x OW`` needs).
    """

    FIELDS = ("H", "W", "C", "kh", "kw", "sh", "sw", "pt", "pl", "OH", "OW")

    def __new__(cls, values):
        values = tuple(int(v) for v in values)
        if len(values) != len(cls.FIELDS):
            raise ValueError(f"a geometry has {len(cls.FIELDS)} fields {cls.FIELDS}, got {values}")
        return tuple.__new__(cls, values)

    def __getattr__(self, name):
        try:
            return self[self.FIELDS.index(name)]
        except ValueError:
            raise AttributeError(name) from None

    def __getnewargs__(self):
        return (tuple(self),)


@dataclass
class ImageKernel:
    """An image kernel over NHWC batches held as ``(n·H·W, C)`` matrices (see ``Geometry``).

    Every image kernel is written as a gather (each output entry computed by one iteration),
    so loops parallelise over the output without write races. A subclass names the shapes it
    reads and writes in units of ``in``: ``(n·H·W, C)``, ``out``: ``(n·OH·OW, C)`` and
    ``cols``: ``(n·OH·OW, kh·kw·C)``.
    """

    out: str
    operands: tuple  # Operands (always Pattern.SAME)
    geometry: Geometry
    kind = ""  # how generated code, train.kernels and CUDA kernel names spell it
    operand_units = ()  # the operands' shapes, in the units above
    output_unit = ""

    def reads(self) -> list:
        return list(self.operands)

    def bodies(self) -> list:
        return []

    def window(self) -> int:
        return self.geometry.kh * self.geometry.kw

    def shapes(self) -> tuple:
        """``(operand shapes, output shape)`` the geometry implies."""
        g = self.geometry
        units = {"in": (N * g.H * g.W, sp.Integer(g.C)), "out": (N * g.OH * g.OW, sp.Integer(g.C)),
                 "cols": (N * g.OH * g.OW, sp.Integer(g.kh * g.kw * g.C))}
        return [units[u] for u in self.operand_units], units[self.output_unit]

    def __str__(self):
        g = self.geometry
        return (f"{self.kind}[{g.H}x{g.W}x{g.C} window {g.kh}x{g.kw} stride {g.sh},{g.sw} pad {g.pt},{g.pl} "
                f"-> {g.OH}x{g.OW}]({', '.join(map(str, self.operands))})")


class Im2Col(ImageKernel):
    """Patch extraction: ``out[(b, oy, ox), (dy, dx, c)] = x[(b, iy, ix), c]``."""

    kind, operand_units, output_unit = "im2col", ("in",), "cols"


class Col2Im(ImageKernel):
    """``Im2Col``'s adjoint, a scatter-add written as a gather over input pixels."""

    kind, operand_units, output_unit = "col2im", ("cols",), "in"


class MaxPool(ImageKernel):
    """Each window's maximum (a NaN wins)."""

    kind, operand_units, output_unit = "maxpool", ("in",), "out"


class MaxPoolGrad(ImageKernel):
    """``(x, G)``: each window's ``G`` routed to the window's first arg-max in ``x``."""

    kind, operand_units, output_unit = "maxpool_grad", ("in", "out"), "in"


class AvgPool(ImageKernel):
    """Each window's mean."""

    kind, operand_units, output_unit = "avgpool", ("in",), "out"


class AvgPoolGrad(ImageKernel):
    """``(G,)``: each window's ``G`` spread evenly over the window."""

    kind, operand_units, output_unit = "avgpool_grad", ("out",), "in"


@dataclass
class Reshape:
    """The same row-major memory read as another ``(rows, cols)`` (flatten, unflatten)."""

    out: str
    operands: tuple  # one Operand (Pattern.SAME)
    kind = "reshape"  # how generated code, train.kernels and CUDA kernel names spell it

    def reads(self) -> list:
        return list(self.operands)

    def bodies(self) -> list:
        return []

    def __str__(self):
        return f"reshape({', '.join(map(str, self.operands))})"


@dataclass
class Gather:
    """A row lookup (an embedding): ``out[r, :] = table[ids[r, 0], :]``.

    ``operands = (table, ids)``, both read whole: ``table`` ``(V, d)``, ``ids`` ``(R, 1)`` holding
    row numbers as exact integers in the program's float dtype (the way dropout's indices are
    numbers), ``out`` ``(R, d)``. Iteration ``r`` writes row ``r`` of ``out`` alone.
    """

    out: str
    operands: tuple  # (table, ids): Operands (always Pattern.SAME)
    kind = "gather"  # how generated code, train.kernels and CUDA kernel names spell it

    def reads(self) -> list:
        return list(self.operands)

    def bodies(self) -> list:
        return []

    def __str__(self):
        table, ids = (o.buffer for o in self.operands)
        return f"gather({table}[{ids}])"


@dataclass
class ScatterAdd:
    """``Gather``'s adjoint: ``out`` ``(V, d)`` zero, then ``out[ids[r, 0], :] += G[r, :]`` for every
    ``r`` in order (a repeated id accumulates). ``operands = (ids, G)``: ``ids`` ``(R, 1)``, ``G``
    ``(R, d)``. A loop's units are the columns ``d``: each column is one thread's, so no two
    threads write one entry, and every entry adds its rows in the serial order.
    """

    out: str
    operands: tuple  # (ids, G): Operands (always Pattern.SAME)
    kind = "scatter_add"  # how generated code, train.kernels and CUDA kernel names spell it

    def reads(self) -> list:
        return list(self.operands)

    def bodies(self) -> list:
        return []

    def __str__(self):
        ids, G = (o.buffer for o in self.operands)
        return f"scatter_add({ids}, {G})"


#: Every kernel class a program may hold (``check`` refuses anything else).
KERNELS = (Gemm, Elementwise, ReduceRows, ReduceCols, ReduceAll, ReduceLogSumExp, Update,
           Im2Col, Col2Im, MaxPool, MaxPoolGrad, AvgPool, AvgPoolGrad, Reshape, Gather, ScatterAdd, BlockGemm,
           ColumnCopy)


@dataclass
class Program:
    """The kernels, the buffers they write (name -> shape) and what comes in and out."""

    kernels: list
    buffers: dict  # work buffers: name -> shape (one arena per batch size)
    inputs: list  # Input leaves
    params: list  # Param leaves (and State leaves read but not written: passed in like a parameter)
    outputs: dict  # output name -> buffer name
    scalars: list = field(default_factory=list)  # free scalar symbols other than n, sorted by name
    persistent: dict = field(default_factory=dict)  # name -> shape: buffers kept between calls (written params, state)
    notes: Mapping = field(default_factory=dict)  # buffer name -> one line naming its value ("δ2 = ..."), for comments

    def note(self, buffer: str) -> str:
        """``"  δ2 = ..."`` for a kernel's comment line in generated code ("" when ``buffer`` has no note)."""
        text = self.notes.get(buffer)
        return "" if not text else "  " + " ".join(str(text).split())

    @property
    def externals(self) -> list:
        """The leaves passed in at every call, in order: inputs, then params not kept persistent."""
        return [str(l.name) for l in self.inputs + self.params if str(l.name) not in self.persistent]

    def __str__(self):
        lines = []
        for k in self.kernels:
            shape = "(" + ", ".join(map(str, self.shape_of(k.out))) + ")"
            lines.append(f"update {k.out} {shape}: {k}" if isinstance(k, Update) else f"{k.out} {shape} = {k}")
        return "\n".join(lines)

    def shape_of(self, name) -> Shape:
        if name in self.buffers:
            return self.buffers[name]
        if name in self.persistent:
            return self.persistent[name]
        leaf = {str(l.name): l for l in self.inputs + self.params}[name]
        return tuple(leaf.shape)

    def loop_shape(self, kernel) -> Shape:
        """The shape a kernel's loop runs over."""
        return kernel.shape if isinstance(kernel, Reduction) else self.shape_of(kernel.out)

    def work_expr(self, kernel) -> sp.Expr:
        """A kernel's work as an expression in ``n``: multiply-adds for a GEMM,
        elements times operations for a loop."""
        if isinstance(kernel, Gemm):
            r, c = self.shape_of(kernel.out)
            inner = self.shape_of(kernel.a)[0 if kernel.trans_a else 1]
            return sp.sympify(r * c * inner)
        if isinstance(kernel, BlockGemm):  # rows x cols outputs, each a k-long dot product
            r, c = self.shape_of(kernel.out)
            return sp.sympify(r * c * kernel.inner(self))
        if isinstance(kernel, ColumnCopy):  # every entry of out written once
            r, c = self.shape_of(kernel.out)
            return sp.sympify(r * c)
        if isinstance(kernel, ScatterAdd):  # zero the (V, d) table, then add every row of G
            (v, c), (r, _) = self.shape_of(kernel.out), self.shape_of(kernel.operands[1].buffer)
            return sp.sympify(v * c + r * c)
        if hasattr(kernel, "work_expr"):  # a kernel that knows its own work (ops.recurrence's scans)
            return kernel.work_expr(self)
        r, c = self.loop_shape(kernel)
        if isinstance(kernel, ImageKernel):  # each output entry reads one window
            return sp.sympify(r * c * kernel.window())
        if isinstance(kernel, ReduceLogSumExp):  # the body twice (the max, then the sum), an exp per entry
            return sp.sympify(r * c) * (2 * operation_count(tuple(kernel.bodies())) + FUNCTION_OPS)
        return sp.sympify(r * c) * operation_count(tuple(kernel.bodies()))

    def work(self, kernel, n_value: int) -> int:
        return at_batch(self.work_expr(kernel), n_value)

    def flops(self, kernel, n_value: int) -> int:
        """A FLOP estimate for one kernel at batch size ``n_value`` (for ``train.kernels``)."""
        w = self.work(kernel, n_value)
        return 2 * w if isinstance(kernel, (Gemm, BlockGemm)) else w


class ProgramError(AssertionError):
    """A lowered program that breaks one of the IR's invariants (a symdl bug)."""


def check(program: Program) -> None:
    """Validate ``program``; raises ``ProgramError`` naming the kernel and the broken rule."""
    available = {str(l.name) for l in program.inputs + program.params} | set(program.persistent)
    leaves = {str(l.name): l for l in program.inputs + program.params}
    for leaf in leaves.values():
        if not isinstance(leaf, (Input, Param, State)):
            raise ProgramError(f"leaf {leaf} is not an Input or Param")
    scalars = set(program.scalars) | {N} | INDEX_SYMBOLS  # a body may read its loop indices (i, j)
    seen_out = set()
    for k in program.kernels:
        if not isinstance(k, KERNELS):
            raise ProgramError(f"{k!r} is not a kernel ({', '.join(c.__name__ for c in KERNELS)})")
        where = f"kernel {k.out} ({type(k).__name__})"
        for op in k.reads():
            if op.buffer not in available:
                raise ProgramError(f"{where} reads {op.buffer!r} before anything writes it")
            if not isinstance(op.pattern, Pattern):
                raise ProgramError(f"{where}: operand {op.buffer} has pattern {op.pattern!r}, not a Pattern")
        if isinstance(k, Update):
            targets = [b for b, _ in k.writes]
            if not all(b in program.persistent for b in targets):
                raise ProgramError(f"{where} writes {targets}, which must all be persistent buffers")
            defined = {s for s, _ in k.lets}
            for b, s in k.writes:
                if s not in defined:
                    raise ProgramError(f"{where} writes {b} from {s}, which no let defines")
                if tuple(program.shape_of(b)) != tuple(program.shape_of(k.out)):
                    raise ProgramError(f"{where} writes {b} of another shape than its loop")
        else:
            if k.out in seen_out or k.out not in program.buffers:
                raise ProgramError(f"{where} writes {k.out!r}: not a work buffer, or written twice")
            seen_out.add(k.out)
            available.add(k.out)
        _check_shapes(k, program, where)
        allowed = set(VARS[: len(k.reads())]) | scalars
        lets = k.lets if isinstance(k, Update) else [(None, b) for b in k.bodies()]
        for sym, body in lets:  # an Update's let may read the lets before it
            stray = sp.sympify(body).free_symbols - allowed
            if stray:
                raise ProgramError(f"{where}: body {body} uses {sorted(map(str, stray))}, not operands or scalars")
            allowed.add(sym)
    for name, buf in program.outputs.items():
        if buf not in program.buffers and buf not in program.persistent:
            raise ProgramError(f"output {name!r} names buffer {buf!r}, which the program does not hold")


@functools.singledispatch
def _check_shapes(k, program, where):
    """Raise ``ProgramError`` when ``k``'s buffers do not have the shapes it needs: one handler per
    kernel class."""
    raise ProgramError(f"{where}: no shape check for {type(k).__name__}")


@_check_shapes.register(Elementwise)
@_check_shapes.register(Update)
@_check_shapes.register(Reduction)
def _loop_shapes(k, program, where):
    """Each operand has the shape its pattern reads at every ``(i, j)`` of the loop."""
    r, c = program.loop_shape(k)
    for op in k.reads():
        shape = tuple(program.shape_of(op.buffer))
        want = {Pattern.SAME: (r, c), Pattern.ROW: (1, c), Pattern.COL: (r, 1), Pattern.SCALAR: (1, 1),
                Pattern.TRANSPOSE: (c, r)}[op.pattern]
        if tuple(sp.sympify(d) for d in shape) != tuple(sp.sympify(d) for d in want):
            raise ProgramError(f"{where}: operand {op} has shape {shape}, its pattern needs {want}")


@_check_shapes.register
def _gemm_shapes(k: Gemm, program, where):
    a, b = program.shape_of(k.a), program.shape_of(k.b)
    ar, ac = (a[1], a[0]) if k.trans_a else (a[0], a[1])
    br, bc = (b[1], b[0]) if k.trans_b else (b[0], b[1])
    if sp.expand(ac - br) != 0 or tuple(program.shape_of(k.out)) != (ar, bc):
        raise ProgramError(f"{where}: {a}{'ᵀ' if k.trans_a else ''} @ {b}{'ᵀ' if k.trans_b else ''} "
                           f"does not give {program.shape_of(k.out)}")


def _whole_buffers(k, program, count, where) -> list:
    """The shapes of ``k``'s operands, which must be ``count`` buffers read whole."""
    if len(k.operands) != count or any(o.pattern != Pattern.SAME for o in k.operands):
        raise ProgramError(f"{where}: {k.kind} reads {count} whole buffers, got {list(map(str, k.operands))}")
    return [tuple(program.shape_of(o.buffer)) for o in k.operands]


@_check_shapes.register
def _image_shapes(k: ImageKernel, program, where):
    ins, out = k.shapes()
    actual = _whole_buffers(k, program, len(ins), where)
    for shape, want in list(zip(actual, ins)) + [(tuple(program.shape_of(k.out)), out)]:
        if any(sp.expand(sp.sympify(a) - b) != 0 for a, b in zip(shape, want)):
            raise ProgramError(f"{where}: a buffer has shape {shape}, the geometry needs {want}")


@_check_shapes.register
def _reshape_shapes(k: Reshape, program, where):
    (source,) = _whole_buffers(k, program, 1, where)
    got_out = tuple(program.shape_of(k.out))
    size = lambda s: sp.expand(s[0] * s[1])  # noqa: E731
    if sp.expand(size(source) - size(got_out)) != 0:
        raise ProgramError(f"{where}: reshape of {source} to {got_out} changes the size")


@_check_shapes.register
def _gather_shapes(k: Gather, program, where):
    table, ids = _whole_buffers(k, program, 2, where)
    out = tuple(program.shape_of(k.out))
    same = lambda a, b: sp.expand(sp.sympify(a) - b) == 0  # noqa: E731
    if not (same(ids[1], 1) and same(out[0], ids[0]) and same(out[1], table[1])):
        raise ProgramError(f"{where}: gather of table {table} at ids {ids} does not give {out}")


@_check_shapes.register
def _scatter_add_shapes(k: ScatterAdd, program, where):
    ids, G = _whole_buffers(k, program, 2, where)
    out = tuple(program.shape_of(k.out))
    same = lambda a, b: sp.expand(sp.sympify(a) - b) == 0  # noqa: E731
    if not (same(ids[1], 1) and same(G[0], ids[0]) and same(out[1], G[1])):
        raise ProgramError(f"{where}: scatter_add of {G} at ids {ids} does not give {out}")


# --------------------------------------------------------------------------- recurrence (ops.recurrence)


@dataclass
class _ScanKernel:
    """What ``Scan`` and ``ScanGrad`` share: the cell's formulas and the scan's sizes and directions."""

    out: str
    operands: tuple
    cell: tuple
    gates: int
    states: int
    steps: tuple  # (T,): a size, so one compiled formula serves every sequence length
    reverse_in: bool = False
    reverse_out: bool = False
    extras_in: int = 0  # per-step extra inputs per unit read at the input row (operand EI), then
    extras_out: int = 0  # those read at the output row (EO): the cell's variables after the states
    kind = ""  # (no ``reads``: not a kernel itself, as test_tables counts kernel classes by it)
    base = 0  # the operands before the optional B, EI, EO

    @property
    def variables(self) -> int:
        """How many cell variables: ``k`` input gates, ``k`` recurrent gates, ``s`` states, the extras."""
        return 2 * self.gates + self.states + self.extras_in + self.extras_out

    def optional(self) -> dict:
        """``{"B": operand or None, "EI": ..., "EO": ...}``: the operands after the first ``base``."""
        rest = list(self.operands[self.base:])
        eo = rest.pop() if self.extras_out and rest else None
        ei = rest.pop() if self.extras_in and rest else None
        return {"B": rest[0] if rest else None, "EI": ei, "EO": eo}

    def bodies(self) -> list:
        """The cell's formulas with every cell variable read as ``v0``: what the checker, the work
        estimate and the helper search see (the variables are not operands)."""
        return [sp.sympify(b).xreplace({v: VARS[0] for v in VARS[: self.variables]})
                for b in self.cell]

    def __str__(self):
        flags = "".join(f" {f}" for f, on in (("reverse_in", self.reverse_in), ("reverse_out", self.reverse_out)) if on)
        return f"{self.kind}[{self.gates} gates, {self.states} states, T={self.steps[0]}{flags}]" \
               f"({', '.join(map(str, self.operands))})"


@dataclass
class Scan(_ScanKernel):
    """A recurrent cell run over the steps of each sequence (``ops.recurrence``).

    ``operands = (XP, Uᵀ)`` or ``(XP, Uᵀ, B)``: the projected inputs ``(n·T, k·u)``, the recurrent
    kernel transposed ``(k·u, u)`` (each gate's weights a contiguous row) and a bias ``(r, k·u)`` (row 0 added to the input gates, row 1 when r = 2 to
    the recurrent gates); ``out`` the states ``(n·T, s·u)``.
    ``cell[c]`` is state ``c``'s scalar formula over ``VARS`` (input gates ``v0..v(k-1)``, recurrent
    gates ``vk..v(2k-1)``, previous states ``v2k..``, then ``extras_in`` values per unit read from
    ``EI`` at the input row and ``extras_out`` from ``EO`` at the output row: ``operands = (XP, Uᵀ[,
    B][, EI][, EO])``, extra ``m`` of unit ``j`` in column ``m·u + j``); ``steps = (T,)``. Step ``t`` of sequence ``b``
    reads input row ``b·T + t`` (``b·T + T-1-t`` with ``reverse_in``) and writes row ``b·T + t``
    (``reverse_out``: ``b·T + T-1-t``). Units: the sequences; one sequence's steps run in order.
    """

    kind = "scan"
    base = 2

    def reads(self) -> list:
        return list(self.operands)

    def work_expr(self, program) -> sp.Expr:
        u = program.shape_of(self.operands[1].buffer)[1]
        rows = program.shape_of(self.out)[0]
        return sp.sympify(rows * u * (self.gates * u + self.states * operation_count(tuple(self.bodies()))))


@dataclass
class ScanGrad(_ScanKernel):
    """``Scan``'s backpropagation through time: ``operands = (XP, UP, S, G, U[, B])`` (``UP = shift(h) U``
    without the bias), ``out``
    ``[δXP | δUP | δS]`` ``(n·T, 2·k·u + s·u)``: one reverse loop over the steps of each sequence,
    the local derivatives ``sp.diff`` of ``cell``; ``δS`` each state's whole gradient (``G`` plus the
    carry from the next step). With extras (``operands = (XP, UP, S, G, U[, B][, EI][, EO])``) the
    output adds ``[δEI | δEO]``, read and written at the rows ``Scan`` reads them."""

    kind = "scan_grad"
    base = 5

    def reads(self) -> list:
        return list(self.operands)

    def work_expr(self, program) -> sp.Expr:
        u = program.shape_of(self.operands[4].buffer)[0]
        rows = program.shape_of(self.out)[0]
        return sp.sympify(rows * u * (self.gates * u + 3 * self.states * operation_count(tuple(self.bodies()))))


KERNELS = KERNELS + (Scan, ScanGrad)


@_check_shapes.register(Scan)
@_check_shapes.register(ScanGrad)
def _scan_shapes(k, program, where):
    grad = isinstance(k, ScanGrad)
    extras = (k.extras_in > 0) + (k.extras_out > 0)
    if len(k.operands) - extras not in ((5, 6) if grad else (2, 3)):
        raise ProgramError(f"{where}: {k.kind} reads (XP, U[, B][, EI][, EO]) or (XP, UP, S, G, U[, B][, EI][, EO]), "
                           f"got {len(k.operands)}")
    shapes = _whole_buffers(k, program, len(k.operands), where)
    out = tuple(program.shape_of(k.out))
    same = lambda a, b: sp.expand(sp.sympify(a) - b) == 0  # noqa: E731
    u = shapes[4][0] if grad else shapes[1][1]
    ku = k.gates * u
    want = {"XP": (out[0], ku), "U": (u, ku) if grad else (ku, u),
            "EI": (out[0], k.extras_in * u), "EO": (out[0], k.extras_out * u)}
    if grad:
        want.update(UP=(out[0], ku), S=(out[0], k.states * u), G=(out[0], k.states * u))
        names = ["XP", "UP", "S", "G", "U"]
        wide = (2 * k.gates + k.states + k.extras_in + k.extras_out) * u
    else:
        names = ["XP", "U"]
        wide = k.states * u
    optional = k.optional()
    names += [name for name in ("B", "EI", "EO") if optional[name] is not None]
    if optional["B"] is not None:
        b = shapes[names.index("B")]
        want["B"] = (b[0], ku)
        if not (same(b[0], 1) or same(b[0], 2)):
            raise ProgramError(f"{where}: the bias has shape {b}, it needs 1 or 2 rows")
    for name, shape in zip(names, shapes):
        if not all(same(a, b) for a, b in zip(shape, want[name])):
            raise ProgramError(f"{where}: {name} has shape {shape}, the cell needs {want[name]}")
    if not same(out[1], wide):
        raise ProgramError(f"{where}: the output {out} must be {wide} wide")


@_check_shapes.register
def _column_copy_shapes(k: ColumnCopy, program, where):
    (x,) = _whole_buffers(k, program, 1, where)
    out = tuple(program.shape_of(k.out))
    if sp.expand(sp.sympify(x[0]) - out[0]) != 0 or k.start + k.width > x[1] or k.at + k.width > out[1] \
            or min(k.start, k.at, k.width) < 0:
        raise ProgramError(f"{where}: columns {k.start}..{k.start + k.width} of {x} into columns {k.at}.. of {out}")


@_check_shapes.register
def _block_gemm_shapes(k: BlockGemm, program, where):
    out, a, b = (tuple(sp.sympify(d) for d in program.shape_of(x)) for x in (k.out, k.a, k.b))
    ro, ra, rb = k.rows
    same = lambda x, y: sp.expand(sp.sympify(x) - y) == 0  # noqa: E731
    blocks = [sp.expand(m[0] / r) for m, r in ((out, ro), (a, ra), (b, rb))]
    op_a = (a[1], ra) if k.trans_a else (ra, a[1])
    op_b = (b[1], rb) if k.trans_b else (rb, b[1])
    if not (same(blocks[0], blocks[1]) and same(blocks[0], blocks[2]) and same(op_a[0], ro)
            and same(op_a[1], op_b[0]) and same(out[1], op_b[1])):
        raise ProgramError(f"{where}: per block, op(a) {op_a} @ op(b) {op_b} does not give ({ro}, {out[1]}) "
                           f"blocks of {out}")
