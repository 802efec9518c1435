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
class Update:
    """An optimizer step for one parameter: ``lets`` in order, then ``writes`` in place.

    ``lets`` are ``(symbol, body)`` pairs over the operands ``V[i]`` and earlier lets;
    ``writes`` are ``(buffer, symbol)``: the new state values and the new parameter.
    """

    out: str  # the parameter buffer (updated in place)
    lets: tuple
    writes: tuple
    operands: tuple
    kind = "update"


@dataclass
class Program:
    """The kernels, the buffers they write (name -> shape) and what comes in and out."""

    kernels: list
    buffers: dict
    inputs: list  # Input leaves
    params: list  # Param leaves
    outputs: dict  # output name -> buffer name
    scalars: list = field(default_factory=list)  # free scalar symbols other than n
    persistent: dict = field(default_factory=dict)  # name -> shape: params and optimizer state (training)

    def __str__(self):
        lines = []
        for k in self.kernels:
            shape = "(" + ", ".join(map(str, self.shape_of(k.out))) + ")"
            if isinstance(k, Gemm):
                a = k.a + (".T" if k.trans_a else "")
                b = k.b + (".T" if k.trans_b else "")
                alpha = "" if k.alpha == 1 else f"{k.alpha}*"
                lines.append(f"{k.out} {shape} = {alpha}gemm({a}, {b})")
            elif isinstance(k, Update):
                ops = ", ".join(f"{o.buffer}:{o.pattern}" for o in k.operands)
                lets = "; ".join(f"{s} = {b}" for s, b in k.lets)
                writes = ", ".join(f"{b} <- {s}" for b, s in k.writes)
                lines.append(f"update {k.out} {shape}: [{lets}] {writes} ({ops})")
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
            inner = self.shape_of(kernel.a)[0 if kernel.trans_a else 1]
            return 2 * r * c * int(sp.sympify(inner).subs(sub))
        shape = kernel.shape if isinstance(kernel, Reduction) else self.shape_of(kernel.out)
        size = int(sp.sympify(shape[0] * shape[1]).subs(sub))
        bodies = [b for _, b in kernel.lets] if isinstance(kernel, Update) else [kernel.body]
        return size * max(1, sum(sp.count_ops(b) for b in bodies))

    def shape_of(self, name):
        if name in self.buffers:
            return self.buffers[name]
        if name in self.persistent:
            return self.persistent[name]
        leaf = {str(l.name): l for l in self.inputs + self.params}[name]
        return tuple(leaf.shape)


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
    _name_outputs(lw, dict(zip(names, roots)))
    return _program(lw, order, names)


def _name_outputs(lw, roots_by_name: dict) -> None:
    """Make buffer ``name`` hold each output (a copy where it is a leaf or already named)."""
    for name, root in roots_by_name.items():
        if lw.buffer_of(root) != name:
            lw.emit(Elementwise(name, V[0], (lw.operand(root),)), root.shape)


def _program(lw, order, output_names, persistent=None) -> Program:
    leaves = [nd for nd in order if isinstance(nd, (Input, Param))]
    scalars = {s for k in lw.kernels for s in _free_scalars(k)} - {sp.Symbol("n", integer=True, positive=True)}
    return Program(
        kernels=lw.kernels,
        buffers=lw.shapes,
        inputs=[l for l in leaves if isinstance(l, Input)],
        params=[l for l in leaves if isinstance(l, Param)],
        outputs={name: name for name in output_names},
        scalars=sorted(scalars, key=str),
        persistent=dict(persistent or {}),
    )


def _free_scalars(k):
    if isinstance(k, Gemm):
        return sp.sympify(k.alpha).free_symbols
    if isinstance(k, Update):
        defined = {s for s, _ in k.lets}
        return {s for _, b in k.lets for s in b.free_symbols if s not in _VSET and s not in defined}
    return {s for s in k.body.free_symbols if s not in _VSET}


def state_buffer(param: str, state: str) -> str:
    """The persistent buffer holding optimizer state ``state`` of ``param``."""
    return f"{state}__{param}"


def _reads_only_own_param(gr, q) -> bool:
    """Updates run one after another, so a fused gradient may read no *other* parameter
    (it would see that parameter's new value) and its own only at the same entry."""
    for a in gr.operands:
        if isinstance(a, Param) and a != q:
            return False
        inner = a.args[0] if isinstance(a, (Broadcast, Transpose)) else None
        if isinstance(inner, Param):
            return False
    return True


def _dedupe_operands(ops, lets):
    unique, remap = [], {}
    for i, o in enumerate(ops):
        if o not in unique:
            unique.append(o)
        remap[V[i]] = V[unique.index(o)]
    return unique, [(s, b.xreplace(remap)) for s, b in lets]


def lower_training(loss, params, optimizer, outputs=None) -> Program:
    """Forward, backward and the optimizer update of every param, as one program.

    Each parameter's update is one ``Update`` kernel; when its gradient ends in an
    elementwise formula used nowhere else, that formula is computed inside the
    update loop instead of being written to a buffer first.
    """
    from .grad import grad
    from .optim import g as g_sym, p as p_sym

    params = list(params)
    outputs = dict(outputs or {})
    grads = grad(loss, params)
    roots = fuse_maps([loss] + [grads[q] for q in params] + list(outputs.values()))
    loss_root, grad_roots = roots[0], roots[1 : 1 + len(params)]
    extra_roots = dict(zip(outputs, roots[1 + len(params) :]))
    uses = use_counts(roots)
    order = topological(roots)
    lw = _Lowerer(uses, order)
    lw.preferred[loss_root] = "loss"
    for name, root in extra_roots.items():
        lw.preferred.setdefault(root, name)
    for q, gr in zip(params, grad_roots):
        if isinstance(gr, Map) and uses[gr] == 1 and _reads_only_own_param(gr, q):
            lw.fused.add(gr)  # computed inside the update loop
    for node in order:
        lw.visit(node)
    _name_outputs(lw, {"loss": loss_root, **extra_roots})
    state_rule, p_rule = optimizer.rule()
    state_syms = [sp.Symbol(k, real=True) for k, _ in state_rule]
    persistent = {}
    for q in params:
        persistent[str(q.name)] = tuple(q.shape)
        for k in optimizer.state:
            persistent[state_buffer(str(q.name), k)] = tuple(q.shape)
    # Every gradient operand is settled before the first update writes a parameter: one
    # that reads a parameter's buffer directly (∂/∂W1 of sum(W1⊙W2) is W2) gets a copy.
    gradient_operands = {}
    for q, gr in zip(params, grad_roots):
        if gr in lw.fused:
            gradient_operands[q] = [lw.operand(a) for a in gr.operands]
            continue
        op = lw.operand(gr)
        if op.buffer in persistent:
            copy = lw.fresh()
            lw.emit(Elementwise(copy, V[0], (op,)), gr.shape)
            op = Operand(copy, "ij")
        gradient_operands[q] = [op]
    for q, gr in zip(params, grad_roots):
        name = str(q.name)
        ops = [Operand(name, "ij")] + [Operand(state_buffer(name, k), "ij") for k in optimizer.state]
        if gr in lw.fused:
            shift = {v: V[len(ops) + j] for j, v in enumerate(gr.lam.variables)}
            g_body = gr.lam.expr.xreplace(shift)
        else:
            g_body = V[len(ops)]
        ops.extend(gradient_operands[q])
        u = sp.symbols(f"_u0:{len(state_rule) + 2}", real=True)
        env = {p_sym: V[0], g_sym: u[0], **{s: V[1 + i] for i, s in enumerate(state_syms)}}
        lets = [(u[0], g_body)]
        for i, (_, expr) in enumerate(state_rule):
            lets.append((u[1 + i], expr.xreplace(env)))
        new_state = {e.xreplace(env): u[1 + i] for i, (_, e) in enumerate(state_rule)}
        lets.append((u[-1], p_rule.xreplace(env).xreplace(new_state)))
        writes = [(state_buffer(name, k), u[1 + i]) for i, k in enumerate(optimizer.state)] + [(name, u[-1])]
        ops, lets = _dedupe_operands(ops, lets)
        lw.kernels.append(Update(name, tuple(lets), tuple(writes), tuple(ops)))
    return _program(lw, order, ["loss", *outputs], persistent)


_VSET = frozenset(V)


class _Lowerer:
    def __init__(self, uses, order):
        self.uses = uses
        self.kernels, self.shapes, self.names = [], {}, {}
        self.fused = set()  # single-use Maps computed inside their consumer (a reduction or an update)
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
