"""The embedding kernels (``ir.Gather``, ``ir.ScatterAdd``) and the column copy (``ir.ColumnCopy``)
printed as LLVM IR.

Each handler follows its Python loop in ``cpu.backend`` (``_gather``, ``_scatter_add``) line by
line: the same iterations, an id read as the float it is stored as and truncated to an ``i64``
(``fptosi``, Python's ``int``), rows copied or added in the buffer's dtype in the same order. The
results are those of the Python loop, to the bit.

* ``Gather``: iteration ``i`` (units: the output's rows) copies row ``ids[i]`` of the table;
* ``ScatterAdd``: units are the output's columns ``begin:end``; the call zeroes them, then adds row
  ``i`` of ``G`` into row ``ids[i]`` for every ``i`` in order, so a repeated id accumulates and no
  two threads write one entry.

Importing this module registers the handlers in ``llvm_code.emit`` (``cpu.backend`` does).

>>> import symdl as sd
>>> from symdl.ir.lowering import lower
>>> from symdl.backends.formulas import formula
>>> from symdl.ops.embedding import embedding
>>> ids = sd.input("ids", (3,), dtype="int32"); E = sd.param("E", (5, 2))
>>> prog = lower({"h": embedding(E, ids)})
>>> text = llvm_code.kernel_ir(formula(prog.kernels[0], prog), "float64")
>>> "fptosi double" in text, "call" in text
(True, False)
"""
from __future__ import annotations

from llvmlite import ir

from ...ir.kernels import ColumnCopy, Gather, ScatterAdd
from . import llvm_code
from .llvm_code import I64, Frame, for_range

_slot = llvm_code._slot


def _id(frame: Frame, slot: int, i):
    """Row ``i``'s id (column 0 of an ``(R, 1)`` slot) as an ``i64``, truncated as Python's ``int``."""
    return frame.b.fptosi(frame.b.load(frame.at(slot, i, I64(0))), I64)


@llvm_code.emit.register
def _gather(k: Gather, frame: Frame) -> None:
    b = frame.b
    table, ids = (_slot(o.buffer) for o in k.operands)
    cols = frame.slots[0][2]

    def row(i):
        r = _id(frame, ids, i)
        for_range(b, cols, lambda j: b.store(b.load(frame.at(table, r, j)), frame.at(0, i, j)), "j")

    frame.each(row)


@llvm_code.emit.register
def _scatter_add(k: ScatterAdd, frame: Frame) -> None:
    b = frame.b
    ids, G = (_slot(o.buffer) for o in k.operands)
    vocab, rows = frame.slots[0][1], frame.slots[G][1]
    begin, end = frame.begin, frame.end
    zero = llvm_code._const(frame.dtype, 0.0)
    for_range(b, vocab, lambda v: for_range(b, end, lambda j: b.store(zero, frame.at(0, v, j)), "j0", first=begin),
              "v")

    def add_row(i):
        r = _id(frame, ids, i)

        def add(j):
            address = frame.at(0, r, j)
            b.store(b.fadd(b.load(address), b.load(frame.at(G, i, j))), address)

        for_range(b, end, add, "j", first=begin)

    for_range(b, rows, add_row)


def _copy(b, target, source, size: int) -> None:
    """``size`` bytes from ``source`` to ``target`` (two buffers of a program never overlap) as
    ``llvm.memcpy`` of a constant size, which LLVM inlines as vector moves: the same copy as a
    loop of loads and stores ran one float at a time (LLVM must assume the two may overlap)."""
    i8p = ir.IntType(8).as_pointer()
    llvm_code.call(b, "llvm.memcpy.p0i8.p0i8.i64", [b.bitcast(target, i8p), b.bitcast(source, i8p), I64(size),
                                                     ir.Constant(ir.IntType(1), 0)], ir.VoidType())


@llvm_code.emit.register
def _column_copy(k: ColumnCopy, frame: Frame) -> None:
    """Row ``i`` (units: the rows): columns ``start..`` of ``x`` copied to ``at..``, the columns before
    and after them zeroed: the values of ``cpu.backend._column_copy``'s loops, without writing the
    copied columns twice (a head's slice, ``at`` 0 and as wide as the output, zeroes nothing: its rows
    were a zeroing call and a copy each, 9 µs for 768 rows of 32)."""
    b = frame.b
    x = _slot(k.operands[0].buffer)
    cols = frame.slots[0][2]
    zero = llvm_code._const(frame.dtype, 0.0)

    def row(i):
        if k.at:
            for_range(b, I64(k.at), lambda j: b.store(zero, frame.at(0, i, j)), "j0")
        _copy(b, frame.at(0, i, I64(k.at)), frame.at(x, i, I64(k.start)), k.width * (4 if frame.dtype == llvm_code.F32 else 8))
        for_range(b, cols, lambda j: b.store(zero, frame.at(0, i, j)), "j1", first=I64(k.at + k.width))

    frame.each(row)
