"""Embeddings: a row lookup and its adjoint, two nodes that fill every rule table.

Token sequences are rows, like images: a batch of ``n`` sequences of ``T`` ids
(``sd.input("tokens", (T,), dtype="int32")``) is the column ``(n·T, 1)``, and their embeddings
the matrix ``(n·T, d)`` (row ``b·T + t``), on which ``Dense`` acts per token.

* ``embedding(E, ids)``: ``Gather(E, ids)``, the rows ``E[ids]``: O(n·T·d) work, never a one-hot
  product over the vocabulary;
* its gradient ``scatter_add(ids, G)`` (``ScatterAdd``): a zero ``(V, d)`` matrix, row ``ids[r]``
  of which gets ``G[r]`` added for every ``r`` (a repeated id accumulates); its own gradient is a
  gather again, so ``grad``, ``hvp``, ``prove`` and ``explain_hvp`` reach through both.
* ``position_rows(P, like)``: rows ``0..T-1`` of a position table ``P`` ``(L, d)`` repeated for every
  sequence of ``like``, ``(n·T, d)``, built from existing nodes (flatten, a column slice, a row
  broadcast, so it needs no rule of its own): ``TokenAndPositionEmbedding``'s learned positions.

Each kernel reads the ids as exact integers in the program's float dtype (the way dropout's
indices are numbers); ``run.validate`` checks the integer arrays a user passes against every
embedding that reads them (``id_limits``) before anything compiles or runs.

>>> import symdl as sd
>>> ids = sd.input("ids", (3,), dtype="int32"); E = sd.param("E", (10, 2))
>>> h = embedding(E, ids); h.shape, sequence_length(h)
((3*n, 2), 3)
>>> print(h)
E[ids]
>>> print(sd.grad(sd.sum_squares(h), [E])[E])
scatter_add(ids, 2*(E[ids]))
"""
from __future__ import annotations

import weakref

import sympy as sp
from sympy.matrices.expressions import MatAdd, MatMul, MatrixExpr, MatrixSymbol
from sympy.printing.precedence import PRECEDENCE

from ..autodiff.jvp import JVP, linear_in_first_operand
from ..autodiff.vjp import VJP
from ..graph.nodes import (
    PRINT_RULES, Broadcast, Input, Map, Ops, Printable, ShapeMismatch, TokenInput, name_of, shape_text,
)
from ..ir import kernels as ir
from ..ir.kernels import Operand
from ..ir.lowering import LOWER
from .concat import Cols, Concat, Place
from .conv import Reshape, _entry_of

#: The largest vocabulary whose ids a float32 holds exactly (2**24).
FLOAT32_EXACT = 1 << 24


class Gather(Printable, Ops, MatrixExpr):
    """``E[ids]``: row ``ids[r]`` of the table ``E`` ``(V, d)`` for every row ``r`` of the ids ``(R, 1)``."""

    precedence = PRECEDENCE["Atom"]
    notation = "E[ids]: the rows of table E at the token ids (an embedding lookup; scatter_add is its adjoint)"

    def __new__(cls, table, ids):
        return MatrixExpr.__new__(cls, table, ids)

    @property
    def shape(self):
        return (self.args[1].shape[0], self.args[0].shape[1])

    def _entry(self, i, j, **kw):
        return _entry_of(self, i, j, **kw)

    def _int_entry(self, i, j, **kw):
        """``Σ_v [ids_i = v]·E[v, j]`` (a Kronecker delta: the ids are symbols in ``prove``)."""
        table, ids = self.args
        at = ids._entry(i, 0, **kw)
        return sp.Add(*(sp.KroneckerDelta(at, v) * table._entry(v, j, **kw) for v in range(int(table.shape[0]))))


class ScatterAdd(Printable, Ops, MatrixExpr):
    """``scatter_add(ids, G)``: ``(V, d)`` zeros, row ``ids[r]`` of which gets ``G[r]`` added for every
    ``r`` (the adjoint of ``Gather``). Arguments ``(G, ids, V)``: linear in the first."""

    precedence = PRECEDENCE["Atom"]
    notation = "scatter_add(ids, G): rows of G added into a zero (V, d) matrix at the token ids (E[ids]'s adjoint)"

    def __new__(cls, G, ids, vocabulary):
        return MatrixExpr.__new__(cls, G, ids, sp.Integer(vocabulary))

    @property
    def shape(self):
        return (self.args[2], self.args[0].shape[1])

    def _entry(self, i, j, **kw):
        return _entry_of(self, i, j, **kw)

    def _int_entry(self, v, j, **kw):
        G, ids = self.args[:2]
        return sp.Add(*(sp.KroneckerDelta(ids._entry(r, 0, **kw), v) * G._entry(r, j, **kw)
                        for r in range(int(G.shape[0]))))


# --------------------------------------------------------------------------- builders and checks

#: ``{ids leaf: [(vocabulary size, who), ...]}``: every embedding built on a token input,
#: so ``run.validate`` can check the ids passed for it (``id_limits``); held weakly, so a model a
#: session drops does not stay alive here.
_LOOKUPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def embedding(E, ids, *, where: str = "embedding"):
    """The rows ``E[ids]``: ``E`` a table ``(V, d)`` (``sd.param("E", (V, d))``), ``ids`` token
    sequences (``sd.input(name, (T,), dtype="int32")``, the column ``(n·T, 1)``). Returns ``(n·T, d)``,
    one row per token. ``where`` names the layer in the errors a bad id raises (``run.validate``).

    >>> import symdl as sd
    >>> embedding(sd.param("E", (4, 3)), sd.input("x", 2))
    Traceback (most recent call last):
    ...
    symdl.graph.nodes.ShapeMismatch: embedding: the ids x (n, 2) are not token ids: declare them with sd.input(name, (sequence_length,), dtype="int32")
    """
    if not isinstance(E, MatrixExpr) or not isinstance(ids, MatrixExpr):
        raise TypeError(f"{where}: embedding(table, ids) takes matrix expressions, got {E!r}, {ids!r}")
    if not isinstance(ids, TokenInput):
        raise ShapeMismatch(f"{where}: the ids {name_of(ids)} {shape_text(ids)} are not token ids: declare them with "
                            "sd.input(name, (sequence_length,), dtype=\"int32\")")
    if E.shape[0].free_symbols or E.shape[1].free_symbols:
        raise ShapeMismatch(f"{where}: the table {name_of(E)} {shape_text(E)} must have a fixed shape (V, d)")
    V = int(E.shape[0])
    if V > FLOAT32_EXACT:
        raise ValueError(f"{where}: a vocabulary of {V} ids exceeds {FLOAT32_EXACT}, the largest whose ids a float32 "
                         "holds exactly")
    record = (V, where)
    entries = _LOOKUPS.setdefault(ids, [])
    if record not in entries:
        entries.append(record)
    return Gather(E, ids)


def id_limits(ids) -> list:
    """``[(vocabulary size, who), ...]`` of the embeddings built on the token input ``ids`` (each
    ``sd.input`` call makes its own token leaf, so these are the embeddings of its model)."""
    return [(V, where) for V, where in _LOOKUPS.get(ids, ())]


def sequence_length(e):
    """``T`` of an expression holding token sequences as rows ``(n·T, ...)``, else None: token inputs,
    float sequence inputs (``graph.nodes.sequence_input(name, (T, d))``), embeddings, and the elementwise formulas,
    right products (a ``Dense`` per token) and sums of them.

    >>> import symdl as sd
    >>> from symdl.graph.nodes import sequence_input
    >>> x = sequence_input("x", (4, 3)); W = sd.param("W", (3, 2))
    >>> sequence_length(sd.tanh(x @ W)), sequence_length(sd.input("y", 3))
    (4, None)
    """
    if isinstance(e, Input):
        return getattr(e, "sequence_length", None)
    if hasattr(type(e), "out_sequence"):  # other families' nodes (ops.recurrence's scans)
        return e.out_sequence
    if isinstance(e, (Cols, Concat, Place)):  # columns of sequences are sequences
        return sequence_length(e.args[0])
    if isinstance(e, Gather):
        return sequence_length(e.args[1])
    if isinstance(e, (Map, MatAdd)):
        for o in (e.operands if isinstance(e, Map) else e.args):
            if not isinstance(o, Broadcast) and o.shape == e.shape:
                s = sequence_length(o)
                if s is not None:
                    return s
        return None
    if isinstance(e, MatMul):
        _, mats = e.as_coeff_matrices()
        if mats[0].shape[0] == e.shape[0]:
            return sequence_length(mats[0])
        return None
    rows = getattr(e, "sequence_rows", None)  # a node that knows its rows per sequence (attention's products)
    if rows is not None:
        return rows
    for o in getattr(e, "args", ()):  # any other node: its first operand holding the same rows (a concat, a slice)
        if isinstance(o, MatrixExpr) and not isinstance(o, Broadcast) and o.shape[0] == e.shape[0]:
            return sequence_length(o)
    return None


def position_rows(P, like, *, where: str = "position embedding"):
    """The rows of the position table ``P`` ``(L, d)`` that the token sequences ``like`` ``(n·T, ...)``
    add: ``P[t]`` at row ``b·T + t``. ``T`` may not exceed ``L``."""
    T = sequence_length(like)
    if T is None:
        raise ShapeMismatch(f"{where}: {name_of(like)} {shape_text(like)} holds no token sequences")
    L = int(P.shape[0])
    if T > L:
        raise ShapeMismatch(f"{where}: sequences of {T} tokens are longer than sequence_length={L}")
    d, sequences = int(P.shape[1]), like.shape[0] / T
    rows = Broadcast(Reshape(P, 1, L * d), sequences, L * d)  # (n, L·d): the table once per sequence
    if L != T:
        rows = Cols(rows, 0, T * d)  # the first T positions
    return Reshape(rows, like.shape[0], d)


# --------------------------------------------------------------------------- rules


@VJP.rule(Gather)
def _vjp_gather(node, G):
    table, ids = node.args
    return [(table, ScatterAdd(G, ids, table.shape[0]))]  # the ids are integers: no gradient


@VJP.rule(ScatterAdd)
def _vjp_scatter_add(node, G):
    return [(node.args[0], Gather(G, node.args[1]))]


JVP.rule(Gather, ScatterAdd)(linear_in_first_operand)


@LOWER.rule(Gather)
def _lower_gather(lw, node):
    table, ids = node.args
    lw.emit(ir.Gather(lw.name(node), (Operand(lw.buffer_of(table)), Operand(lw.buffer_of(ids)))), node.shape)


@LOWER.rule(ScatterAdd)
def _lower_scatter_add(lw, node):
    G, ids = node.args[:2]
    lw.emit(ir.ScatterAdd(lw.name(node), (Operand(lw.buffer_of(ids)), Operand(lw.buffer_of(G)))), node.shape)


@PRINT_RULES.rule(Gather)
def _print_gather(node, printer, latex=False):
    table, ids = (printer._print(a) for a in node.args)
    if not isinstance(node.args[0], MatrixSymbol):
        table = (r"\left(%s\right)" if latex else "(%s)") % table
    return r"%s\left[%s\right]" % (table, ids) if latex else f"{table}[{ids}]"


@PRINT_RULES.rule(ScatterAdd)
def _print_scatter_add(node, printer, latex=False):
    G, ids = (printer._print(a) for a in node.args[:2])
    if latex:
        return r"\operatorname{scatter\_add}\left(%s, %s\right)" % (ids, G)
    return f"scatter_add({ids}, {G})"


__all__ = ["embedding", "position_rows", "sequence_length", "id_limits", "Gather", "ScatterAdd"]
