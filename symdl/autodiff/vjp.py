"""Reverse-mode chain rule over the graph: one vector-Jacobian rule per node type.

``VJP[type](node, G)`` takes a node and the adjoint ``G = ∂L/∂node`` (same shape)
and returns ``[(operand, ∂L/∂operand contribution), ...]``. ``adjoints`` walks the
DAG once in reverse topological order, summing contributions of shared nodes.

Elementwise nodes (``Map``) need no per-function rules: SymPy differentiates
their scalar body, and where the derivative mentions the body itself
(σ′ = σ(1−σ), tanh′ = 1 − tanh²) the forward node is used instead of recomputing it.

>>> import symdl as sd
>>> x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1))
>>> g = sd.grad(sd.losses.mse(x @ W, y), [W])
>>> print(g[W])
x.T*(2*(x*W - y)/n)
"""
from __future__ import annotations

import sympy as sp

from ..formulas.activations import heaviside_at_zero
from ..graph.nodes import (
    VARS, Broadcast, Input, MatAdd, MatMul, Map, Param, RowLogSumExp, SumAll, SumCols, SumRows, Transpose, check_leaf_names, children, make_map, topological,
)
from ..registry import RuleTable
from ..graph.simplify import fuse_maps

#: The vector-Jacobian rules, one per node type: ``VJP.lookup(node)(node, G)``.
VJP = RuleTable("gradient")
rule = VJP.rule


def scalar_derivative(body, v):
    """``∂body/∂v`` as backends evaluate it: ``relu′(0) = 0``, and ``DiracDelta`` (the
    derivative of a step: ``Heaviside``, ``sign``, ``Abs``′) is 0 almost everywhere.

    >>> import sympy as sp
    >>> t = sp.Symbol("t", real=True)
    >>> scalar_derivative(sp.Abs(t), t), scalar_derivative(sp.sign(t), t)
    (sign(t), 0)
    """
    d = heaviside_at_zero(sp.diff(body, v))
    if d.has(sp.DiracDelta):
        d = d.replace(lambda e: isinstance(e, sp.DiracDelta), lambda e: sp.Integer(0))
    return d


@rule(Map)
def _vjp_map(node, G):
    body, names = node.lam.expr, node.lam.variables
    k = len(names)
    y, g = VARS[k], VARS[k + 1]  # the forward value and the adjoint
    args = list(node.operands) + [node, G]
    out = []
    for v, a in zip(names, node.operands):
        d = sp.factor_terms(scalar_derivative(body, v))
        if d == 0:
            continue
        if not body.is_Symbol:
            d = d.xreplace({body: y, 1 / body: 1 / y})  # reuse the forward value: σ′ = y(1 − y), sqrt′ = 1/(2y)
        out.append((a, make_map(g * d, args)))
    return out


@rule(MatMul)
def _vjp_matmul(node, G):
    coeff, mats = node.as_coeff_matrices()
    out = []
    for i, m in enumerate(mats):
        adj = G
        if i + 1 < len(mats):
            adj = MatMul(adj, _product(mats[i + 1 :]).T)
        if i > 0:
            adj = MatMul(_product(mats[:i]).T, adj)
        if coeff != 1:
            adj = make_map(coeff * VARS[0], [adj])
        out.append((m, adj))
    return out


def _product(ms):
    return ms[0] if len(ms) == 1 else MatMul(*ms)


@rule(MatAdd)
def _vjp_matadd(node, G):
    return [(a, G) for a in node.args]


@rule(Transpose)
def _vjp_transpose(node, G):
    return [(node.arg, G.T)]


@rule(Broadcast)
def _vjp_broadcast(node, G):
    x = node.args[0]
    if x.shape[0] == 1 and node.shape[0] != 1:
        G = SumRows(G)
    if x.shape[1] == 1 and node.shape[1] != 1:
        G = SumCols(G)
    return [(x, G)]


@rule(SumRows, SumCols, SumAll)
def _vjp_sum(node, G):
    x = node.args[0]
    return [(x, Broadcast(G, *x.shape))]


@rule(RowLogSumExp)
def _vjp_logsumexp(node, G):
    z = node.args[0]
    # ∂lse/∂z is the softmax, built as activations.softmax builds it: the same node, so where the
    # forward pass computed softmax(z) (attention's P) the backward reads it instead of a second exp
    softmax = make_map(sp.exp(VARS[0] - VARS[1]), [z, Broadcast(node, *z.shape)])
    return [(z, make_map(VARS[0] * VARS[1], [Broadcast(G, *z.shape), softmax]))]


def adjoints(loss, wrt, order=None) -> dict:
    """``{node: ∂loss/∂node}`` for every node on a path from ``wrt`` to ``loss``.

    ``order`` is ``topological([loss])`` when the caller already holds it.
    """
    if tuple(loss.shape) != (1, 1):
        raise ValueError(f"the loss must be a scalar (1, 1) expression, got shape {tuple(loss.shape)}")
    order = topological([loss]) if order is None else order
    check_leaf_names(order + list(wrt))
    targets = set(wrt)
    needs = set()
    for node in order:  # operands come first, so one pass finds every node that leads to a target
        if node in targets or any(c in needs for c in children(node)):
            needs.add(node)
    adj = {loss: make_map(sp.Integer(1), [loss])}
    for node in reversed(order):
        if node not in needs or node in targets and not children(node):
            continue
        if node not in adj:  # every contribution was 0 (a step's derivative: sign′ = 0 a.e.)
            continue
        for child, contribution in VJP.lookup(node)(node, adj[node]):
            if child not in needs:
                continue
            if child in adj:
                adj[child] = make_map(VARS[0] + VARS[1], [adj[child], contribution])
            else:
                adj[child] = contribution
    return adj


class Derivation:
    """One reverse pass over ``loss``: the forward graph's ``order``, every node's adjoint
    (``adjoints``) and each parameter's fused gradient (``gradients``, what ``grad`` returns).

    Whoever needs the gradients *and* their explanation (the compiled step's comments) keeps
    this and hands it to ``explain``: the loss is walked and differentiated once.

    >>> import symdl as sd
    >>> x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1))
    >>> d = Derivation(sd.losses.mse(x @ W, y), [W])
    >>> print(d.gradients[W])
    x.T*(2*(x*W - y)/n)
    >>> sd.explain(d.loss, d.params, derivation=d).adj is d.adjoints   # explained, not derived again
    True
    """

    def __init__(self, loss, params):
        self.loss, self.params = loss, list(params)
        for p in self.params:
            if not isinstance(p, (Param, Input)):
                raise TypeError(f"grad is taken with respect to parameters (sd.param) or inputs (sd.input), got {p!r}")
        self.order = topological([loss])
        self.adjoints = adjoints(loss, self.params, self.order)
        out = {p: self.adjoints.get(p, make_map(sp.Integer(0), [p])) for p in self.params}
        fused = fuse_maps(list(out.values()), protect=set(self.order))
        self.gradients = dict(zip(self.params, fused))


def grad(loss, params) -> dict:
    """``{param: ∂loss/∂param}`` as SymPy matrix expressions, shaped like the params.

    Forward nodes are shared with the loss graph (never recomputed); the
    backward elementwise work of each step is fused into single formulas.

    ``params`` may also name an input (``sd.input``), for a saliency map or a gradient
    penalty; and ``loss`` may itself contain gradients (a gradient of a gradient):

    >>> import symdl as sd
    >>> x = sd.input("x", 2); W = sd.param("W", (2, 1))
    >>> loss = sd.total(sd.tanh(x @ W))
    >>> gx = sd.grad(loss, [x])[x]
    >>> print(gx)
    (1 - tanh(x*W)**2)*W.T
    >>> print(sd.grad(sd.sum_squares(gx), [W])[W])   # a gradient penalty's gradient
    (2*((1 - tanh(x*W)**2)*W.T)).T*(1 - tanh(x*W)**2) + x.T*(-2*tanh(x*W)⊙((2*((1 - tanh(x*W)**2)*W.T))*W)⊙(1 - tanh(x*W)**2))
    """
    return Derivation(loss, params).gradients
