"""Lower expressions (and training's graph writes) to a ``Program`` of kernels.

``lower(outputs, writes)`` is a pure function of the graph: it imports neither the
chain rule nor the optimizers. ``outputs`` is ``{name: expression}`` (buffer ``name``
holds the value afterwards); ``writes`` is ``{leaf: expression}``: after the program
runs, each written leaf (a parameter or a ``State``) holds its expression's value,
computed from the values *before* the program ran. An optimizer step is such writes.

Each node type lowers through one rule in ``LOWER``; a rule emits kernels (``ir``)
through the ``Lowerer`` it is given. Elementwise work fuses: a single-use ``Map``
read only by a reduction is folded into the reduction's loop, and the writes that
share formulas (a parameter and its optimizer state) become one ``Update`` loop that
also computes the gradient's last elementwise formula.

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 3)); b = sd.param("b", 3)
>>> prog = lower({"h": sd.tanh(x @ W + b)})
>>> print(prog)
t0 (n, 3) = gemm(x, W)
h (n, 3) = elementwise[tanh(v0 + v1)](t0:ij, b:j)
"""
from __future__ import annotations

from collections.abc import Mapping

from dataclasses import dataclass

import sympy as sp
from sympy.matrices.expressions import MatAdd, MatMul, MatrixExpr, Transpose

from ..graph.nodes import (
    INDEX_SYMBOLS, VARS, VARSET, Broadcast, Input, Map, Param, RowLogSumExp, State, SumAll, SumCols, SumRows, check_leaf_names, children, n as N,
    walk,
)
from .kernels import (
    Elementwise, Gemm, Operand, Pattern, Program, ReduceAll, ReduceCols, ReduceLogSumExp, ReduceRows, Update,
    check,
)
from ..registry import RuleTable
from ..graph.simplify import fuse_and_walk

#: Lowering rules, one per node type: ``LOWER.lookup(node)(lowerer, node)``.
LOWER = RuleTable("lowering")


def lower(outputs: dict, writes: dict | None = None, notes: dict | None = None) -> Program:
    """Lower ``{name: expression}`` plus graph ``writes`` ``{leaf: expression}`` to a ``Program``.

    ``notes`` (``{graph node: one line}``, e.g. what ``explain`` calls the node) become the
    program's ``notes`` for the buffers that hold those nodes: comments in generated code.
    ``notes`` may be a function returning that dict: it is called the first time a note is
    read (explaining a deep net costs more than lowering it, and a CPU step reads its notes
    only when someone prints ``train.source``).
    """
    names = list(outputs)
    targets = list(writes or {})
    rebuilt = {}
    roots, walked = fuse_and_walk([outputs[k] for k in names] + [writes[t] for t in targets], rebuilt=rebuilt)
    out_roots, write_roots = roots[: len(names)], roots[len(names) :]
    lw = Lowerer(walked)
    check_leaf_names(lw.order + targets)
    for name, root in zip(names, out_roots):
        lw.preferred.setdefault(root, name)  # an output's buffer carries the output's name
    groups = _write_groups(lw, dict(zip(targets, write_roots)), set(out_roots))
    for node in lw.order:
        if node not in lw.in_loop:
            LOWER.lookup(node)(lw, node)
    for name, root in zip(names, out_roots):  # buffer ``name`` must hold each output
        if lw.buffer_of(root) != name:
            lw.emit(Elementwise(name, VARS[0], (lw.operand(root),)), root.shape)
    persistent = {str(t.name): tuple(t.shape) for t in targets}
    for g in groups:
        _lower_write_group(lw, g, persistent)
    leaves = [nd for nd in lw.order if isinstance(nd, (Input, Param, State))]
    scalars = {s for k in lw.kernels for s in _free_scalars(k)} - {N} - INDEX_SYMBOLS
    program = Program(
        kernels=lw.kernels,
        buffers=lw.shapes,
        inputs=[l for l in leaves if isinstance(l, Input)],
        # a State read but not written (running statistics at inference) is passed in like a parameter
        params=[l for l in leaves if isinstance(l, Param) or isinstance(l, State) and str(l.name) not in persistent],
        outputs={name: name for name in names},
        scalars=sorted(scalars, key=str),
        persistent=persistent,
        notes=LazyNotes(lambda: _buffer_notes(notes() if callable(notes) else notes or {}, rebuilt, lw)),
    )
    check(program)  # cheap next to lowering, and a broken program must never reach a backend
    return program


class Lowerer:
    """The state of one lowering: emitted kernels, buffer names and shapes."""

    def __init__(self, walked):
        self.order, self.uses = walked  # fusion's walk of the fused graph: lowering walks no more
        self.kernels, self.shapes, self.names = [], {}, {}
        self.in_loop = set()  # Maps computed inside a consumer's loop (a reduction or an update)
        self.count = 0
        self.preferred = {}
        self.parents = {}
        for node in self.order:
            for c in children(node):
                self.parents.setdefault(c, []).append(node)

    def emit(self, kernel, shape):
        self.kernels.append(kernel)
        self.shapes[kernel.out] = tuple(shape)

    def fresh(self, node=None) -> str:
        if node is not None and node in self.preferred:
            return self.preferred.pop(node)
        self.count += 1
        return f"t{self.count - 1}"

    def name(self, node) -> str:
        """A new buffer for ``node``'s value."""
        self.names[node] = self.fresh(node)
        return self.names[node]

    def buffer_of(self, node) -> str:
        if node not in self.names:  # a view (transpose / broadcast) asked for as a whole array
            self.emit(Elementwise(self.name(node), VARS[0], (self.operand(node),)), node.shape)
        return self.names[node]

    def operand(self, node) -> Operand:
        if isinstance(node, Broadcast):
            x = node.args[0]
            pattern = {(True, True): Pattern.SCALAR, (True, False): Pattern.ROW, (False, True): Pattern.COL}[
                (x.shape[0] == 1, x.shape[1] == 1)]
            return Operand(self.buffer_of(x), pattern)
        if isinstance(node, Transpose):
            return Operand(self.buffer_of(node.arg), Pattern.TRANSPOSE)
        return Operand(self.buffer_of(node), Pattern.SAME)

    def body_of(self, x) -> tuple:
        """``x`` as ``(body, operands)``: a single-use ``Map`` is folded into its consumer."""
        if isinstance(x, Map) and self.uses[x] == 1:
            self.in_loop.add(x)
            return x.lam.expr.xreplace(dict(zip(x.lam.variables, VARS))), tuple(self.operand(a) for a in x.operands)
        return VARS[0], (self.operand(x),)

    def only_reduced(self, node) -> bool:
        parents = self.parents.get(node, ())
        return bool(parents) and all(LOWER.lookup(p) is _lower_reduction for p in parents)


# --------------------------------------------------------------------------- rules


def lower_expansion(lw, node):
    """The LOWER rule of a node that needs no kernel of its own: the nodes of its ``expansion`` (the
    same value built from other nodes), lowered in its place; those the graph already holds are
    reused. Node families register it (conv's ``PickMax``, concat's nodes)."""
    inner = node.expansion
    for part in walk([inner]).order:
        if part not in lw.names:
            LOWER.lookup(part)(lw, part)
    lw.names[node] = lw.buffer_of(inner)


@LOWER.rule(Input, Param, State)
def _lower_leaf(lw, node):
    lw.names[node] = str(node.name)


@LOWER.rule(Broadcast, Transpose)
def _lower_view(lw, node):
    pass  # read through an index pattern by its users


@LOWER.rule(Map)
def _lower_map(lw, node):
    if lw.uses[node] == 1 and lw.only_reduced(node):
        return  # the reduction computes it in its own loop
    body = node.lam.expr.xreplace(dict(zip(node.lam.variables, VARS)))
    ops = tuple(lw.operand(a) for a in node.operands)
    lw.emit(Elementwise(lw.name(node), body, ops), node.shape)


@LOWER.rule(MatAdd)
def _lower_matadd(lw, node):  # SymPy's own ``A + B`` (symdl's ``+`` builds a Map): one elementwise sum
    ops = tuple(lw.operand(a) for a in node.args)
    lw.emit(Elementwise(lw.name(node), sum(VARS[: len(ops)]), ops), node.shape)


@LOWER.rule(MatMul)
def _lower_matmul(lw, node):
    coeff, mats = node.as_coeff_matrices()
    acc = _gemm_operand(lw, mats[0])
    rows = mats[0].shape[0]
    for i, m in enumerate(mats[1:]):
        last = i == len(mats) - 2
        name = lw.name(node) if last else lw.fresh()
        b_op = _gemm_operand(lw, m)
        lw.emit(Gemm(name, acc[0], b_op[0], acc[1], b_op[1], coeff if last else sp.Integer(1)), (rows, m.shape[1]))
        acc = (name, False)


def _gemm_operand(lw, m):
    if isinstance(m, Transpose):
        return lw.buffer_of(m.arg), True
    return lw.buffer_of(m), False


#: The reduction kernel each reduction node lowers to.
REDUCTIONS = {SumRows: ReduceRows, SumCols: ReduceCols, SumAll: ReduceAll, RowLogSumExp: ReduceLogSumExp}


@LOWER.rule(*REDUCTIONS)
def _lower_reduction(lw, node):
    x = node.args[0]
    body, ops = lw.body_of(x)
    lw.emit(REDUCTIONS[type(node)](lw.name(node), body, ops, tuple(x.shape)), node.shape)


# --------------------------------------------------------------------------- writes


@dataclass
class _WriteGroup:
    """Writes computed in one loop: their roots and the Maps inlined into it."""

    targets: list
    roots: list
    maps: list  # in-loop Maps, operands first


def _write_groups(lw, writes: dict, output_roots: set) -> list:
    """Partition the writes into loops: writes that share an elementwise formula share a loop.

    A ``Map`` is computed inside a loop when every one of its users is in that loop
    (the gradient's last formula, the new optimizer state); otherwise it gets a buffer.
    """
    inside = {}  # Map -> index of the group whose loop computes it
    parent = list(range(len(writes)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    items = list(writes.items())
    for i, (_, root) in enumerate(items):
        if isinstance(root, Map) and root not in output_roots:
            if root in inside:
                parent[find(i)] = find(inside[root])
            inside.setdefault(root, i)
    for node in reversed(lw.order):  # users before operands: a Map joins its users' loop
        if not isinstance(node, Map) or node in output_roots:
            continue
        users = lw.parents.get(node, [])
        if not users or lw.uses[node] != len(users) + (node in inside) or not all(u in inside for u in users):
            continue  # read by a kernel outside the loops: it gets a buffer
        first = inside.setdefault(node, inside[users[0]])
        for u in users:
            parent[find(inside[u])] = find(first)
    groups = {}
    for i, (target, root) in enumerate(items):
        g = groups.setdefault(find(i), _WriteGroup([], [], []))
        g.targets.append(target)
        g.roots.append(root)
    for node in lw.order:
        if node in inside:
            lw.in_loop.add(node)
            groups[find(inside[node])].maps.append(node)
    return list(groups.values())


def _lower_write_group(lw, group: _WriteGroup, persistent: dict) -> None:
    """One ``Update`` loop for a group of writes; every operand is read before any write.

    Loops run one after another, so an operand another loop writes (or this loop
    writes and reads at another entry) is first copied: every write sees old values.
    """
    ops, lets, sym = [], [], {}

    def operand_var(node):
        op = lw.operand(node)
        written_elsewhere = op.buffer in persistent and op.buffer not in own
        if written_elsewhere or (op.buffer in own and op.pattern != Pattern.SAME):
            op = Operand(_settled_copy(lw, op, node.shape), Pattern.SAME)
        if op not in ops:
            ops.append(op)
        return VARS[ops.index(op)]

    own = {str(t.name) for t in group.targets}
    u = iter(sp.numbered_symbols("_u", real=True))
    for m in group.maps:
        env = {v: sym[a] if a in sym else operand_var(a) for v, a in zip(m.lam.variables, m.operands)}
        sym[m] = next(u)
        lets.append((sym[m], m.lam.expr.xreplace(env)))
    writes = []
    for target, root in zip(group.targets, group.roots):
        if root not in sym:  # a write of a value computed elsewhere: read it
            sym[root] = next(u)
            lets.append((sym[root], operand_var(root)))
        writes.append((str(target.name), sym[root]))
    lw.kernels.append(Update(str(group.targets[0].name), tuple(lets), tuple(writes), tuple(ops)))


def _settled_copy(lw, op, shape) -> str:
    """A copy of a persistent buffer, made before the first ``Update`` runs."""
    name = lw.fresh()
    lw.shapes[name] = tuple(shape)
    at = next((i for i, k in enumerate(lw.kernels) if isinstance(k, Update)), len(lw.kernels))
    lw.kernels.insert(at, Elementwise(name, VARS[0], (op,)))
    return name


def _structural_ids(roots) -> dict:
    """``{id(node): n}``, equal ``n`` for structurally equal nodes, in time linear in the graph.

    Two graphs built apart (``explain``'s and the gradient's) hold equal but distinct nodes;
    comparing them as dict keys walks each pair of trees again and again (minutes for a deep
    net), while this walks each graph once, operands first.
    """
    canon, ids = {}, {}
    stack = [(r, False) for r in roots]
    while stack:  # by identity, not equality: equal twins are exactly what is being matched
        node, expanded = stack.pop()
        if id(node) in ids:
            continue
        operands = [a for a in node.args if isinstance(a, MatrixExpr)]
        if not expanded:
            stack.append((node, True))
            stack.extend((a, False) for a in operands if id(a) not in ids)
            continue
        head = tuple(ids[id(a)] if isinstance(a, MatrixExpr) else a for a in node.args)
        ids[id(node)] = canon.setdefault((type(node), head), len(canon))
    return ids


class LazyNotes(Mapping):
    """``{buffer: note}``, computed on first use."""

    def __init__(self, compute):
        self._compute, self._notes = compute, None

    def _get(self) -> dict:
        if self._notes is None:
            self._notes, self._compute = self._compute(), None
        return self._notes

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self):
        return len(self._get())


def _buffer_notes(notes: dict, rebuilt: dict, lw) -> dict:
    """``{buffer: note}`` for the buffers that hold a node ``notes`` names."""
    if not notes:
        return {}
    ids = _structural_ids(list(notes) + list(rebuilt))
    by_id = {ids[id(nd)]: text for nd, text in notes.items()}
    out = {}
    for old, new in rebuilt.items():
        text = by_id.get(ids[id(old)])
        name = lw.names.get(new) if text is not None else None
        if name is not None and name in lw.shapes:
            out.setdefault(name, text)
    return out


def _free_scalars(k) -> set:
    if isinstance(k, Gemm):
        return sp.sympify(k.alpha).free_symbols
    if isinstance(k, Update):
        defined = {s for s, _ in k.lets}
        return {s for _, b in k.lets for s in sp.sympify(b).free_symbols if s not in VARSET and s not in defined}
    return {s for b in k.bodies() for s in sp.sympify(b).free_symbols if s not in VARSET}
