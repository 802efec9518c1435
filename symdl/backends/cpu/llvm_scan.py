"""The recurrence kernels (``ir.Scan``, ``ir.ScanGrad``) printed as LLVM IR.

Each handler follows the Python loops of ``scan_code.sequence_lines`` line by line: the kernel's
units are the sequences (``frame.each``); one sequence runs its steps in order; at each step and
unit the cell's formulas (the backward: their ``sp.diff``, ``scan_code.backward_exprs``) are
printed by ``llvm_code.Body``. The recurrent product is a loop accumulating in float64, as the
Python loop's ``0.0`` accumulator does. The first step reads no previous row: its count and
previous states are ``select``ed to zero (never a load before the buffer).

Importing this module registers the handlers in ``llvm_code.emit`` (``cpu.backend`` does).
"""
from __future__ import annotations

from llvmlite import ir

from ...graph.nodes import VARS
from ...ir.kernels import Scan, ScanGrad
from ..scalar_code import prepared
from ..scan_code import _delta_symbols, backward_exprs
from . import llvm_code
from .llvm_code import F64, I64, Frame, for_range, local

_slot = llvm_code._slot


def _reassociable(instruction):
    """A dot product's multiply or add marked ``reassoc contract``: LLVM may then sum it in vector lanes
    (and fuse into FMAs), which a strict left-to-right sum forbids. Every thread runs the same code,
    so results stay identical across thread counts; they differ from a serial sum by rounding only."""
    instruction.flags.extend(["reassoc", "contract"])
    return instruction


def _const(v) -> ir.Constant:
    return ir.Constant(I64, v)


class _Scan:
    """What both kernels read: slots, sizes and the rows of step ``t`` of sequence ``i``."""

    def __init__(self, k, frame: Frame, U_at: int, B_at: int):
        self.k, self.frame, self.b = k, frame, frame.b
        self.T = frame.size(k.steps[0])
        self.U = _slot(k.operands[U_at].buffer)
        self.u = frame.slots[self.U][1 if isinstance(k, ScanGrad) else 2]  # a Scan reads Uᵀ (k·u, u)
        self.B = _slot(k.operands[B_at].buffer) if len(k.operands) > B_at else None
        self.zero = llvm_code._const(frame.dtype, 0.0)
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

    def to_work(self, v):
        return v if v.type == self.frame.dtype else self.b.fptrunc(v, self.frame.dtype)


@llvm_code.emit.register
def _scan(k: Scan, frame: Frame) -> None:
    s = _Scan(k, frame, 1, 2)
    b, kk, states = s.b, k.gates, k.states
    XP, out = _slot(k.operands[0].buffer), 0
    accs = [local(b, F64, f"a{g}") for g in range(kk)]
    cell = [prepared(c) for c in k.cell]

    def sequence(i):
        def step(t):
            ri, ro, rp, first = s.rows(i, t)

            def unit(j):
                env = {}
                for g in range(kk):
                    x = s.load(XP, ri, s.column(g, j))
                    if s.B is not None:
                        x = b.fadd(x, s.bias(0, g, j))
                    env[VARS[g]] = x
                    start = s.recurrent_bias(g, j)
                    b.store(start if start.type == F64 else b.fpext(start, F64), accs[g])
                count = b.select(first, _const(0), s.u)

                def product(m):
                    h = s.load(out, rp, m)
                    h64 = h if h.type == F64 else b.fpext(h, F64)
                    for g in range(kk):
                        w = s.load(s.U, s.column(g, j), m)  # Uᵀ: a contiguous row per gate column
                        w64 = w if w.type == F64 else b.fpext(w, F64)
                        b.store(_reassociable(b.fadd(b.load(accs[g]), _reassociable(b.fmul(h64, w64)))), accs[g])

                for_range(b, count, product, "m")
                for g in range(kk):
                    env[VARS[kk + g]] = s.to_work(b.load(accs[g]))
                for c in range(states):
                    env[VARS[2 * kk + c]] = b.select(first, s.zero, s.load(out, rp, s.column(c, j)))
                body = llvm_code._body(frame, env)
                values = [body.value(e) for e in cell]
                for c, v in enumerate(values):
                    llvm_code._store(frame, body, v, frame.at(out, ro, s.column(c, j)))

            for_range(b, s.u, unit, "j")

        for_range(b, s.T, step, "t")

    frame.each(sequence)


@llvm_code.emit.register
def _scan_grad(k: ScanGrad, frame: Frame) -> None:
    s = _Scan(k, frame, 4, 5)
    b, kk, states = s.b, k.gates, k.states
    XP, UP, S, G = (_slot(o.buffer) for o in k.operands[:4])
    out = 0
    dx, du, carry = ([prepared(e) for e in part] for part in backward_exprs(k))
    deltas = _delta_symbols(states)
    acc = local(b, F64, "acc")
    ku = b.mul(_const(kk), s.u)
    w2 = b.mul(_const(2 * kk), s.u)

    def sequence(i):
        def step(tt):
            t = b.sub(b.sub(s.T, _const(1)), tt)
            ri, ro, rp, first = s.rows(i, t)
            last = b.icmp_signed("==", tt, _const(0))

            def unit(j):
                env = {}
                for g in range(kk):
                    x = s.load(XP, ri, s.column(g, j))
                    up = s.load(UP, ro, s.column(g, j))
                    if s.B is not None:
                        x = b.fadd(x, s.bias(0, g, j))
                    if s.B is not None:
                        up = b.fadd(up, s.recurrent_bias(g, j))
                    env[VARS[g]], env[VARS[kk + g]] = x, up
                for c in range(states):
                    env[VARS[2 * kk + c]] = b.select(first, s.zero, s.load(S, rp, s.column(c, j)))
                for c in range(states):
                    where = frame.at(out, ro, b.add(w2, s.column(c, j)))
                    d = s.load(G, ro, s.column(c, j))
                    d = b.select(last, d, b.fadd(d, b.load(where)))  # the carry the next step stored
                    b.store(d, where)
                    env[deltas[c]] = d
                body = llvm_code._body(frame, env)
                vx, vu, vc = ([body.value(e) for e in part] for part in (dx, du, carry))
                for g in range(kk):
                    llvm_code._store(frame, body, vx[g], frame.at(out, ri, s.column(g, j)))
                    llvm_code._store(frame, body, vu[g], frame.at(out, ro, b.add(ku, s.column(g, j))))
                with b.if_then(b.not_(first)):
                    for c in range(states):
                        llvm_code._store(frame, body, vc[c], frame.at(out, rp, b.add(w2, s.column(c, j))))

            for_range(b, s.u, unit, "j")

            def back_into_h(j):  # h_{t-1} feeds every recurrent gate of step t: δUP_t Uᵀ
                b.store(ir.Constant(F64, 0.0), acc)

                def term(m):
                    a = s.load(out, ro, b.add(ku, m))
                    w = s.load(s.U, j, m)
                    a64 = a if a.type == F64 else b.fpext(a, F64)
                    w64 = w if w.type == F64 else b.fpext(w, F64)
                    b.store(_reassociable(b.fadd(b.load(acc), _reassociable(b.fmul(a64, w64)))), acc)

                for_range(b, ku, term, "m")
                where = frame.at(out, rp, b.add(w2, j))
                old = b.load(where)
                total = b.fadd(old if old.type == F64 else b.fpext(old, F64), b.load(acc))
                b.store(s.to_work(total), where)

            with b.if_then(b.not_(first)):
                for_range(b, s.u, back_into_h, "jh")

        for_range(b, s.T, step, "tt")

    frame.each(sequence)
