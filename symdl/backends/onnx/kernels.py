"""Each kernel class of the IR as ONNX nodes: ``emit`` has one handler per class (``ir.KERNELS``).

A program prints kernel by kernel into one ``Graph``; ``values`` maps every buffer name to the
ONNX value holding it (the caller fills in the program's externals and scalars first).

>>> import numpy as np, symdl as sd
>>> from symdl.ir.lowering import lower
>>> from symdl.backends.onnx.graph import Graph
>>> x = sd.input("x", 2); W = sd.param("W", (2, 3)); b = sd.param("b", 3)
>>> program = lower({"h": sd.tanh(x @ W + b)})
>>> g = Graph(np.float32, opset=17); g.n = "n"
>>> values = emit_program(g, program, {"x": "x", "W": "W", "b": "b"})
>>> [node.op_type for node in g.nodes]
['Gemm', 'Add', 'Tanh']
"""
from __future__ import annotations

from functools import singledispatch

import numpy as np
import sympy as sp

from ...formulas.activations import expand_activations
from ...graph.nodes import COL_INDEX, ROW_INDEX, VARS
from ...ir.kernels import (
    AvgPool, AvgPoolGrad, BlockGemm, Col2Im, ColumnCopy, Elementwise, Gather, Gemm, Im2Col, MaxPool, MaxPoolGrad, Pattern, Program,
    ReduceAll, ReduceCols, ReduceLogSumExp, ReduceRows, Reshape, ScatterAdd, Update,
)
from . import images
from .bodies import Body
from .graph import Graph, onnx_dtype


class Context:
    """What a kernel's printer reads: the graph, the program, and each buffer's ONNX value."""

    def __init__(self, graph: Graph, program: Program, values: dict):
        self.g, self.program, self.values = graph, program, values

    def value(self, buffer: str) -> str:
        if buffer not in self.values:
            raise KeyError(f"ONNX export: buffer {buffer!r} has no value (an external the export was not given)")
        v = self.values[buffer]
        if isinstance(v, Patches):  # something other than a convolution's product reads the patch matrix
            v = self.values[buffer] = v.build(self)
        return v

    def view(self, operand) -> str:
        """An operand as ONNX reads it: broadcasting does what ROW, COL and SCALAR say; a
        TRANSPOSE is a ``Transpose`` node."""
        v = self.value(operand.buffer)
        return self.g.node("Transpose", [v], perm=[1, 0]) if operand.pattern == Pattern.TRANSPOSE else v

    def scalars(self) -> dict:
        return {s: self.value(str(s)) for s in self.program.scalars}

    def loop(self, body, operands, shape) -> str:
        """``body`` over ``operands`` at every entry of ``shape`` (expanded there when the operands
        it reads broadcast to less)."""
        body = expand_activations(sp.sympify(body), use_impl=True)  # each activation's stable form
        used = [i for i, v in enumerate(VARS[: len(operands)]) if v in body.free_symbols]
        symbols = {**self.scalars(), **{VARS[i]: self.view(operands[i]) for i in used}}
        for axis, index in enumerate((ROW_INDEX, COL_INDEX)):  # a body that reads its position (a mask)
            if index in body.free_symbols:
                symbols[index] = self.position(shape, axis)
        out = Body(self.g, symbols).value(body)
        read = {operands[i].pattern for i in used}
        if not (read & {Pattern.SAME, Pattern.TRANSPOSE} or {Pattern.ROW, Pattern.COL} <= read):
            out = self.g.node("Expand", [out, self.g.shape(shape)])
        return out


    def position(self, shape, axis: int) -> str:
        """The row (``axis`` 0, a column ``(rows, 1)``) or column (a row ``(1, cols)``) numbers of
        ``shape`` as floats: what a body's ``i`` or ``j`` reads."""
        g = self.g
        size = g.size(shape[axis])
        count = g.node("Squeeze", [size, g.const([0], np.int64)])
        numbers = g.node("Range", [g.const(0, np.int64), count, g.const(1, np.int64)])
        numbers = g.node("Cast", [numbers], to=onnx_dtype(g.dtype))
        return g.node("Unsqueeze", [numbers, g.const([1 - axis], np.int64)])


class Patches:
    """An ``Im2Col`` not printed yet: a product of it with a kernel becomes one ONNX ``Conv``
    (``graph.native_images``); any other reader builds the patch matrix (a gather)."""

    def __init__(self, kernel: Im2Col):
        self.kernel = kernel

    def build(self, ctx) -> str:
        g = self.kernel.geometry
        table = images.window_index(g, ("oy", "ox", "dy", "dx", "c"))
        cols = images.gather(ctx.g, ctx.value(self.kernel.operands[0].buffer), _entries(g)[0], table)
        return images.pixel_rows(ctx.g, cols, g.kh * g.kw * g.C)


def emit_program(graph: Graph, program: Program, values: dict) -> dict:
    """Print every kernel of ``program``; returns ``values`` with every buffer added."""
    values = dict(values)
    ctx = Context(graph, program, values)
    for k in program.kernels:
        values[k.out] = emit(k, ctx)
    for buffer in program.outputs.values():
        ctx.value(buffer)  # an output is built even where a convolution would have read it
    return values


@singledispatch
def emit(kernel, ctx: Context) -> str:
    """The ONNX value of one kernel's output: one handler per kernel class (``ir.KERNELS``)."""
    raise NotImplementedError(f"onnx backend: no printer for {type(kernel).__name__}")


@emit.register
def _gemm(k: Gemm, ctx):
    patches = ctx.values.get(k.a)
    if isinstance(patches, Patches) and not k.trans_a and not k.trans_b and k.alpha == 1:
        out = images.native_conv(ctx.g, patches.kernel.geometry, ctx.value(patches.kernel.operands[0].buffer),
                                 ctx.value(k.b), int(ctx.program.shape_of(k.b)[1]))
        if out is not None:
            return out
    return ctx.g.node("Gemm", [ctx.value(k.a), ctx.value(k.b)], transA=int(k.trans_a), transB=int(k.trans_b),
                      alpha=float(k.alpha))


@emit.register
def _column_copy(k: ColumnCopy, ctx):
    """``Slice`` of the columns, then ``Pad`` with zero columns to the output's width."""
    g = ctx.g
    x = ctx.value(k.operands[0].buffer)
    width = int(ctx.program.shape_of(k.out)[1])
    if k.start or k.width != int(ctx.program.shape_of(k.operands[0].buffer)[1]):
        x = g.node("Slice", [x, g.const([k.start], np.int64), g.const([k.start + k.width], np.int64),
                             g.const([1], np.int64)])
    if k.at or k.at + k.width != width:
        x = g.node("Pad", [x, g.const([0, k.at, 0, width - k.at - k.width], np.int64)])
    return x


@emit.register
def _block_gemm(k: BlockGemm, ctx):
    """A ``MatMul`` of the buffers viewed as stacks of blocks ``(blocks, rows, cols)``."""
    g = ctx.g
    ro, ra, rb = k.rows

    def stack(name, rows, trans):
        v = g.reshape(ctx.value(name), [-1, int(rows), int(ctx.program.shape_of(name)[1])])
        return g.node("Transpose", [v], perm=[0, 2, 1]) if trans else v

    out = g.node("MatMul", [stack(k.a, ra, k.trans_a), stack(k.b, rb, k.trans_b)])
    if k.alpha != 1:
        out = g.node("Mul", [out, g.const(float(k.alpha))])
    return g.reshape(out, [-1, int(ctx.program.shape_of(k.out)[1])])


@emit.register
def _elementwise(k: Elementwise, ctx):
    return ctx.loop(k.body, k.operands, ctx.program.shape_of(k.out))


@emit.register
def _update(k: Update, ctx):
    raise NotImplementedError(f"ONNX export prints forward and gradient programs; the in-place update of "
                              f"{[b for b, _ in k.writes]} (a training step's writes) has no ONNX form here")


@emit.register
def _reduce_rows(k: ReduceRows, ctx):
    return ctx.g.reduce("ReduceSum", ctx.loop(k.body, k.operands, k.shape), [0])


@emit.register
def _reduce_cols(k: ReduceCols, ctx):
    return ctx.g.reduce("ReduceSum", ctx.loop(k.body, k.operands, k.shape), [1])


@emit.register
def _reduce_all(k: ReduceAll, ctx):
    return ctx.g.reduce("ReduceSum", ctx.loop(k.body, k.operands, k.shape), [0, 1])


@emit.register
def _reduce_log_sum_exp(k: ReduceLogSumExp, ctx):
    """Each row's maximum subtracted before ``exp``, as every backend does."""
    g = ctx.g
    z = ctx.loop(k.body, k.operands, k.shape)
    m = g.reduce("ReduceMax", z, [1])
    total = g.reduce("ReduceSum", g.node("Exp", [g.node("Sub", [z, m])]), [1])
    return g.node("Add", [m, g.node("Log", [total])])


@emit.register
def _reshape(k: Reshape, ctx):
    return ctx.g.reshape(ctx.value(k.operands[0].buffer), ctx.program.shape_of(k.out))


# --------------------------------------------------------------------------- embeddings


def _row_indices(ctx, ids) -> str:
    """The ``(R, 1)`` float ids as int64 row numbers (ONNX's index type)."""
    from onnx import TensorProto

    return ctx.g.node("Cast", [ctx.value(ids)], to=TensorProto.INT64)


@emit.register
def _gather(k: Gather, ctx):
    """ONNX ``Gather`` along axis 0 with the ids as a vector: rows ``(R, d)``."""
    table, ids = (o.buffer for o in k.operands)
    flat = ctx.g.reshape(_row_indices(ctx, ids), (ctx.program.shape_of(ids)[0],))
    return ctx.g.node("Gather", [ctx.value(table), flat], axis=0)


@emit.register
def _scatter_add(k: ScatterAdd, ctx):
    """``ScatterND`` with ``reduction="add"`` (opset 16) into a zero ``(V, d)``: a repeated id adds."""
    if ctx.g.opset < 16:
        raise NotImplementedError(f"ONNX export: the embedding gradient (scatter_add) needs ScatterND's reduction, "
                                  f"opset >= 16; this export uses opset {ctx.g.opset}")
    ids, G = (o.buffer for o in k.operands)
    V, d = (int(x) for x in ctx.program.shape_of(k.out))
    zeros = ctx.g.const(np.zeros((V, d)))
    return ctx.g.node("ScatterND", [zeros, _row_indices(ctx, ids), ctx.value(G)], reduction="add")


# --------------------------------------------------------------------------- image kernels


def _entries(g) -> tuple:
    """Entries per image of the input ``H·W·C`` and of the pooled output ``OH·OW·C``."""
    return g.H * g.W * g.C, g.OH * g.OW * g.C


@emit.register
def _im2col(k: Im2Col, ctx):
    patches = Patches(k)
    return patches if ctx.g.native_images else patches.build(ctx)


@emit.register
def _col2im(k: Col2Im, ctx):
    g = k.geometry
    dest = images.window_index(g, ("oy", "ox", "dy", "dx", "c"))
    summed = images.scatter_sum(ctx.g, ctx.value(k.operands[0].buffer), dest, _entries(g)[0])
    return images.pixel_rows(ctx.g, summed, g.C)


def _windows(ctx, k, fill) -> str:
    """``(n, OH·OW·C, kh·kw)``: every window of the first operand, one row per output entry."""
    g = k.geometry
    table = images.window_index(g, ("oy", "ox", "c", "dy", "dx")).reshape(-1, g.kh * g.kw)
    return images.gather(ctx.g, ctx.value(k.operands[0].buffer), _entries(g)[0], table, fill)


@emit.register
def _max_pool(k: MaxPool, ctx):
    native = images.native_pool(ctx.g, "MaxPool", k.geometry, ctx.value(k.operands[0].buffer))
    if native is not None:
        return native
    pooled = ctx.g.reduce("ReduceMax", _windows(ctx, k, -np.inf), [2], keepdims=0)
    return images.pixel_rows(ctx.g, pooled, k.geometry.C)


@emit.register
def _avg_pool(k: AvgPool, ctx):
    native = images.native_pool(ctx.g, "AveragePool", k.geometry, ctx.value(k.operands[0].buffer))
    if native is not None:
        return native
    g = k.geometry
    total = ctx.g.reduce("ReduceSum", _windows(ctx, k, 0.0), [2], keepdims=0)
    return images.pixel_rows(ctx.g, ctx.g.node("Div", [total, ctx.g.const(float(g.kh * g.kw))]), g.C)


@emit.register
def _max_pool_grad(k: MaxPoolGrad, ctx):
    """Each window's ``G`` to its first arg-max (``ArgMax`` keeps the first), routed back by the
    transposed gather."""
    G, g = ctx.g, k.geometry
    windows = _windows(ctx, k, -np.inf)
    arg = G.node("ArgMax", [windows], axis=2, keepdims=1, select_last_index=0)
    chosen = G.node("Equal", [arg, G.const(np.arange(g.kh * g.kw), np.int64)])
    grad = G.node("Reshape", [ctx.value(k.operands[1].buffer), G.const([-1, _entries(g)[1], 1], np.int64)])
    share = G.node("Where", [chosen, grad, G.const(0.0)])
    dest = images.window_index(g, ("oy", "ox", "c", "dy", "dx"))
    return images.pixel_rows(G, images.scatter_sum(G, share, dest, _entries(g)[0]), g.C)


@emit.register
def _avg_pool_grad(k: AvgPoolGrad, ctx):
    """Each window's ``G`` shared evenly by its pixels: the transposed gather of the window table."""
    G, g = ctx.g, k.geometry
    dest = images.window_index(g, ("oy", "ox", "c", "dy", "dx"))
    grad = G.node("Div", [ctx.value(k.operands[0].buffer), G.const(float(g.kh * g.kw))])
    # every window entry reads G at its (oy, ox, c): the table of G's entries, window by window
    spread = G.node("Expand", [G.node("Reshape", [grad, G.const([-1, _entries(g)[1], 1], np.int64)]),
                               G.const([1, 1, g.kh * g.kw], np.int64)])
    return images.pixel_rows(G, images.scatter_sum(G, spread, dest, _entries(g)[0]), g.C)



# --------------------------------------------------------------------------- recurrence
# ``ir.Scan`` / ``ir.ScanGrad`` unrolled over the steps (T is static): per step, the gates are column
# gathers of the step's rows, the recurrent product a ``MatMul``, the cell's formulas (and for the
# backward their ``sp.diff``, ``scan_code.backward_exprs``) printed by ``Body``; the steps are stacked
# along a step axis at the end.
from ...ir.kernels import Scan, ScanGrad  # noqa: E402
from ..scan_code import _delta_symbols, backward_exprs, extras_exprs, extras_of  # noqa: E402


class _Steps:
    """A ``(n·T, w)`` buffer as ``(n, T, w)``: a step's rows ``(n, w)`` and column blocks of them."""

    def __init__(self, ctx, buffer, T):
        self.ctx, self.T = ctx, T
        w = ctx.program.shape_of(buffer)[1]
        rows = ctx.program.shape_of(buffer)[0]
        self.value = ctx.g.reshape(ctx.value(buffer), (rows / T, T, w))

    def step(self, t) -> str:
        g = self.ctx.g
        return g.node("Gather", [self.value, g.const(np.array(t), np.int64)], axis=1)


def _block(ctx, value, lo, hi) -> str:
    g = ctx.g
    return g.node("Gather", [value, g.const(np.arange(lo, hi), np.int64)], axis=1)


def _stack(ctx, rows: list, shape) -> str:
    """Per-step ``(n, w)`` values in step order, as the ``(n·T, w)`` buffer."""
    g = ctx.g
    steps = [g.node("Unsqueeze", [r, g.const(np.array([1]), np.int64)]) for r in rows]
    return g.reshape(g.node("Concat", steps, axis=1) if len(steps) > 1 else steps[0], shape)


def _scan_setup(k, ctx, U_at, B_at):
    T = int(k.steps[0])
    U = ctx.value(k.operands[U_at].buffer)
    u = int(ctx.program.shape_of(k.operands[U_at].buffer)[0])
    if isinstance(k, Scan):  # it reads Uᵀ (k·u, u)
        u = int(ctx.program.shape_of(k.operands[U_at].buffer)[1])
        U = ctx.g.node("Transpose", [U], perm=[1, 0])
    bx = bu = None
    B_op = k.optional()["B"]
    if B_op is not None:
        B = ctx.value(B_op.buffer)
        g = ctx.g
        bx = g.node("Gather", [B, g.const(np.array([0]), np.int64)], axis=0)
        if int(ctx.program.shape_of(B_op.buffer)[0]) == 2:
            bu = g.node("Gather", [B, g.const(np.array([1]), np.int64)], axis=0)
    order = lambda rev, t: T - 1 - t if rev else t  # noqa: E731
    return T, U, u, bx, bu, order


def _extras(k, ctx, T, u):
    """``symbols(ri, ro)``: the extra inputs' variables of a step, ``EI`` at its input row, ``EO`` at its
    output row (extra ``m`` of unit ``j`` in column ``m·u + j``)."""
    parts = [(_Steps(ctx, E.buffer, T), count, at_out, first) for E, first, count, at_out in extras_of(k)]

    def symbols(ri, ro):
        out = {}
        for steps, count, at_out, at in parts:
            row = steps.step(ro if at_out else ri)
            out.update({VARS[at + m]: _block(ctx, row, m * u, (m + 1) * u) for m in range(count)})
        return out

    return symbols


@emit.register
def _scan(k: Scan, ctx):
    g = ctx.g
    T, U, u, bx, bu, order = _scan_setup(k, ctx, 1, 2)
    XP = _Steps(ctx, k.operands[0].buffer, T)
    extras = _extras(k, ctx, T, u)
    kk, s = k.gates, k.states
    cell = [expand_activations(sp.sympify(b), use_impl=True) for b in k.cell]
    rows, prev = [None] * T, None
    for t in range(T):
        x = XP.step(order(k.reverse_in, t))
        if bx is not None:
            x = g.node("Add", [x, bx])
        symbols = {VARS[gi]: _block(ctx, x, gi * u, (gi + 1) * u) for gi in range(kk)}
        symbols.update(extras(order(k.reverse_in, t), order(k.reverse_out, t)))
        env = {}
        if prev is None:
            for gi in range(kk):
                if bu is None:
                    env[VARS[kk + gi]] = sp.Integer(0)
                else:
                    symbols[VARS[kk + gi]] = _block(ctx, bu, gi * u, (gi + 1) * u)
            env.update({VARS[2 * kk + c]: sp.Integer(0) for c in range(s)})
        else:
            up = g.node("MatMul", [_block(ctx, prev, 0, u), U])
            if bu is not None:
                up = g.node("Add", [up, bu])
            symbols.update({VARS[kk + gi]: _block(ctx, up, gi * u, (gi + 1) * u) for gi in range(kk)})
            symbols.update({VARS[2 * kk + c]: _block(ctx, prev, c * u, (c + 1) * u) for c in range(s)})
        body = Body(g, symbols)
        states = [body.value(b.xreplace(env)) for b in cell]
        prev = g.node("Concat", states, axis=1) if s > 1 else states[0]
        rows[order(k.reverse_out, t)] = prev
    return _stack(ctx, rows, ctx.program.shape_of(k.out))


@emit.register
def _scan_grad(k: ScanGrad, ctx):
    g = ctx.g
    T, U, u, bx, bu, order = _scan_setup(k, ctx, 4, 5)
    XP, UP, S, G = (_Steps(ctx, o.buffer, T) for o in k.operands[:4])
    kk, s = k.gates, k.states
    dx, du, carry_exprs, dextra = (
        [expand_activations(e, use_impl=True) for e in part] for part in backward_exprs(k) + (extras_exprs(k),))
    extras = _extras(k, ctx, T, u)
    deltas = _delta_symbols(s)
    dxp, dup, dss = [None] * T, [None] * T, [None] * T
    dei, deo = [None] * T, [None] * T
    Ut = g.node("Transpose", [U], perm=[1, 0])
    carry = None
    for t in reversed(range(T)):
        ri, ro = order(k.reverse_in, t), order(k.reverse_out, t)
        D = G.step(ro) if carry is None else g.node("Add", [G.step(ro), carry])
        x = XP.step(ri) if bx is None else g.node("Add", [XP.step(ri), bx])
        up = UP.step(ro) if bu is None else g.node("Add", [UP.step(ro), bu])
        symbols = {VARS[gi]: _block(ctx, x, gi * u, (gi + 1) * u) for gi in range(kk)}
        symbols.update({VARS[kk + gi]: _block(ctx, up, gi * u, (gi + 1) * u) for gi in range(kk)})
        symbols.update({d: _block(ctx, D, c * u, (c + 1) * u) for c, d in enumerate(deltas)})
        symbols.update(extras(ri, ro))
        env = {}
        if t > 0:
            prev = S.step(order(k.reverse_out, t - 1))
            symbols.update({VARS[2 * kk + c]: _block(ctx, prev, c * u, (c + 1) * u) for c in range(s)})
        else:
            env = {VARS[2 * kk + c]: sp.Integer(0) for c in range(s)}
        body = Body(g, symbols)
        batch = ctx.program.shape_of(k.out)[0] / T
        width = lambda e: _full(ctx, body, e.xreplace(env), (batch, u))  # noqa: E731
        gx = [width(e) for e in dx]
        gu = [width(e) for e in du]
        dxp[ri] = g.node("Concat", gx, axis=1) if kk > 1 else gx[0]
        dup[ro] = g.node("Concat", gu, axis=1) if kk > 1 else gu[0]
        dss[ro] = D
        ge = [width(e) for e in dextra]
        if k.extras_in:
            dei[ri] = g.node("Concat", ge[:k.extras_in], axis=1) if k.extras_in > 1 else ge[0]
        if k.extras_out:
            deo[ro] = g.node("Concat", ge[k.extras_in:], axis=1) if k.extras_out > 1 else ge[k.extras_in]
        if t > 0:
            parts = [width(e) for e in carry_exprs]
            parts[0] = g.node("Add", [parts[0], g.node("MatMul", [dup[ro], Ut])])
            carry = g.node("Concat", parts, axis=1) if s > 1 else parts[0]
    rows = [g.node("Concat", [a for a in parts if a is not None], axis=1) for parts in zip(dxp, dup, dss, dei, deo)]
    return _stack(ctx, rows, ctx.program.shape_of(k.out))


def _full(ctx, body, e, shape) -> str:
    """``e``'s value as a full ``(n, u)`` block (a constant, such as a zero derivative, expanded)."""
    v = body.value(e)
    if not (sp.sympify(e).free_symbols & set(body.symbols)):
        v = ctx.g.node("Expand", [v, ctx.g.shape(shape)])
    return v
