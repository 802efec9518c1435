"""Graph rewrites shared by printing and lowering.

``fuse_maps`` inlines an elementwise node into the one elementwise node that uses
it, so ``(δ*Wᵀ) ⊙ (1 − A²)`` is one formula (and later one loop) instead of two.
Nodes used more than once are kept: they are the common subexpressions, computed
once and read by every user (the forward activations reused by the backward pass).
CSE itself is structural: SymPy's hashing makes equal subtrees one dict key.

>>> import symdl as sd
>>> x = sd.input("x", 2)
>>> inner = sd.tanh(x); outer = 2 * inner
>>> print(fuse_maps([outer])[0])
2*tanh(x)
"""
from __future__ import annotations

from .nodes import VARS, Map, children, make_map, walk


def inline(node: Map, operands, fuse) -> "MatrixExpr":
    """``node``'s formula over ``operands``, with each flagged operand's formula substituted."""
    args, repl = list(operands), {}
    for v, a, f in zip(node.lam.variables, operands, fuse):
        if f:
            repl[v] = a.lam.expr.xreplace({w: VARS[len(args) + j] for j, w in enumerate(a.lam.variables)})
            args.extend(a.operands)
    return make_map(node.lam.expr.xreplace(repl), args)


def _same(new, old) -> bool:
    """Whether every rebuilt operand is the very object it was: the node is then kept as is.
    (A rebuilt copy would be equal but another object, and comparing equal SymPy trees that
    share no objects walks them to the leaves: quadratic in a deep net's depth.)"""
    return all(a is b for a, b in zip(new, old))


def fuse_maps(roots, protect=frozenset(), rebuilt=None) -> list:
    """Rebuild ``roots`` with every single-use, unprotected ``Map`` inlined into its user.

    ``rebuilt``, a dict, receives ``{old node: its rebuilt node}`` for every node under ``roots``.
    """
    order, uses = walk(roots)
    new = {} if rebuilt is None else rebuilt
    for node in order:  # operands first: each is fully fused before its user
        if not children(node):
            new[node] = node
        elif isinstance(node, Map):
            ops = [new[a] for a in node.operands]
            fuse = [isinstance(o, Map) and uses[a] == 1 and a not in protect for a, o in zip(node.operands, ops)]
            new[node] = node if _same(ops, node.operands) and not any(fuse) else inline(node, ops, fuse)
        else:
            args = [new.get(a, a) for a in node.args]
            new[node] = node if _same(args, node.args) else node.func(*args)
    return [new[r] for r in roots]


def fuse_and_walk(roots, rebuilt=None) -> tuple:
    """``fuse_maps(roots)`` and the ``walk`` of the fused graph: what lowering visits, in order,
    with the use counts its fusion decisions read (one walk before fusing, one after).

    >>> import symdl as sd
    >>> x = sd.input("x", 2)
    >>> (root,), fused = fuse_and_walk([2 * sd.tanh(x)])
    >>> [str(e) for e in fused.order], fused.uses[root]
    (['x', '2*tanh(x)'], 1)
    """
    roots = fuse_maps(roots, rebuilt=rebuilt)
    return roots, walk(roots)
