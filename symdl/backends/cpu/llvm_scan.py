"""The recurrence kernels (``ir.Scan``, ``ir.ScanGrad``) printed as LLVM IR.

The kernels compute what the Python loops of ``scan_code.sequence_lines`` compute, in another
order: the kernel's units are still the sequences (``frame.each``: a thread's share), but the steps
are the outer loop and, at each step, the recurrent product of all the thread's sequences runs in
*tiles*: ``R`` sequences against the ``k`` gate columns of one unit (the forward ``UP_t = h_{t-1} U``)
or against ``C`` units (the backward ``δh_{t-1} += δUP_t Uᵀ``), each entry a dot product in vector
lanes (``_Dots``). A tile reads each row of ``U`` once for ``R`` sequences and each state row once
for ``k`` columns: about a GEMM's work per load, where one sequence at a time read all of ``U`` for
every row. Then, per unit, the cell's formulas (the backward: their ``sp.diff``,
``scan_code.backward_exprs``) are printed by ``llvm_code.Body``.

Every entry of a product is the same chain whatever tile computes it (a lane-wise ``fma`` over the
chunks of ``V`` entries, one fixed tree over the lanes, then the last ``K mod V`` terms in order), so a
sequence's bits do not depend on how the threads split the sequences. The first step reads no
previous row: its product has no terms and its previous states are ``select``ed to zero (never a
load before the buffer).

Importing this module registers the handlers in ``llvm_code.emit`` (``cpu.backend`` does).
"""
from __future__ import annotations

from llvmlite import ir

from ...graph.nodes import VARS
from ...ir.kernels import Scan, ScanGrad
from ..scalar_code import prepared
from ..scan_code import _delta_symbols, backward_exprs, extras_exprs, extras_of
from . import llvm_code
from .llvm_code import F32, F64, I64, Frame, for_range, local

_slot = llvm_code._slot


#: Bytes in a vector register the dot products fill (AVX2's 256 bits; wider machines run them as is).
VECTOR_BYTES = 32

#: A forward tile's sequences: its ``R·k`` accumulators (``k`` gates) stay in registers up to ``R·k = 8``.
FORWARD_TILE = 8

#: A backward tile: ``BACKWARD_ROWS`` sequences x ``BACKWARD_UNITS`` units.
BACKWARD_ROWS, BACKWARD_UNITS = 2, 4


def _const(v) -> ir.Constant:
    return ir.Constant(I64, v)


class _Dots:
    """Tiles of dot products ``out[r][c] = Σ_q a_r[q] b_c[q]`` over ``K`` contiguous entries: ``V``
    lanes of ``fma`` over the chunks, one fixed tree over the lanes, then the last ``K mod V`` terms
    in order. Every entry is the same chain in any tile: results do not depend on the tiling."""

    def __init__(self, b: ir.IRBuilder, dtype: ir.Type):
        self.b, self.t = b, dtype
        self.V = VECTOR_BYTES // (4 if dtype == F32 else 8)
        self.vt = ir.VectorType(dtype, self.V)
        kind = "f32" if dtype == F32 else "f64"
        self.fma_vector, self.fma_scalar = f"llvm.fma.v{self.V}{kind}", f"llvm.fma.{kind}"
        self.size = 4 if dtype == F32 else 8

    def load(self, pointer):
        return self.b.load(self.b.bitcast(pointer, self.vt.as_pointer()), align=self.size)

    def _half(self, v, lanes, upper):
        mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [upper * lanes + i for i in range(lanes)])
        return self.b.shuffle_vector(v, v, mask)

    def total(self, v):
        """The lanes' sum: halves added until one lane is left (a fixed tree)."""
        b, lanes = self.b, self.V
        while lanes > 1:
            lanes //= 2
            v = b.fadd(self._half(v, lanes, 0), self._half(v, lanes, 1))
        return b.extract_element(v, _const(0))

    def tile(self, K, rows_a, rows_b, name: str) -> list:
        """``[[Σ_q a_r[q] b_c[q] for c] for r]``: ``rows_a``, ``rows_b`` pointers to each row's first entry."""
        b, V = self.b, self.V
        accs = [[local(b, self.vt, f"{name}{r}.{c}") for c in range(len(rows_b))] for r in range(len(rows_a))]
        for row in accs:
            for acc in row:
                b.store(ir.Constant(self.vt, None), acc)
        chunks = b.sdiv(K, _const(V))

        def chunk(q):
            at = b.mul(q, _const(V))
            av = [self.load(b.gep(p, [at])) for p in rows_a]
            bv = [self.load(b.gep(p, [at])) for p in rows_b]
            for r, row in enumerate(accs):
                for c, acc in enumerate(row):
                    b.store(llvm_code.call(b, self.fma_vector, [av[r], bv[c], b.load(acc)], self.vt), acc)

        for_range(b, chunks, chunk, name + "q")
        sums = [[local(b, self.t, f"{name}s{r}.{c}") for c in range(len(rows_b))] for r in range(len(rows_a))]
        for r, row in enumerate(accs):
            for c, acc in enumerate(row):
                b.store(self.total(b.load(acc)), sums[r][c])

        def tail(q):
            av = [b.load(b.gep(p, [q])) for p in rows_a]
            bv = [b.load(b.gep(p, [q])) for p in rows_b]
            for r, row in enumerate(sums):
                for c, acc in enumerate(row):
                    b.store(llvm_code.call(b, self.fma_scalar, [av[r], bv[c], b.load(acc)], self.t), acc)

        for_range(b, K, tail, name + "t", first=b.mul(chunks, _const(V)))
        return [[b.load(acc) for acc in row] for row in sums]


class _Scan:
    """What both kernels read: slots, sizes and the rows of step ``t`` of sequence ``i``."""

    def __init__(self, k, frame: Frame, U_at: int, B_at: int):
        self.k, self.frame, self.b = k, frame, frame.b
        self.T = frame.size(k.steps[0])
        self.U = _slot(k.operands[U_at].buffer)
        self.u = frame.slots[self.U][1 if isinstance(k, ScanGrad) else 2]  # a Scan reads Uᵀ (k·u, u)
        optional = k.optional()
        self.B = _slot(optional["B"].buffer) if optional["B"] is not None else None
        # extra per-step inputs (a tangent scan's): EI read at the step's input row, EO at its output row
        self.EI = _slot(optional["EI"].buffer) if optional["EI"] is not None else None
        self.EO = _slot(optional["EO"].buffer) if optional["EO"] is not None else None
        self.zero = llvm_code._const(frame.dtype, 0.0)
        self.dots = _Dots(frame.b, frame.dtype)
        # a bias of two rows adds its second to the recurrent gates (the formula's rows are a runtime
        # value: row 1 is read only when there is one, and selected away otherwise)
        self.two = None
        if self.B is not None:
            self.two = self.b.icmp_signed("==", frame.slots[self.B][1], _const(2))
            self.recurrent_row = self.b.select(self.two, _const(1), _const(0))

    def rows(self, i, t):
        b, T = self.b, self.T
        base = b.mul(i, T)
        back = b.sub(b.sub(T, _const(1)), t)
        ri = b.add(base, back if self.k.reverse_in else t)
        ro = b.add(base, back if self.k.reverse_out else t)
        rp = b.add(ro, _const(1)) if self.k.reverse_out else b.sub(ro, _const(1))
        first = b.icmp_signed("==", t, _const(0))
        return ri, ro, b.select(first, ro, rp), first

    def column(self, g, j):
        return self.b.add(self.b.mul(_const(g), self.u), j)

    def load(self, slot, r, c):
        return self.b.load(self.frame.at(slot, r, c))

    def bias(self, row, g, j):
        return self.load(self.B, _const(row), self.column(g, j))

    def recurrent_bias(self, g, j):
        """Row 1 of a two-row bias, else zero."""
        if self.B is None:
            return self.zero
        return self.b.select(self.two, self.load(self.B, self.recurrent_row, self.column(g, j)), self.zero)

    def extra_rows(self, ri, ro) -> list:
        """Pointers to the step's rows of the extras present (``EI`` at ``ri``, ``EO`` at ``ro``)."""
        return [self.frame.at(slot, r, _const(0)) for slot, r in ((self.EI, ri), (self.EO, ro)) if slot is not None]

    def zeros_and_bias_rows(self, ku, states: int) -> tuple:
        """``(zeros, bx, bu)``: ``k·u + s·u`` zeros (the first step's previous states, a missing bias),
        and the rows the cell adds to its input and recurrent gates (bias rows 0 and 1, or zeros)."""
        b, frame = self.b, self.frame
        zeros = _zeros(b, frame.dtype, b.add(ku, b.mul(_const(states), self.u)))
        if self.B is None:
            return zeros, zeros, zeros
        return (zeros, frame.at(self.B, _const(0), _const(0)),
                b.select(self.two, frame.at(self.B, _const(1), _const(0)), zeros))

    def tiles(self, size: int, body) -> None:
        """The thread's sequences ``begin:end`` in tiles of ``size``: ``body(first sequence, count)``."""
        b, begin, end = self.b, self.frame.begin, self.frame.end
        count = b.sub(end, begin)
        tiles = b.sdiv(b.add(count, _const(size - 1)), _const(size))

        def tile(q):
            r0 = b.add(begin, b.mul(q, _const(size)))
            left = b.sub(end, r0)
            body(r0, b.select(b.icmp_signed("<", left, _const(size)), left, _const(size)))

        for_range(b, tiles, tile, "tile")

    def full_or_single(self, count, size: int, whole, one) -> None:
        """``whole()`` when ``count == size`` (the tile is full), else ``one(r)`` for each ``r < count``."""
        b = self.b
        with b.if_else(b.icmp_signed("==", count, _const(size))) as (then, otherwise):
            with then:
                whole()
            with otherwise:
                for_range(b, count, one, "single")


def _row_function(b: ir.IRBuilder, name: str, dtype: ir.Type, pointers: int, integers: int) -> tuple:
    """``(function, builder)``: an internal function of ``b``'s module over ``pointers`` rows (each
    ``noalias``: the rows a kernel passes never overlap, so LLVM vectorises the loop over the units
    without runtime checks, which it would otherwise hoist over every row and fail) and ``integers``
    ``i64`` values."""
    t = ir.FunctionType(ir.VoidType(), [dtype.as_pointer()] * pointers + [I64] * integers)
    fn = ir.Function(b.module, t, name)
    fn.linkage = "internal"
    for a in fn.args[:pointers]:
        a.add_attribute("noalias")
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


def _zeros(b: ir.IRBuilder, dtype: ir.Type, count):
    """``count`` zeros on the stack (what the first step reads as its previous states, and a row the
    first step's carry is written to and never read)."""
    zeros = b.alloca(dtype, size=count, name="zeros")
    for_range(b, count, lambda j: b.store(llvm_code._const(dtype, 0.0), b.gep(zeros, [j])), "z")
    return zeros


def _extras(k) -> list:
    """``[(first variable, count)]`` of the extra inputs present: ``EI``'s, then ``EO``'s."""
    return [(first, count) for _, first, count, _ in extras_of(k)]


def _extras_env(fb: ir.IRBuilder, extras, rows, at) -> dict:
    """The extras' variables of one unit: extra ``m`` of a row at column ``m·u + j`` (``at(m)``)."""
    return {VARS[first + m]: fb.load(fb.gep(row, [at(m)])) for (first, count), row in zip(extras, rows)
            for m in range(count)}


def _unit_env(fb: ir.IRBuilder, k, u, j, xp, bx, up, bu, prev, extras, rows) -> tuple:
    """``(at, env)``: column ``g·u + j`` of a row (``at(g)``), and the cell's variables at unit ``j``: the
    input gates ``xp + bx``, the recurrent gates ``up + bu``, the previous states and the extras."""
    kk = k.gates
    at = lambda g: fb.add(fb.mul(_const(g), u), j)  # noqa: E731
    read = lambda row, g: fb.load(fb.gep(row, [at(g)]))  # noqa: E731
    env = {VARS[g]: fb.fadd(read(xp, g), read(bx, g)) for g in range(kk)}
    env.update({VARS[kk + g]: fb.fadd(read(up, g), read(bu, g)) for g in range(kk)})
    env.update({VARS[2 * kk + c]: read(prev, c) for c in range(k.states)})
    env.update(_extras_env(fb, extras, rows, at))
    return at, env


def _forward_cell(k, b: ir.IRBuilder, dtype: ir.Type):
    """``cell(xp, gates, bx, bu, prev, out[, ei][, eo], u)``: one sequence's step, every unit: input gates
    ``xp[g·u + j] + bx[..]``, recurrent gates ``gates[..] + bu[..]``, previous states ``prev[c·u + j]``,
    the extras ``ei[m·u + j]``, ``eo[m·u + j]``, new states into ``out[c·u + j]``."""
    extras = _extras(k)
    fn, fb = _row_function(b, "symdl_scan_cell", dtype, 6 + len(extras), 1)
    xp, gates, bx, bu, prev, out = fn.args[:6]
    rows, u = fn.args[6:-1], fn.args[-1]
    cell = [prepared(c) for c in k.cell]

    def unit(j):
        at, env = _unit_env(fb, k, u, j, xp, bx, gates, bu, prev, extras, rows)
        body = llvm_code.Body(fb, dtype, env)
        for c, e in enumerate(cell):
            fb.store(body.cast(body.value(e), dtype), fb.gep(out, [at(c)]))

    for_range(fb, u, unit, "j")
    fb.ret_void()
    return fn


def _backward_cell(k, b: ir.IRBuilder, dtype: ir.Type):
    """``cell(xp, bx, up, bu, prev, g, dxp, dup, ds, carry[, ei, dei][, eo, deo], u, last)``: one
    sequence's step backwards, every unit: ``δS = G + ds`` (the carry the next step stored there,
    unless ``last``) back into ``ds``, then ``δXP``, ``δUP``, the carry into the previous step's
    states and the extras' δ."""
    states = k.states
    extras = _extras(k)
    fn, fb = _row_function(b, "symdl_scan_grad_cell", dtype, 10 + 2 * len(extras), 2)
    xp, bx, up, bu, prev, g_row, dxp, dup, ds, carry = fn.args[:10]
    rows, u, last = fn.args[10:-2], fn.args[-2], fn.args[-1]
    dx, du, back = ([prepared(e) for e in part] for part in backward_exprs(k))
    dextra = [prepared(e) for e in extras_exprs(k)]
    outputs = [(dx, dxp), (du, dup), (back, carry)]
    done = 0
    for (first, count), row in zip(extras, rows[1::2]):
        outputs.append((dextra[done: done + count], row))
        done += count
    deltas = _delta_symbols(states)
    is_last = fb.icmp_signed("!=", last, _const(0))

    def unit(j):
        at, env = _unit_env(fb, k, u, j, xp, bx, up, bu, prev, extras, rows[0::2])
        for c in range(states):
            where = fb.gep(ds, [at(c)])
            d = fb.load(fb.gep(g_row, [at(c)]))
            d = fb.select(is_last, d, fb.fadd(d, fb.load(where)))
            fb.store(d, where)
            env[deltas[c]] = d
        body = llvm_code.Body(fb, dtype, env)
        for part, row in outputs:
            for c, e in enumerate(part):
                fb.store(body.cast(body.value(e), dtype), fb.gep(row, [at(c)]))

    for_range(fb, u, unit, "j")
    fb.ret_void()
    return fn


@llvm_code.emit.register
def _scan(k: Scan, frame: Frame) -> None:
    s = _Scan(k, frame, 1, 2)
    b, kk, states = s.b, k.gates, k.states
    XP, out = _slot(k.operands[0].buffer), 0
    R = max(1, FORWARD_TILE // kk)
    ku = b.mul(_const(kk), s.u)
    up = b.alloca(frame.dtype, size=b.mul(_const(R), ku), name="up")  # a tile's recurrent gates: up[r·k·u + c]
    zeros, bx, bu = s.zeros_and_bias_rows(ku, states)
    cell = _forward_cell(k, b, frame.dtype)

    def step(t):
        first = b.icmp_signed("==", t, _const(0))
        K = b.select(first, _const(0), s.u)  # the first step's product has no terms

        def tile(r0, count):
            def product(rows, j, at):  # UP_t[i, g·u + j] = h_{t-1}[i] · Uᵀ[g·u + j] for the tile's rows
                rows_a = [frame.at(out, s.rows(i, t)[2], _const(0)) for i in rows]
                rows_b = [frame.at(s.U, s.column(g, j), _const(0)) for g in range(kk)]
                for r, values in enumerate(s.dots.tile(K, rows_a, rows_b, "up")):
                    for g, v in enumerate(values):
                        b.store(v, b.gep(up, [b.add(b.mul(at(r), ku), s.column(g, j))]))

            def unit(j):
                s.full_or_single(count, R, lambda: product([b.add(r0, _const(r)) for r in range(R)], j,
                                                           lambda r: _const(r)),
                                 lambda r: product([b.add(r0, r)], j, lambda _: r))

            for_range(b, s.u, unit, "j")

            def row(r):  # the cell on every unit of one sequence
                ri, ro, rp, _ = s.rows(b.add(r0, r), t)
                prev = b.select(first, zeros, frame.at(out, rp, _const(0)))
                b.call(cell, [frame.at(XP, ri, _const(0)), b.gep(up, [b.mul(r, ku)]), bx, bu, prev,
                              frame.at(out, ro, _const(0)), *s.extra_rows(ri, ro), s.u])

            for_range(b, count, row, "r")

        s.tiles(R, tile)

    for_range(b, s.T, step, "t")


@llvm_code.emit.register
def _scan_grad(k: ScanGrad, frame: Frame) -> None:
    s = _Scan(k, frame, 4, 5)
    b, kk, states = s.b, k.gates, k.states
    XP, UP, S, G = (_slot(o.buffer) for o in k.operands[:4])
    out = 0
    ku = b.mul(_const(kk), s.u)
    w2 = b.mul(_const(2 * kk), s.u)
    ws = b.mul(_const(2 * kk + states), s.u)  # δEI's first column, then δEO's
    wo = b.mul(_const(2 * kk + states + k.extras_in), s.u)
    R, C = BACKWARD_ROWS, BACKWARD_UNITS
    zeros, bx, bu = s.zeros_and_bias_rows(ku, states)
    sink = b.alloca(frame.dtype, size=b.mul(_const(states), s.u), name="sink")  # the first step's carry
    cell = _backward_cell(k, b, frame.dtype)

    def step(tt):
        t = b.sub(b.sub(s.T, _const(1)), tt)
        last = b.zext(b.icmp_signed("==", tt, _const(0)), I64)

        def sequence(i):
            ri, ro, rp, first = s.rows(i, t)
            row = lambda slot, r, c=_const(0): frame.at(slot, r, c)  # noqa: E731
            extras = []  # each extra's row, then where its δ goes: [δEI | δEO] after [δXP | δUP | δS]
            for slot, r, at in ((s.EI, ri, ws), (s.EO, ro, wo)):
                if slot is not None:
                    extras += [row(slot, r), row(out, r, at)]
            b.call(cell, [row(XP, ri), bx, row(UP, ro), bu, b.select(first, zeros, row(S, rp)), row(G, ro),
                          row(out, ri), row(out, ro, ku), row(out, ro, w2),
                          b.select(first, sink, row(out, rp, w2)), *extras, s.u, last])

        frame.each(sequence)

        # h_{t-1} feeds every recurrent gate of step t: δh_{t-1} += δUP_t Uᵀ, in tiles of R sequences x C units
        def tile(r0, count):
            def product(rows, j0, units):
                rows_a = [frame.at(out, s.rows(i, t)[1], ku) for i in rows]
                rows_b = [frame.at(s.U, b.add(j0, _const(c)), _const(0)) for c in range(units)]
                for i, values in zip(rows, s.dots.tile(ku, rows_a, rows_b, "dh")):
                    rp = s.rows(i, t)[2]
                    for c, v in enumerate(values):
                        where = frame.at(out, rp, b.add(w2, b.add(j0, _const(c))))
                        b.store(b.fadd(b.load(where), v), where)

            def units(jt):
                j0 = b.mul(jt, _const(C))
                whole = b.and_(b.icmp_signed("==", count, _const(R)), b.icmp_signed("<=", b.add(j0, _const(C)), s.u))
                with b.if_else(whole) as (then, otherwise):
                    with then:
                        product([b.add(r0, _const(r)) for r in range(R)], j0, C)
                    with otherwise:  # the last rows or units: one entry at a time, the same chain
                        width = b.sub(s.u, j0)
                        width = b.select(b.icmp_signed("<", width, _const(C)), width, _const(C))
                        for_range(b, count, lambda r: for_range(
                            b, width, lambda c: product([b.add(r0, r)], b.add(j0, c), 1), "c"), "r")

            for_range(b, b.sdiv(b.add(s.u, _const(C - 1)), _const(C)), units, "jt")

        with b.if_then(b.icmp_signed("!=", t, _const(0))):
            s.tiles(R, tile)

    for_range(b, s.T, step, "tt")
