"""Forward mode: directional derivatives of graph nodes, one tangent rule per node type.

``tangents(roots, {leaf: V})`` gives ``Ẋ = d/dε X(θ + εV)|ε=0`` for every node ``X`` that
depends on a directed leaf, as graph expressions (absent means zero). Applied to the nodes
of a gradient it gives a Hessian-vector product the way a textbook derives it (forward over
reverse, Pearlmutter's R-operator): ``(Hv)_W = (∂L/∂W)˙ = Ȧᵀδ + Aᵀδ̇``. ``sd.explain_hvp`` prints
those named quantities; ``sd.hvp`` (reverse over reverse) is the one that is compiled.

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 3)); V = sd.param("V", (2, 3))
>>> A = sd.tanh(x @ W)
>>> print(tangents([A], {W: V})[A])
(x*V)⊙(1 - tanh(x*W)**2)
"""
from __future__ import annotations

import sympy as sp

from .vjp import scalar_derivative
from ..graph.nodes import (
    VARS, Broadcast, MatAdd, MatMul, MatrixExpr, Map, RowLogSumExp, SumAll, SumCols, SumRows, Transpose, children, make_map, topological,
)
from ..registry import RuleTable

#: The tangent (Jacobian-vector) rules: ``JVP.lookup(node)(node, tangent_of) -> Ẋ or None`` (None: zero).
JVP = RuleTable("tangent")


def _sum(terms):
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else make_map(sum(VARS[: len(terms)]), terms)


@JVP.rule(Map)
def _jvp_map(node, tan):
    body, names = node.lam.expr, node.lam.variables
    k = len(names)
    y, t = VARS[k], VARS[k + 1]  # the forward value, the operand's tangent
    terms = []
    for v, a in zip(names, node.operands):
        if tan(a) is None:
            continue
        d = sp.factor_terms(scalar_derivative(body, v))
        if d == 0:
            continue
        if not body.is_Symbol:
            d = d.xreplace({body: y})  # reuse the forward value: tanh′ = 1 − A²
        terms.append(make_map(t * d, list(node.operands) + [node, tan(a)]))
    return _sum(terms)


@JVP.rule(MatMul)
def _jvp_matmul(node, tan):
    coeff, mats = node.as_coeff_matrices()
    terms = []
    for i, m in enumerate(mats):  # the product rule
        if tan(m) is None:
            continue
        term = MatMul(*mats[:i], tan(m), *mats[i + 1:])
        terms.append(make_map(coeff * VARS[0], [term]) if coeff != 1 else term)
    return _sum(terms)


@JVP.rule(MatAdd)
def _jvp_matadd(node, tan):
    return _sum([tan(a) for a in node.args])


@JVP.rule(Transpose)
def _jvp_transpose(node, tan):
    return None if tan(node.arg) is None else tan(node.arg).T


@JVP.rule(Broadcast)
def _jvp_broadcast(node, tan):
    x = node.args[0]
    return None if tan(x) is None else Broadcast(tan(x), *node.shape)


def linear_in_first_operand(node, tan):
    """The tangent of a node linear in its first operand (the other arguments are constants: sizes,
    a geometry): the node applied to that operand's tangent. Node families register it too."""
    x = node.args[0]
    return None if tan(x) is None else node.func(tan(x), *node.args[1:])


JVP.rule(SumRows, SumCols, SumAll)(linear_in_first_operand)


@JVP.rule(RowLogSumExp)
def _jvp_logsumexp(node, tan):
    z = node.args[0]
    if tan(z) is None:
        return None
    softmax_times = sp.exp(VARS[0] - VARS[1]) * VARS[2]  # (logsumexp z)˙ = Σ_j softmax(z)_j ż_j
    return SumCols(make_map(softmax_times, [z, Broadcast(node, *z.shape), tan(z)]))


def tangents(roots, directions: dict) -> dict:
    """``{node: Ẋ}`` for every node under ``roots`` that depends on a leaf of ``directions``
    (``{leaf: direction}``, shaped like the leaf); a node missing from the result has tangent 0."""
    out = dict(directions)
    for node in topological(roots):
        if node in out or not any(c in out for c in children(node)):
            continue
        t = JVP.lookup(node)(node, out.get)
        if t is not None:
            out[node] = t
    return out


def check_directions(params, vectors, what: str) -> list:
    """The directions of a Hessian-vector product: one per parameter, shaped like it, not one of them."""
    vectors = list(vectors)
    if len(vectors) != len(params):
        raise ValueError(f"{what}: {len(params)} parameter(s) but {len(vectors)} direction(s); give one per parameter")
    for p, v in zip(params, vectors):
        if not isinstance(v, MatrixExpr) or tuple(v.shape) != tuple(p.shape):
            shape = tuple(v.shape) if isinstance(v, MatrixExpr) else type(v).__name__
            raise ValueError(f"{what}: the direction for {p.name} must have its shape {tuple(p.shape)}, got {shape}")
        if v in params:
            raise ValueError(f"{what}: the direction {v} is also a parameter being differentiated")
    return vectors
