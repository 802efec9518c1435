"""Attention: products within each sequence and a causal mask, two nodes that fill every rule table.

A batch of ``n`` sequences of ``T`` tokens is the matrix ``(n·T, d)`` (row ``b·T + t``, DESIGN.md
"Sequences are rows"). Attention needs only products *within* each sequence, block by block of
``T`` rows, and they are closed under differentiation:

* ``seq_matmul(A, B, trans_a, trans_b, T)`` (``SeqMatMul``): for every sequence ``b``,
  ``op(A_b) op(B_b)``, ``A_b`` the rows ``b·T .. b·T+T-1`` of ``A``; the scores ``Q Kᵀ``
  (``(n·T, T)``), the mix ``P V`` and the transposed mix ``Pᵀ G`` are its three uses, and the
  adjoints of each are the others (``δA = δC Bᵀ``, ``δB = Aᵀ δC`` for ``C = A B``, ...);
  it lowers to one ``ir.BlockGemm``: a GEMM per sequence, batched in one kernel.
* ``causal(S, T)`` (``Causal``): ``S`` plus ``MASK`` (a large negative number, not −∞) where a key
  comes after its query (column ``s > t`` of row ``b·T + t``). It is an additive constant: its
  adjoint is the identity, and the softmax after it puts ``P = 0`` there, so no gradient flows
  through a masked score.

Printed as products (``Q*K.T``, ``P*V``, ``P.T*δO``): read them per sequence.

>>> import symdl as sd
>>> from symdl.graph.nodes import sequence_input
>>> x = sequence_input("x", (3, 4)); Wq = sd.param("Wq", (4, 2)); Wk = sd.param("Wk", (4, 2))
>>> S = scores(x @ Wq, x @ Wk, 3); S.shape
(3*n, 3)
>>> print(S)
(x*Wq)*(x*Wk).T
>>> print(sd.grad(sd.total(mix(sd.softmax(causal(S, 3)), x, 3)), [Wq])[Wq].shape)
(4, 2)
"""
from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions import MatrixExpr, MatrixSymbol
from sympy.printing.precedence import PRECEDENCE

from ..autodiff.jvp import JVP
from ..autodiff.vjp import VJP
from ..graph.nodes import (
    COL_INDEX, PRINT_RULES, ROW_INDEX, VARS, Ops, Printable, ShapeMismatch, is_atomic, make_map, name_of,
    shape_text,
)
from ..ir import kernels as ir
from ..ir.lowering import LOWER
from .conv import _entry_of

#: What a causal mask adds to a masked score: large enough that ``exp`` of it (after the row max is
#: subtracted) is 0 in float32 and float64, finite so that no ``inf − inf`` can make a NaN.
MASK = -1e9


class SeqMatMul(Printable, Ops, MatrixExpr):
    """``op(A_s) op(B_s)`` for every sequence ``s``: arguments ``(A, B, trans_a, trans_b, ra, rb)``,
    ``A_s`` the ``s``-th block of ``ra`` rows of ``A`` (``B_s`` of ``rb``): a query sequence of ``T``
    tokens against a key sequence of ``S``. Both hold the same number of sequences."""

    precedence = PRECEDENCE["Mul"]
    notation = "A*B.T, P*V, P.T*G: products within each sequence (attention's scores and mixes)"
    is_sequence_product = True  # sd.explain names a softmax it mixes (P), its scores (S) and the mix (O)

    def __new__(cls, A, B, trans_a, trans_b, ra, rb):
        return MatrixExpr.__new__(cls, A, B, sp.Integer(int(trans_a)), sp.Integer(int(trans_b)), sp.Integer(ra),
                                  sp.Integer(rb))

    @property
    def trans(self) -> tuple:
        return bool(self.args[2]), bool(self.args[3])

    @property
    def block_rows(self) -> tuple:
        """Rows per sequence of ``(result, A, B)``."""
        A, ra, rb = self.args[0], int(self.args[4]), int(self.args[5])
        return (int(A.shape[1]) if self.trans[0] else ra), ra, rb

    @property
    def sequence_rows(self) -> int:
        """The tokens of each result sequence (``ops.embedding.sequence_length`` asks)."""
        return self.block_rows[0]

    @property
    def shape(self):
        A, B = self.args[:2]
        ro, ra, rb = self.block_rows
        return (A.shape[0] / ra * ro, sp.Integer(rb) if self.trans[1] else B.shape[1])

    def _entry(self, i, j, **kw):
        return _entry_of(self, i, j, **kw)

    def _int_entry(self, i, j, **kw):
        A, B = self.args[:2]
        ta, tb = self.trans
        ro, ra, rb = self.block_rows
        s, t = divmod(i, ro)
        inner = ra if ta else int(A.shape[1])  # op(A_s) is (ro, inner)

        def a(q):
            return A._entry(s * ra + q, t, **kw) if ta else A._entry(s * ra + t, q, **kw)

        def b(q):
            return B._entry(s * rb + j, q, **kw) if tb else B._entry(s * rb + q, j, **kw)

        return sp.Add(*(a(q) * b(q) for q in range(inner)))


class Causal(Printable, Ops, MatrixExpr):
    """``causal(S, T)``: the scores ``S`` ``(n·T, T)`` with ``MASK`` added where column ``s`` is after
    row ``b·T + t``'s position ``t`` (a query sees itself and the keys before it)."""

    precedence = PRECEDENCE["Atom"]
    notation = "causal(S): S plus a large negative number where a key comes after its query (no gradient there)"

    def __new__(cls, S, T):
        return MatrixExpr.__new__(cls, S, sp.Integer(T))

    @property
    def shape(self):
        return self.args[0].shape

    def _entry(self, i, j, **kw):
        return _entry_of(self, i, j, **kw)

    def _int_entry(self, i, j, **kw):
        return self.args[0]._entry(i, j, **kw) + (MASK if j > i % int(self.args[1]) else 0)


def mask_body(T: int) -> sp.Expr:
    """The elementwise body of ``causal``: ``v0`` plus ``MASK`` where ``j > i mod T``."""
    return VARS[0] + sp.Piecewise((sp.Float(MASK), COL_INDEX > sp.Mod(ROW_INDEX, T)), (0, True))


# --------------------------------------------------------------------------- builders


def _check_sequences(where, T, *mats):
    if not isinstance(T, int) or T <= 0:
        raise ShapeMismatch(f"{where}: the sequence length must be a positive int, got {T!r}")
    for m in mats:
        if not isinstance(m, MatrixExpr):
            raise TypeError(f"{where}: takes matrix expressions, got {m!r}")
        per = sp.Poly(sp.expand(m.shape[0] / T), *sorted(sp.sympify(m.shape[0]).free_symbols, key=str) or [sp.Dummy()])
        if not all(c.is_integer for c in per.coeffs()):
            raise ShapeMismatch(f"{where}: the rows of {name_of(m)} {shape_text(m)} are not sequences of {T} tokens")


def seq_matmul(A, B, trans_a=False, trans_b=False, ra=None, rb=None, *, where="seq_matmul"):
    """``op(A_s) op(B_s)`` within every sequence ``s``: ``A`` holds sequences of ``ra`` rows, ``B`` of
    ``rb`` (default ``ra``), ``op`` a transpose when asked.

    >>> import symdl as sd
    >>> from symdl.graph.nodes import sequence_input
    >>> seq_matmul(sequence_input("a", (3, 2)), sequence_input("b", (3, 4)), ra=3)
    Traceback (most recent call last):
    ...
    symdl.graph.nodes.ShapeMismatch: seq_matmul: op(a) is (3, 2) per sequence, op(b) is (3, 4): inner sizes differ
    """
    rb = ra if rb is None else rb
    _check_sequences(where, ra, A)
    _check_sequences(where, rb, B)
    if sp.expand(A.shape[0] / ra - B.shape[0] / rb) != 0:
        raise ShapeMismatch(f"{where}: {name_of(A)} {shape_text(A)} (sequences of {ra}) and {name_of(B)} "
                            f"{shape_text(B)} (sequences of {rb}) hold different numbers of sequences")
    ca, cb = A.shape[1], B.shape[1]
    op_a = (ca, ra) if trans_a else (ra, ca)
    op_b = (cb, rb) if trans_b else (rb, cb)
    if sp.expand(op_a[1] - op_b[0]) != 0:
        raise ShapeMismatch(f"{where}: op({name_of(A)}) is {op_a} per sequence, op({name_of(B)}) is {op_b}: "
                            "inner sizes differ")
    return SeqMatMul(A, B, trans_a, trans_b, ra, rb)


def scores(Q, K, T, S=None, *, where="attention scores"):
    """``Q_s K_sᵀ`` for every sequence: ``(n·T, S)``, row ``s·T + t`` the scores of query ``t`` against
    the ``S`` keys (default ``T``: self-attention) of its sequence."""
    return seq_matmul(Q, K, False, True, T, T if S is None else S, where=where)


def mix(P, V, T, S=None, *, where="attention mix"):
    """``P_s V_s`` for every sequence: row ``s·T + t`` the mix of its sequence's ``S`` value rows."""
    return seq_matmul(P, V, False, False, T, T if S is None else S, where=where)


def causal(S, T, *, where="causal mask"):
    """The scores ``S`` ``(n·T, T)`` masked so a query sees only itself and earlier keys."""
    _check_sequences(where, T, S)
    if sp.expand(S.shape[1] - T) != 0:
        raise ShapeMismatch(f"{where}: a causal mask needs square attention (T={T} keys per query), "
                            f"got scores {shape_text(S)}")
    return Causal(S, T)


# --------------------------------------------------------------------------- rules


@VJP.rule(SeqMatMul)
def _vjp_seq_matmul(node, G):
    A, B = node.args[:2]
    ta, tb = node.trans
    ro, ra, rb = node.block_rows
    if not ta and not tb:  # C = A B: δA = δC Bᵀ, δB = Aᵀ δC
        return [(A, SeqMatMul(G, B, 0, 1, ro, rb)), (B, SeqMatMul(A, G, 1, 0, ra, ro))]
    if not ta:  # C = A Bᵀ: δA = δC B, δB = δCᵀ A
        return [(A, SeqMatMul(G, B, 0, 0, ro, rb)), (B, SeqMatMul(G, A, 1, 0, ro, ra))]
    if not tb:  # C = Aᵀ B: δA = B δCᵀ, δB = A δC
        return [(A, SeqMatMul(B, G, 0, 1, rb, ro)), (B, SeqMatMul(A, G, 0, 0, ra, ro))]
    return [(A, SeqMatMul(B, G, 1, 1, rb, ro)), (B, SeqMatMul(G, A, 1, 1, ro, ra))]  # C = Aᵀ Bᵀ


@VJP.rule(Causal)
def _vjp_causal(node, G):
    return [(node.args[0], G)]  # an additive constant: the identity (P = 0 where it masks)


@JVP.rule(SeqMatMul)
def _jvp_seq_matmul(node, tan):
    A, B, *rest = node.args
    terms = [SeqMatMul(tan(A), B, *rest) if tan(A) is not None else None,
             SeqMatMul(A, tan(B), *rest) if tan(B) is not None else None]  # the product rule
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else make_map(VARS[0] + VARS[1], terms)


@JVP.rule(Causal)
def _jvp_causal(node, tan):
    return tan(node.args[0])  # the mask is a constant


@LOWER.rule(SeqMatMul)
def _lower_seq_matmul(lw, node):
    A, B = node.args[:2]
    ta, tb = node.trans
    lw.emit(ir.BlockGemm(lw.name(node), lw.buffer_of(A), lw.buffer_of(B), ta, tb, node.block_rows), node.shape)


@LOWER.rule(Causal)
def _lower_causal(lw, node):
    S, T = node.args
    lw.emit(ir.Elementwise(lw.name(node), mask_body(int(T)), (lw.operand(S),)), node.shape)


def _factor(printer, e, latex):
    text = printer._print(e)
    if is_atomic(e) or isinstance(e, MatrixSymbol):
        return text
    return (r"\left(%s\right)" if latex else "(%s)") % text


def _op(printer, e, trans, latex):
    text = _factor(printer, e, latex)
    if not trans:
        return text
    return text + ("^{T}" if latex else ".T")


@PRINT_RULES.rule(SeqMatMul)
def _print_seq_matmul(node, printer, latex=False):
    A, B = node.args[:2]
    ta, tb = node.trans
    a, b = _op(printer, A, ta, latex), _op(printer, B, tb, latex)
    return f"{a} {b}" if latex else f"{a}*{b}"


@PRINT_RULES.rule(Causal)
def _print_causal(node, printer, latex=False):
    S = printer._print(node.args[0])
    return r"\operatorname{causal}\left(%s\right)" % S if latex else f"causal({S})"


__all__ = ["SeqMatMul", "Causal", "seq_matmul", "scores", "mix", "causal", "mask_body", "MASK"]
