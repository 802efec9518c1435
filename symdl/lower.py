"""Lower a set of expressions to a flat program of kernels every backend prints.

Kernels (plain dataclasses):

* ``Gemm``         ``out = alpha * op(a) @ op(b)``, ``op`` is the identity or a transpose *view*;
* ``Elementwise``  one fused loop: ``out[i, j] = body(operands at (i, j))``;
* ``Reduction``    a fused loop that reduces ``body`` over rows, columns, everything,
                   or row-wise log-sum-exp (max subtracted).

An operand is read at ``(i, j)`` through an index pattern: ``"ij"`` (same shape),
``"j"`` (a broadcast row), ``"i"`` (a broadcast column), ``"0"`` (a broadcast
scalar) or ``"ji"`` (a transpose). Buffer shapes are SymPy expressions in the
batch symbol ``n``; backends evaluate them once per batch size.

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 3)); b = sd.param("b", 3)
>>> prog = lower_program({"h": sd.tanh(x @ W + b)})
>>> print(prog)
t0 (n, 3) = gemm(x, W)
h (n, 3) = elementwise[tanh(v0 + v1)](t0:ij, b:j)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from sympy.matrices.expressions import MatMul, MatrixExpr, Transpose

from .expr import _VARS, Broadcast, Input, Map, Param, Reduce, RowLogSumExp, SumAll, SumCols, SumRows, children, topological
from .simplify import fuse_maps, use_counts

#: Names the backends use for the operands of a kernel body.
V = sp.symbols("v0:256", real=True)


@dataclass(frozen=True)
class Operand:
    buffer: str
    pattern: str  # "ij", "j", "i", "0" or "ji"


@dataclass
class Gemm:
    out: str
    a: str
    b: str
    trans_a: bool
    trans_b: bool
    alpha: sp.Expr = sp.Integer(1)
    kind = "gemm"


@dataclass
class Elementwise:
    out: str
    body: sp.Expr  # over V[:len(operands)] and scalar symbols
    operands: tuple
    kind = "elementwise"


@dataclass
class Reduction:
    out: str
    over: str  # "rows" (-> (1, m)), "cols" (-> (r, 1)), "all" (-> (1, 1)), "logsumexp" (-> (r, 1))
    body: sp.Expr
    operands: tuple
    shape: tuple  # of the reduced (input) array
    kind = "reduction"


@dataclass
class Program:
    """The kernels, the buffers they write (name -> shape) and what comes in and out."""

    kernels: list
    buffers: dict
    inputs: list  # Input leaves
    params: list  # Param leaves
    outputs: dict  # output name -> buffer name
    scalars: list = field(default_factory=list)  # free scalar symbols other than n

    def __str__(self):
        lines = []
        for k in self.kernels:
            shape = "(" + ", ".join(map(str, self.buffers[k.out])) + ")"
            if isinstance(k, Gemm):
                a = k.a + (".T" if k.trans_a else "")
                b = k.b + (".T" if k.trans_b else "")
                alpha = "" if k.alpha == 1 else f"{k.alpha}*"
                lines.append(f"{k.out} {shape} = {alpha}gemm({a}, {b})")
            else:
                ops = ", ".join(f"{o.buffer}:{o.pattern}" for o in k.operands)
                what = "elementwise" if isinstance(k, Elementwise) else f"reduce_{k.over}"
                lines.append(f"{k.out} {shape} = {what}[{k.body}]({ops})")
        return "\n".join(lines)

    def flops(self, kernel, n_value) -> int:
        """A FLOP estimate for one kernel at batch size ``n_value`` (for ``train.kernels``)."""
        sub = {sp.Symbol("n", integer=True, positive=True): n_value}
        if isinstance(kernel, Gemm):
            r, c = (int(sp.sympify(d).subs(sub)) for d in self.buffers[kernel.out])
            inner = self.buffers[kernel.a][0 if kernel.trans_a else 1]
            return 2 * r * c * int(sp.sympify(inner).subs(sub))
        shape = kernel.shape if isinstance(kernel, Reduction) else self.buffers[kernel.out]
        size = int(sp.sympify(shape[0] * shape[1]).subs(sub))
        return size * max(1, sp.count_ops(kernel.body))


def lower_program(outputs: dict) -> Program:
    """Lower ``{name: expression}`` to a ``Program`` whose buffers ``name`` hold the values."""
    names = list(outputs)
    roots = fuse_maps([outputs[k] for k in names])
    uses = use_counts(roots)
    order = topological(roots)
    lw = _Lowerer(uses, order)
    for name, root in zip(names, roots):
        lw.preferred.setdefault(root, name)  # an output's buffer carries the output's name
    for node in order:
        lw.visit(node)
    out_map = {}
    for name, root in zip(names, roots):
        if lw.buffer_of(root) != name:  # a leaf, or a node another output already names: copy
            lw.emit(Elementwise(name, V[0], (lw.operand(root),)), root.shape)
        out_map[name] = name
    leaves = [nd for nd in order if isinstance(nd, (Input, Param))]
    scalars = sorted(
        {s for k in lw.kernels for s in _free_scalars(k)} - {sp.Symbol("n", integer=True, positive=True)},
        key=str,
    )
    return Program(
        kernels=lw.kernels,
        buffers=lw.shapes,
        inputs=[l for l in leaves if isinstance(l, Input)],
        params=[l for l in leaves if isinstance(l, Param)],
        outputs=out_map,
        scalars=scalars,
    )


def _free_scalars(k):
    if isinstance(k, Gemm):
        return sp.sympify(k.alpha).free_symbols
    return {s for s in k.body.free_symbols if s not in _VSET}


_VSET = frozenset(V)


class _Lowerer:
    def __init__(self, uses, order):
        self.uses = uses
        self.kernels, self.shapes, self.names = [], {}, {}
        self.leaf_names = set()
        self.fused = set()  # single-use Maps folded into their reduction
        self.count = 0
        self.preferred = {}
        self.parents = {}
        for node in order:
            for c in children(node):
                self.parents.setdefault(c, []).append(node)

    def emit(self, kernel, shape):
        self.kernels.append(kernel)
        self.shapes[kernel.out] = tuple(shape)

    def fresh(self, node=None):
        if node is not None and node in self.preferred:
            return self.preferred.pop(node)
        self.count += 1
        return f"t{self.count - 1}"

    def buffer_of(self, node) -> str:
        if node not in self.names:  # a view (transpose / broadcast) asked for as a whole array
            name = self.fresh(node)
            self.names[node] = name
            self.emit(Elementwise(name, V[0], (self.operand(node),)), node.shape)
        return self.names[node]

    def operand(self, node) -> Operand:
        if isinstance(node, Broadcast):
            x = node.args[0]
            pattern = {(True, True): "0", (True, False): "j", (False, True): "i"}[(x.shape[0] == 1, x.shape[1] == 1)]
            return Operand(self.buffer_of(x), pattern)
        if isinstance(node, Transpose):
            return Operand(self.buffer_of(node.arg), "ji")
        return Operand(self.buffer_of(node), "ij")

    def fused_body(self, x):
        """A reduction's input as (body, operands): a single-use Map is folded in."""
        if isinstance(x, Map) and self.uses[x] == 1:
            self.fused.add(x)
            return x.lam.expr.xreplace(dict(zip(x.lam.variables, V))), tuple(self.operand(a) for a in x.operands)
        return V[0], (self.operand(x),)

    def visit(self, node):
        if isinstance(node, (Input, Param)):
            self.names[node] = str(node.name)
            self.leaf_names.add(str(node.name))
        elif isinstance(node, (Broadcast, Transpose)):
            pass  # a view: read through an index pattern by its users
        elif isinstance(node, Map):
            if node in self.fused or (self.uses[node] == 1 and self._only_reduced(node)):
                return
            body = node.lam.expr.xreplace(dict(zip(node.lam.variables, V)))
            name = self.fresh(node)
            self.names[node] = name
            self.emit(Elementwise(name, body, tuple(self.operand(a) for a in node.operands)), node.shape)
        elif isinstance(node, MatMul):
            self._gemm(node)
        elif isinstance(node, (Reduce, RowLogSumExp)):
            x = node.args[0]
            body, ops = self.fused_body(x)
            over = {SumRows: "rows", SumCols: "cols", SumAll: "all", RowLogSumExp: "logsumexp"}[type(node)]
            name = self.fresh(node)
            self.names[node] = name
            self.emit(Reduction(name, over, body, ops, tuple(x.shape)), node.shape)
        else:
            raise NotImplementedError(f"cannot lower {type(node).__name__}: {node}")

    def _only_reduced(self, node):
        parents = self.parents.get(node, ())
        return bool(parents) and all(isinstance(p, (Reduce, RowLogSumExp)) for p in parents)

    def _gemm(self, node):
        coeff, mats = node.as_coeff_matrices()
        acc = mats[0]
        acc_op = self._gemm_operand(acc)
        for i, m in enumerate(mats[1:]):
            last = i == len(mats) - 2
            name = self.fresh(node if last else None)
            if last:
                self.names[node] = name
            b_op = self._gemm_operand(m)
            shape = (acc.shape[0], m.shape[1])
            self.emit(Gemm(name, acc_op[0], b_op[0], acc_op[1], b_op[1], coeff if last else sp.Integer(1)), shape)
            acc_op = (name, False)
            acc = _Shaped(shape)

    def _gemm_operand(self, m):
        if isinstance(m, Transpose):
            return self.buffer_of(m.arg), True
        return self.buffer_of(m), False

@dataclass
class _Shaped:
    shape: tuple
