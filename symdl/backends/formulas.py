"""Kernels as formulas: a kernel with its buffers and sizes taken out.

Two kernels are *the same formula* when they differ only in which buffers they read
and write and in their sizes: every hidden layer's activation, every parameter's
optimizer update, every bias gradient's column sum. ``formula(kernel, program)``
returns that formula as a one-kernel ``Program`` whose buffers are *slots*
``s0, s1, ...`` (the output first, then the reads, then an update's other writes)
and whose sizes are symbols (``_rows0``, ``_cols0`` for slot 0's rows and columns,
``_size0, ...`` for a kernel's own shape fields), plus the actual buffers and sizes of
this use. A backend compiles each distinct formula once and calls it with the
buffers and sizes of every use, so compile time grows with the number of distinct
formulas, not with the depth of the network.

A size of 1 stays the literal 1 (a row vector is part of what a formula means), except
in a loop whose operands all have the output's shape and are read at ``(i, j)``: there
a bias's (1, k) update and a matrix's (r, k) one are one formula. Every matrix product
is one formula too: its orientation and ``alpha`` are ``constants`` of the use, not of
the formula (``cpu_gemm``).

>>> import symdl as sd
>>> from symdl.ir.lowering import lower
>>> x = sd.input("x", 2); W1 = sd.param("W1", (2, 3)); W2 = sd.param("W2", (3, 4))
>>> prog = lower({"h": sd.tanh(sd.tanh(x @ W1) @ W2)})
>>> f1, f2 = (formula(k, prog) for k in prog.kernels if isinstance(k, Elementwise))
>>> f1.program.kernels == f2.program.kernels, f1.slots, f2.slots
(True, ['t1', 't0'], ['h', 't2'])
>>> print(f1.program)
s0 (_rows0, _cols0) = elementwise[tanh(v0)](s1:ij)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import sympy as sp

from ..graph.nodes import INDEX_SYMBOLS, VARSET, n as N
from ..ir.kernels import BlockGemm, Elementwise, Gemm, Operand, Pattern, Program, Update


@dataclass
class Formula:
    """One use of a formula: the canonical one-kernel program, and what this use binds.

    ``slots[i]`` is the buffer bound to slot ``s{i}``; ``sizes`` are the values of the
    kernel's own size symbols (``size_symbols``, in order) as expressions in ``n``;
    ``scalars`` the free scalar symbols its bodies read (``n`` included; not the loop
    indices ``i, j``, which every backend's loop binds), by name; ``constants`` integers
    this use passes after them (a product's ``trans_a, trans_b`` and ``alpha``'s bits).
    """

    program: Program
    slots: list
    size_symbols: list
    sizes: list
    scalars: list
    constants: list = dataclasses.field(default_factory=list)

    @property
    def kernel(self):
        return self.program.kernels[0]

    @property
    def key(self) -> tuple:
        """What the formula's printed code depends on: equal keys, equal code (a backend prints
        each distinct formula once, however many kernels use it)."""
        kernel = self.kernel  # its fields are SymPy trees, strings, enums and tuples: hashable, compared by structure
        fields = tuple(getattr(kernel, f.name) for f in dataclasses.fields(kernel))
        shapes = tuple((b, tuple(sp.sympify(d) for d in s)) for b, s in sorted(self.program.buffers.items()))
        return type(kernel), fields, shapes, tuple(self.size_symbols), tuple(self.scalars), len(self.slots)


def slot(i: int) -> str:
    return f"s{i}"


def float_bits(value) -> int:
    """A number as the int64 holding its float64 bits (how a frame of int64 carries it)."""
    return int(np.array(float(value), np.float64).view(np.int64))


def _slot_buffers(kernel) -> list:
    names = [kernel.out] + [op.buffer for op in kernel.reads()]
    if isinstance(kernel, Update):
        names += [b for b, _ in kernel.writes]
    return list(dict.fromkeys(names))


def _rename(value, mapping: dict):
    """``value`` with every buffer name in ``mapping`` replaced (operands and tuples too)."""
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, Operand):
        return Operand(mapping.get(value.buffer, value.buffer), value.pattern)
    if isinstance(value, tuple):  # a tuple subclass (an image geometry) keeps its type
        return type(value)(tuple(_rename(v, mapping) for v in value))
    return value


def _is_size(value) -> bool:
    """A tuple of sizes (SymPy integers or expressions in ``n``), like a reduction's input shape."""
    return isinstance(value, tuple) and len(value) > 0 and all(
        isinstance(d, sp.Basic) and not (d.free_symbols - {N}) for d in value)


def runs_flat(kernel) -> bool:
    """A loop whose every operand has the output's shape (``Pattern.SAME``) and whose bodies
    do not read ``i, j``: its sizes are only a length (a 1 means nothing special), and a
    backend may run it as one flat loop over buffers viewed as vectors."""
    return isinstance(kernel, (Elementwise, Update)) and all(
        op.pattern == Pattern.SAME for op in kernel.reads()) and not any(
        sp.sympify(b).free_symbols & INDEX_SYMBOLS for b in kernel.bodies())


def _gemm_formula(kernel) -> Formula:
    """Every product as one formula: ``s0 = alpha*gemm(s1, s2)`` with the orientation and ``alpha``
    in this use's constants; every product within blocks (``BlockGemm``) another, with the
    block's rows last."""
    if sp.sympify(kernel.alpha).free_symbols:
        raise NotImplementedError(f"a matrix product with a symbolic alpha ({kernel.alpha}): {kernel}")
    shapes = {slot(i): (sp.Symbol(f"_rows{i}", integer=True, positive=True),
                        sp.Symbol(f"_cols{i}", integer=True, positive=True)) for i in range(3)}
    constants = [int(kernel.trans_a), int(kernel.trans_b), float_bits(kernel.alpha)]
    if isinstance(kernel, BlockGemm):
        canonical = BlockGemm(slot(0), slot(1), slot(2), False, False, (1, 1, 1))
        constants += [int(r) for r in kernel.rows]
    else:
        canonical = Gemm(slot(0), slot(1), slot(2), False, False)
    prog = Program(kernels=[canonical], buffers=shapes, inputs=[], params=[], outputs={})
    slots = [kernel.out, kernel.a, kernel.b]  # each has its place in the frame, even in x.T @ x
    return Formula(prog, slots, [], [], [], constants)


def formula(kernel, program: Program) -> Formula:
    """``kernel`` (of ``program``) as a formula over slots and size symbols."""
    if isinstance(kernel, (Gemm, BlockGemm)):
        return _gemm_formula(kernel)
    buffers = _slot_buffers(kernel)
    mapping = {b: slot(i) for i, b in enumerate(buffers)}
    keep_ones = not runs_flat(kernel)
    shapes = {}
    for i, b in enumerate(buffers):
        r, c = (sp.sympify(d) for d in program.shape_of(b))
        shapes[slot(i)] = (sp.Integer(1) if r == 1 and keep_ones else sp.Symbol(f"_rows{i}", integer=True, positive=True),
                           sp.Integer(1) if c == 1 and keep_ones else sp.Symbol(f"_cols{i}", integer=True, positive=True))
    size_symbols, sizes, changes = [], [], {}
    for field in dataclasses.fields(kernel):
        value = getattr(kernel, field.name)
        if field.name != "out" and _is_size(value):  # a kernel's own shape (a reduction's input)
            dims = []
            for d in value:
                d = sp.sympify(d)
                if d == 1:
                    dims.append(sp.Integer(1))
                else:
                    sym = sp.Symbol(f"_size{len(size_symbols)}", integer=True, positive=True)
                    size_symbols.append(sym)
                    sizes.append(d)
                    dims.append(sym)
            changes[field.name] = tuple(dims)
        else:
            changes[field.name] = _rename(value, mapping)
    canonical = dataclasses.replace(kernel, **changes)
    let_symbols = {s for s, _ in getattr(kernel, "lets", ())}
    scalars = {s for b in kernel.bodies() for s in sp.sympify(b).free_symbols} - VARSET - let_symbols - INDEX_SYMBOLS
    prog = Program(kernels=[canonical], buffers=shapes, inputs=[], params=[], outputs={})
    return Formula(prog, buffers, size_symbols, sizes, sorted(scalars, key=str))
