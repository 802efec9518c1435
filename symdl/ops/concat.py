"""Concatenation along the columns (features, or the channels of an image batch), its split and its
zero-padding: three nodes that fill every rule table.

* ``concat(a, b, ...)``: the columns side by side; its VJP splits δ (``cols(δ, lo, hi)``), its
  tangent is the concat of the tangents.
* ``cols(x, lo, hi)``: columns ``lo..hi-1``; its adjoint ``place(G, lo, width)`` puts ``G`` at
  columns ``lo..`` of a ``width``-wide zero matrix, whose adjoint is ``cols`` again.

``cols`` and ``place`` lower to one ``ir.ColumnCopy`` each (a row loop: the slice copied, the
other columns zero); ``concat`` is the sum of its parts ``place``d (one fused elementwise sum).
Everything is linear in the entries (no products with selection matrices).

>>> import symdl as sd
>>> a = sd.input("a", 2); b = sd.input("b", 3)
>>> c = concat(a, b); c.shape
(n, 5)
>>> g = sd.grad(sd.sum_squares(c), [a, b]); print(g[a]); print(g[b])
cols(2*(concat(a, b)), 0, 2)
cols(2*(concat(a, b)), 2, 5)
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.precedence import PRECEDENCE
from sympy.matrices.expressions import MatrixExpr

from ..autodiff.jvp import JVP, linear_in_first_operand
from ..autodiff.vjp import VJP
from ..graph.nodes import PRINT_RULES, VARS, n as N, Ops, Printable, ShapeMismatch, make_map, name_of, shape_text
from ..ir import kernels as ir
from ..ir.kernels import Operand
from ..ir.lowering import LOWER, lower_expansion
from .conv import _entry_of, image_shape


def _ints(*values):
    return tuple(int(v) for v in values)


class Concat(Printable, Ops, MatrixExpr):
    """``concat(a, b, ...)``: the operands' columns side by side (equal rows)."""

    precedence = PRECEDENCE["Atom"]
    notation = "concat(A, B): the columns of A then those of B (δ splits: cols(δ, lo, hi) is each part's)"

    @property
    def shape(self):
        return (self.args[0].shape[0], sum((a.shape[1] for a in self.args), sp.Integer(0)))

    @property
    def out_image(self):
        images = [image_shape(a) for a in self.args]
        if any(s is None for s in images) or len({s[:2] for s in images}) > 1:
            return None
        return (*images[0][:2], sum(s[2] for s in images))

    def offsets(self) -> list:
        """``[(operand, lo, hi)]``: the columns each operand fills."""
        out, lo = [], 0
        for a in self.args:
            out.append((a, lo, lo + int(a.shape[1])))
            lo += int(a.shape[1])
        return out

    def _entry(self, i, j, **kw):
        return _entry_of(self, i, j, **kw)

    def _int_entry(self, i, j, **kw):
        for a, lo, hi in self.offsets():
            if lo <= j < hi:
                return a._entry(i, j - lo, **kw)
        raise IndexError(j)

    @property
    def expansion(self):
        """The same value as the sum of the operands ``place``d at their columns."""
        width = int(self.shape[1])
        parts = [Place(a, lo, width) for a, lo, _ in self.offsets()]
        return make_map(sum(VARS[: len(parts)]), parts)


class Cols(Printable, Ops, MatrixExpr):
    """``cols(x, lo, hi)``: columns ``lo..hi-1`` of ``x``."""

    precedence = PRECEDENCE["Atom"]
    notation = "cols(A, lo, hi): columns lo..hi-1 of A"

    def __new__(cls, x, lo, hi):
        return MatrixExpr.__new__(cls, x, sp.Integer(lo), sp.Integer(hi))

    @property
    def shape(self):
        return (self.args[0].shape[0], self.args[2] - self.args[1])

    @property
    def out_image(self):
        s = image_shape(self.args[0])
        return None if s is None else (s[0], s[1], int(self.args[2] - self.args[1]))

    def _entry(self, i, j, **kw):
        return self.args[0]._entry(i, j + self.args[1], **kw)


class Place(Printable, Ops, MatrixExpr):
    """``place(x, lo, width)``: ``x`` at columns ``lo..`` of a ``width``-wide zero matrix."""

    precedence = PRECEDENCE["Atom"]
    notation = "place(G, lo, width): G at columns lo.. of a width-wide zero matrix (the adjoint of cols)"

    def __new__(cls, x, lo, width):
        return MatrixExpr.__new__(cls, x, sp.Integer(lo), sp.Integer(width))

    @property
    def shape(self):
        return (self.args[0].shape[0], self.args[2])

    def _entry(self, i, j, **kw):
        return _entry_of(self, i, j, **kw)

    def _int_entry(self, i, j, **kw):
        x, (lo, width) = self.args[0], _ints(*self.args[1:])
        return x._entry(i, j - lo, **kw) if lo <= j < lo + int(x.shape[1]) else sp.Integer(0)


def _per_sample(x) -> int:
    """The rows of ``x`` per batch entry (1 for features, h·w for images): ``x.shape[0] / n``."""
    per = sp.simplify(x.shape[0] / N)
    if not (per.is_Integer and per > 0):
        raise ShapeMismatch(f"concat: {name_of(x)} {shape_text(x)} is not a batch (its rows are not a multiple of n)")
    return int(per)


def concat(*parts):
    """The columns of ``parts`` side by side: features ``(n, a) + (n, b) -> (n, a + b)``, or the
    channels of image batches of one size. One part is returned as it is."""
    if not parts:
        raise ValueError("concat needs at least one operand")
    for p in parts:
        if not isinstance(p, MatrixExpr):
            raise TypeError(f"concat: expected matrix expressions, got {p!r}")
    rows = {p.shape[0] for p in parts}
    images = [image_shape(p) for p in parts]
    if len(rows) > 1 or (any(s is not None for s in images) and len({None if s is None else s[:2]
                                                                       for s in images}) > 1):
        desc = " and ".join(f"{name_of(p)} {shape_text(p)}" for p in parts)
        raise ShapeMismatch(f"concat: the parts must have the same rows (and image size): {desc}")
    for p in parts:
        _per_sample(p)  # a part is a batch: its rows a multiple of n
    return parts[0] if len(parts) == 1 else Concat(*parts)


# --------------------------------------------------------------------------- rules


@VJP.rule(Concat)
def _vjp_concat(node, G):
    return [(a, Cols(G, lo, hi)) for a, lo, hi in node.offsets()]


@VJP.rule(Cols)
def _vjp_cols(node, G):
    x, lo, _ = node.args
    return [(x, Place(G, lo, x.shape[1]))]


@VJP.rule(Place)
def _vjp_place(node, G):
    x, lo, _ = node.args
    return [(x, Cols(G, lo, lo + x.shape[1]))]


@JVP.rule(Concat)
def _jvp_concat(node, tan):
    if all(tan(a) is None for a in node.args):
        return None
    return Concat(*[a * 0 if tan(a) is None else tan(a) for a in node.args])


JVP.rule(Cols, Place)(linear_in_first_operand)


LOWER.rule(Concat)(lower_expansion)  # the sum of its parts placed


@LOWER.rule(Cols)
def _lower_cols(lw, node):
    x, (lo, hi) = node.args[0], _ints(*node.args[1:])
    lw.emit(ir.ColumnCopy(lw.name(node), (Operand(lw.buffer_of(x)),), lo, 0, hi - lo), node.shape)


@LOWER.rule(Place)
def _lower_place(lw, node):
    x, lo = node.args[0], int(node.args[1])
    lw.emit(ir.ColumnCopy(lw.name(node), (Operand(lw.buffer_of(x)),), 0, lo, int(x.shape[1])), node.shape)


@PRINT_RULES.rule(Concat, Cols, Place)
def _print(node, printer, latex=False):
    label = {Concat: "concat", Cols: "cols", Place: "place"}[type(node)]
    inner = ", ".join(printer._print(a) for a in node.args)
    return r"\operatorname{%s}\left(%s\right)" % (label, inner) if latex else f"{label}({inner})"


__all__ = ["concat", "Concat", "Cols", "Place"]
