"""The image kernels' serial loops (``ir.ImageKernel``, ``ir.Reshape``) printed as LLVM IR.

Each handler follows its Python loop in ``backends.image_code`` line by line: the same
iterations (``image_code.loop_rows``: one per output row, or per window of a pooling gradient whose
windows do not overlap), the same integer arithmetic on ``i64`` (every division there is of
a non-negative number, so ``sdiv`` is Python's ``//``), the same tests decided when the code
is printed (``_inside``, ``_by_window``), and the same floating-point operations in the same
types as Numba's compile of that loop: an average pool sums in float64 and divides in
float64 (``_acc = 0.0``; a float32 entry over an integer is a float64), a gradient adds in
the buffer's dtype, a max-pool takes the first arg-max with a NaN winning. The results are
therefore those of the Python loop, to the bit (``tests/test_cpu_backend.py`` compares them).

Importing this module registers the handlers in ``llvm_code.emit`` (``cpu.backend`` does).

>>> import symdl as sd
>>> from symdl.ir.lowering import lower
>>> from symdl.backends.formulas import formula
>>> x = sd.input("x", (4, 4, 2))
>>> prog = lower({"h": sd.max_pool2d(x, 2)})
>>> text = llvm_code.kernel_ir(formula(prog.kernels[0], prog), "float32")
>>> "fcmp uno float" in text, "call" in text
(True, False)
"""
from __future__ import annotations

from llvmlite import ir

from ...ir.kernels import AvgPool, AvgPoolGrad, Col2Im, Im2Col, MaxPool, MaxPoolGrad, Reshape
from ..image_code import _by_window, _inside
from . import llvm_code
from .llvm_code import F64, I64, Frame, for_range, local

_slot = llvm_code._slot


def _int(v) -> ir.Constant:
    return ir.Constant(I64, v)


class Image:
    """What the image handlers share: the builder, integer arithmetic with Python ints folded in,
    and entry ``(row, column)`` of a slot whose rows have ``width`` entries."""

    def __init__(self, frame: Frame, k):
        self.frame, self.b, self.k, self.g = frame, frame.b, k, getattr(k, "geometry", None)
        self.dtype = frame.dtype

    def i64(self, v):
        return _int(v) if isinstance(v, int) else v

    def add(self, *terms):
        out = self.i64(terms[0])
        for t in terms[1:]:
            out = self.b.add(out, self.i64(t))
        return out

    def sub(self, a, c):
        return self.b.sub(self.i64(a), self.i64(c))

    def mul(self, a, c):
        return self.b.mul(self.i64(a), self.i64(c))

    def div(self, a, c):
        return self.b.sdiv(self.i64(a), self.i64(c))

    def less(self, a, c):
        return self.b.icmp_signed("<", self.i64(a), self.i64(c))

    def address(self, buffer: str, row, column, width: int):
        return self.frame.element(_slot(buffer), self.add(self.mul(row, width), column))

    def load(self, buffer, row, column, width):
        return self.b.load(self.address(buffer, row, column, width))

    def store(self, value, buffer, row, column, width):
        self.b.store(value, self.address(buffer, row, column, width))

    def narrow(self, value):
        """A float64 value stored into the dtype's buffer (as Numba's store truncates)."""
        return value if value.type == self.dtype else self.b.fptrunc(value, self.dtype)

    def wide(self, value):
        return value if value.type == F64 else self.b.fpext(value, F64)

    def split(self, i, H, W) -> tuple:
        """``image_code._split``: ``(b, y, x)`` of row ``i`` of an ``(n·H·W, C)`` batch."""
        batch = self.div(i, H * W)
        r = self.sub(i, self.mul(batch, H * W))
        y = self.div(r, W)
        return batch, y, self.sub(r, self.mul(y, W))

    def zero(self, buffer, row, first, count: int, width: int):
        """``image_code._zero``: ``count`` entries of ``row`` from column ``first`` set to 0."""
        zero = ir.Constant(self.dtype, 0.0)
        for_range(self.b, count, lambda q: self.store(zero, buffer, row, self.add(first, q), width), "q")

    def if_else(self, condition, then, otherwise=None):
        if otherwise is None:
            with self.b.if_then(condition):
                then()
            return
        with self.b.if_else(condition) as (yes, no):
            with yes:
                then()
            with no:
                otherwise()

    def argmax(self, x: str, row0, c, best, arg=None):
        """``image_code._argmax``: the window's maximum into ``best`` and its first position into
        ``arg`` (a NaN wins: ``_v > _best or _v != _v``)."""
        b, g = self.b, self.g
        b.store(self.load(x, row0, c, g.C), best)
        if arg is not None:
            b.store(row0, arg)

        def entry(dy, dx):
            q = self.add(row0, self.mul(dy, g.W), dx)
            v = self.load(x, q, c, g.C)
            old = b.load(best)
            t = b.or_(b.fcmp_ordered(">", v, old), b.fcmp_unordered("uno", v, v))
            if arg is not None:
                b.store(b.select(t, q, b.load(arg)), arg)
            b.store(b.select(t, v, old), best)

        for_range(b, g.kh, lambda dy: for_range(b, g.kw, lambda dx: entry(dy, dx), "dx"), "dy")

    def pooled_pixel(self, i):
        """``image_code._pooled_pixel``: ``_row0``, the first pixel of output pixel ``i``'s window."""
        g = self.g
        batch, oy, ox = self.split(i, g.OH, g.OW)
        return self.add(self.mul(self.add(self.mul(batch, g.H), self.mul(oy, g.sh)), g.W), self.mul(ox, g.sw))

    def gradient(self, i, term):
        """``image_code._gradient``: zero row ``i`` (pixel ``(b, y, x)``), then ``term(src, oy, ox,
        batch, y, x)`` for every window ``src`` containing the pixel."""
        g, b = self.g, self.b
        batch, y, x = self.split(i, g.H, g.W)
        ranges = []
        for v, p, kk, s, o in ((y, g.pt, g.kh, g.sh, g.OH), (x, g.pl, g.kw, g.sw, g.OW)):
            a = self.add(v, p - kk + 1)
            first = b.select(b.icmp_signed(">", a, _int(0)), self.div(self.add(a, s - 1), s), _int(0))
            top = self.div(self.add(v, p), s)
            last = b.select(self.less(o - 1, top), _int(o - 1), top)  # min(o - 1, top)
            ranges.append((first, self.add(last, 1)))
        self.zero(self.k.out, i, 0, g.C, g.C)

        def window(oy, ox):
            src = self.add(self.mul(self.add(self.mul(batch, g.OH), oy), g.OW), ox)
            term(src, oy, ox, batch, y, x)

        (oy0, oy1), (ox0, ox1) = ranges
        for_range(b, oy1, lambda oy: for_range(b, ox1, lambda ox: window(oy, ox), "ox", ox0), "oy", oy0)

    def window_cell(self, i, write):
        """``image_code._window_cell``: zero window ``i``'s cell, then ``write(row0)``."""
        g, b = self.g, self.b
        batch, oy, ox = self.split(i, g.OH, g.OW)
        y0, x0 = self.mul(oy, g.sh), self.mul(ox, g.sw)
        y1 = b.select(b.icmp_signed("==", oy, _int(g.OH - 1)), _int(g.H), self.add(y0, g.sh))
        x1 = b.select(b.icmp_signed("==", ox, _int(g.OW - 1)), _int(g.W), self.add(x0, g.sw))

        def row(y):
            p = self.mul(self.add(self.mul(batch, g.H), y), g.W)
            for_range(b, x1, lambda x: self.zero(self.k.out, self.add(p, x), 0, g.C, g.C), "x", x0)

        for_range(b, y1, row, "y", y0)
        write(self.add(self.mul(self.add(self.mul(batch, g.H), y0), g.W), x0))


@llvm_code.emit.register
def _reshape(k: Reshape, frame: Frame) -> None:
    """``image_code._reshape`` walks the source entry by entry: the same row-major memory, so entry
    ``j`` of output row ``i`` is entry ``i·cols + j`` of the source, copied."""
    b = frame.b
    cols = frame.slots[0][2]
    source = _slot(k.operands[0].buffer)

    def row(i):
        start = b.mul(i, cols)
        for_range(b, cols, lambda j: b.store(b.load(frame.element(source, b.add(start, j))),
                                              frame.element(0, b.add(start, j))), "j")

    frame.each(row)


@llvm_code.emit.register
def _im2col(k: Im2Col, frame: Frame) -> None:
    m = Image(frame, k)
    g, b, out, x = m.g, m.b, k.out, k.operands[0].buffer
    rows_in, cols_in = _inside(g)
    span, width = g.kw * g.C, g.kh * g.kw * g.C

    def iteration(i):
        batch, oy, ox = m.split(i, g.OH, g.OW)
        ix0 = m.sub(m.mul(ox, g.sw), g.pl)

        def window_row(dy):
            iy = m.sub(m.add(m.mul(oy, g.sh), dy), g.pt)
            col = m.mul(dy, span)

            def copy():
                src = m.add(m.mul(m.add(m.mul(batch, g.H), iy), g.W), ix0)

                def pixel(dx):
                    first = m.add(col, m.mul(dx, g.C))
                    for_range(b, g.C, lambda c: m.store(m.load(x, m.add(src, dx), c, g.C), out, i, m.add(first, c),
                                                        width), "c")

                def column(dx):
                    if cols_in:
                        return pixel(dx)
                    ix = m.add(ix0, dx)
                    m.if_else(b.and_(b.icmp_signed(">=", ix, _int(0)), m.less(ix, g.W)), lambda: pixel(dx),
                              lambda: m.zero(out, i, m.add(col, m.mul(dx, g.C)), g.C, width))

                for_range(b, g.kw, column, "dx")

            if rows_in:
                copy()
            else:
                m.if_else(b.and_(b.icmp_signed(">=", iy, _int(0)), m.less(iy, g.H)), copy,
                          lambda: m.zero(out, i, col, span, width))

        for_range(b, g.kh, window_row, "dy")

    frame.each(iteration)


@llvm_code.emit.register
def _max_pool(k: MaxPool, frame: Frame) -> None:
    m = Image(frame, k)
    g, b, out, x = m.g, m.b, k.out, k.operands[0].buffer
    best = local(b, m.dtype, "best")

    def iteration(i):
        row0 = m.pooled_pixel(i)

        def channel(c):
            m.argmax(x, row0, c, best)
            m.store(b.load(best), out, i, c, g.C)

        for_range(b, g.C, channel, "c")

    frame.each(iteration)


@llvm_code.emit.register
def _avg_pool(k: AvgPool, frame: Frame) -> None:
    m = Image(frame, k)
    g, b, out, x = m.g, m.b, k.out, k.operands[0].buffer
    acc = local(b, F64, "acc")

    def iteration(i):
        row0 = m.pooled_pixel(i)

        def channel(c):
            b.store(ir.Constant(F64, 0.0), acc)

            def entry(dy, dx):
                v = m.wide(m.load(x, m.add(row0, m.mul(dy, g.W), dx), c, g.C))
                b.store(b.fadd(b.load(acc), v), acc)

            for_range(b, g.kh, lambda dy: for_range(b, g.kw, lambda dx: entry(dy, dx), "dx"), "dy")
            m.store(m.narrow(b.fdiv(b.load(acc), ir.Constant(F64, float(g.kh * g.kw)))), out, i, c, g.C)

        for_range(b, g.C, channel, "c")

    frame.each(iteration)


@llvm_code.emit.register
def _col2im(k: Col2Im, frame: Frame) -> None:
    m = Image(frame, k)
    g, b, out, cols = m.g, m.b, k.out, k.operands[0].buffer
    width = g.kh * g.kw * g.C

    def iteration(i):
        def term(src, oy, ox, batch, y, x):
            dy = m.sub(m.add(y, g.pt), m.mul(oy, g.sh))
            col = m.mul(m.add(m.mul(dy, g.kw), m.sub(m.add(x, g.pl), m.mul(ox, g.sw))), g.C)

            def channel(c):
                address = m.address(out, i, c, g.C)
                b.store(b.fadd(b.load(address), m.load(cols, src, m.add(col, c), width)), address)

            for_range(b, g.C, channel, "c")

        m.gradient(i, term)

    frame.each(iteration)


@llvm_code.emit.register
def _max_pool_grad(k: MaxPoolGrad, frame: Frame) -> None:
    """The window's gradient goes to its first arg-max."""
    m = Image(frame, k)
    g, b, out = m.g, m.b, k.out
    x, G = (o.buffer for o in k.operands)
    best, arg = local(b, m.dtype, "best"), local(b, I64, "arg")

    if _by_window(k):
        def iteration(i):
            def write(row0):
                def channel(c):
                    m.argmax(x, row0, c, best, arg)
                    m.store(m.load(G, i, c, g.C), out, b.load(arg), c, g.C)

                for_range(b, g.C, channel, "c")

            m.window_cell(i, write)
    else:
        def iteration(i):
            def term(src, oy, ox, batch, y, xx):
                row0 = m.add(m.mul(m.add(m.mul(batch, g.H), m.mul(oy, g.sh)), g.W), m.mul(ox, g.sw))

                def channel(c):
                    m.argmax(x, row0, c, best, arg)

                    def add():
                        address = m.address(out, i, c, g.C)
                        b.store(b.fadd(b.load(address), m.load(G, src, c, g.C)), address)

                    m.if_else(b.icmp_signed("==", b.load(arg), i), add)

                for_range(b, g.C, channel, "c")

            m.gradient(i, term)

    frame.each(iteration)


@llvm_code.emit.register
def _avg_pool_grad(k: AvgPoolGrad, frame: Frame) -> None:
    """The window's gradient shared evenly by its pixels (a float64 quotient, as Numba's)."""
    m = Image(frame, k)
    g, b, out, G = m.g, m.b, k.out, k.operands[0].buffer
    size = ir.Constant(F64, float(g.kh * g.kw))

    if _by_window(k):
        def iteration(i):
            def write(row0):
                def entry(dy, dx):
                    q = m.add(row0, m.mul(dy, g.W), dx)
                    for_range(b, g.C, lambda c: m.store(m.narrow(b.fdiv(m.wide(m.load(G, i, c, g.C)), size)),
                                                        out, q, c, g.C), "c")

                for_range(b, g.kh, lambda dy: for_range(b, g.kw, lambda dx: entry(dy, dx), "dx"), "dy")

            m.window_cell(i, write)
    else:
        def iteration(i):
            def term(src, oy, ox, batch, y, x):
                def channel(c):
                    address = m.address(out, i, c, g.C)
                    share = b.fdiv(m.wide(m.load(G, src, c, g.C)), size)
                    b.store(m.narrow(b.fadd(m.wide(b.load(address)), share)), address)

                for_range(b, g.C, channel, "c")

            m.gradient(i, term)

    frame.each(iteration)
