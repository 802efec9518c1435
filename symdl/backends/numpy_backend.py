"""The reference backend: each kernel becomes a few vectorised NumPy lines.

It is the oracle the compiled backends are compared with, so it is written for
obviousness, not speed. The generated module is kept as ``runner.source``.
"""
from __future__ import annotations

from functools import singledispatch

import numpy as np

from ..ir.kernels import (
    AvgPool, AvgPoolGrad, BlockGemm, Col2Im, ColumnCopy, Elementwise, Gather, Gemm, Im2Col, MaxPool, MaxPoolGrad, Pattern, Program, ReduceAll,
    ReduceCols, ReduceLogSumExp, ReduceRows, Reshape, ScatterAdd, Update,
)
from .base import Runner as RunnerBase, buf, indent
from .scalar_code import body_code, dims, helper_source, lets_code, uses_indices


def _views(operands) -> list:
    """Whole-array operands: NumPy broadcasting does what the row/column/scalar patterns say."""
    return [f"{buf(o.buffer)}.T" if o.pattern == Pattern.TRANSPOSE else buf(o.buffer) for o in operands]


def _indices(bodies, shape) -> list:
    """Bind the loop indices ``i`` (a column) and ``j`` (a row) when a body reads them."""
    if not any(uses_indices(b) for b in bodies):
        return []
    rows, cols = dims(shape)
    return [f"i = numpy.arange({rows}).reshape(-1, 1)", f"j = numpy.arange({cols}).reshape(1, -1)"]


@singledispatch
def emit(kernel, program: Program) -> list:
    """The NumPy lines of one kernel: one handler per kernel class (``ir.KERNELS``)."""
    raise NotImplementedError(f"numpy backend: no printer for {type(kernel).__name__}")


@emit.register
def _gemm(k: Gemm, program):
    a = buf(k.a) + (".T" if k.trans_a else "")
    b = buf(k.b) + (".T" if k.trans_b else "")
    lines = [f"numpy.dot({a}, {b}, out={buf(k.out)})"]
    if k.alpha != 1:
        lines.append(f"{buf(k.out)} *= {float(k.alpha)!r}")
    return lines


@emit.register
def _column_copy(k: ColumnCopy, program):
    out, x = buf(k.out), buf(k.operands[0].buffer)
    lines = [] if k.at == 0 and k.width == program.shape_of(k.out)[1] else [f"{out}[...] = 0.0"]
    return lines + [f"{out}[:, {k.at}:{k.at + k.width}] = {x}[:, {k.start}:{k.start + k.width}]"]


@emit.register
def _block_gemm(k: BlockGemm, program):
    """One ``numpy.matmul`` over the buffers viewed as stacks of blocks ``(blocks, rows, cols)``."""
    def stack(name, rows, trans):
        return f"{buf(name)}.reshape(-1, {rows}, {buf(name)}.shape[1])" + (".transpose(0, 2, 1)" if trans else "")

    alpha = "" if k.alpha == 1 else f"{float(k.alpha)!r} * "
    ro, ra, rb = k.rows
    return [f"{stack(k.out, ro, False)}[...] = {alpha}numpy.matmul({stack(k.a, ra, k.trans_a)}, "
            f"{stack(k.b, rb, k.trans_b)})"]


@emit.register
def _elementwise(k: Elementwise, program):
    lines, result = body_code(k.body, _views(k.operands), "array")
    return _indices(k.bodies(), program.shape_of(k.out)) + lines + [f"{buf(k.out)}[...] = {result}"]


@emit.register
def _update(k: Update, program):
    return (_indices(k.bodies(), program.shape_of(k.out)) + lets_code(k.lets, _views(k.operands), "array")
            + [f"{buf(b)}[...] = {sym}" for b, sym in k.writes])


def _reduced(k) -> list:
    """Lines binding ``_z``: a reduction's body at every entry of its input shape."""
    lines, result = body_code(k.body, _views(k.operands), "array")
    rows, cols = (str(d) for d in k.shape)
    return _indices(k.bodies(), k.shape) + lines + [f"_z = numpy.broadcast_to({result}, ({rows}, {cols}))"]


@emit.register
def _reduce_rows(k: ReduceRows, program):
    return _reduced(k) + [f"{buf(k.out)}[...] = numpy.sum(_z, axis=0, keepdims=True)"]


@emit.register
def _reduce_cols(k: ReduceCols, program):
    return _reduced(k) + [f"{buf(k.out)}[...] = numpy.sum(_z, axis=1, keepdims=True)"]


@emit.register
def _reduce_all(k: ReduceAll, program):
    return _reduced(k) + [f"{buf(k.out)}[0, 0] = numpy.sum(_z)"]


@emit.register
def _reduce_log_sum_exp(k: ReduceLogSumExp, program):
    return _reduced(k) + ["_m = numpy.max(_z, axis=1, keepdims=True)",
                          f"{buf(k.out)}[...] = _m + numpy.log(numpy.sum(numpy.exp(_z - _m), axis=1, keepdims=True))"]


# --------------------------------------------------------------------------- image kernels
# Convolution and pooling over NHWC batches held as (n·H·W, C) matrices: the windows are
# strided slices of a zero-padded (n, H', W', C) view, one slice per window offset (dy, dx).


class _Padded:
    """The NumPy text an image kernel is written in: a zero-padded ``(n, H', W', C)`` scratch
    ``_pad`` large enough that every window lies inside it, its strided window slices and its
    unpadded interior."""

    def __init__(self, k):
        g = self.g = k.geometry
        self.out, self.src = buf(k.out), [buf(o.buffer) for o in k.operands]
        hp = max(g.H + g.pt, (g.OH - 1) * g.sh + g.kh)  # padded height: every window inside
        wp = max(g.W + g.pl, (g.OW - 1) * g.sw + g.kw)
        self.zeros = [f"_pad = numpy.zeros((n, {hp}, {wp}, {g.C}), {self.out}.dtype)"]
        # the entries at offset (dy, dx) of every window, one per output pixel
        self.window = f"_pad[:, dy:dy + {(g.OH - 1) * g.sh + 1}:{g.sh}, dx:dx + {(g.OW - 1) * g.sw + 1}:{g.sw}, :]"
        self.inner = f"_pad[:, {g.pt}:{g.pt + g.H}, {g.pl}:{g.pl + g.W}, :]"
        self.offsets = [f"for dy in range({g.kh}):", f"    for dx in range({g.kw}):"]
        self.images = f"(n, {g.OH}, {g.OW}, {g.C})"

    def load(self) -> str:
        """Copy the first operand (an image batch) into the interior."""
        g = self.g
        return f"{self.inner}[...] = {self.src[0]}.reshape(n, {g.H}, {g.W}, {g.C})"

    def stack(self) -> list:
        """``_w``: every window's entries along a new axis 3."""
        window = self.window.replace("dy", "_dy").replace("dx", "_dx")
        return [f"_w = numpy.stack([{window} for _dy in range({self.g.kh}) for _dx in range({self.g.kw})], axis=3)"]

    def patches(self, matrix) -> str:
        """``matrix`` (a patch matrix) viewed as ``(n, OH, OW, kh, kw, C)``."""
        g = self.g
        return f"{matrix}.reshape(n, {g.OH}, {g.OW}, {g.kh}, {g.kw}, {g.C})"

    def store(self) -> str:
        """The interior, written to the output."""
        return f"{self.out}[...] = {self.inner}.reshape({self.out}.shape)"


@emit.register
def _im2col(k: Im2Col, program):
    p = _Padded(k)
    return p.zeros + [p.load(), f"_cols = {p.patches(p.out)}", *p.offsets,
                      f"        _cols[:, :, :, dy, dx, :] = {p.window}"]


@emit.register
def _col2im(k: Col2Im, program):
    p = _Padded(k)
    return p.zeros + [f"_cols = {p.patches(p.src[0])}", *p.offsets, f"        {p.window} += _cols[:, :, :, dy, dx, :]",
                      p.store()]


@emit.register
def _max_pool(k: MaxPool, program):
    p = _Padded(k)
    return p.zeros + ["_pad[...] = -numpy.inf", p.load()] + p.stack() + \
        [f"{p.out}[...] = _w.max(axis=3).reshape({p.out}.shape)"]


@emit.register
def _avg_pool(k: AvgPool, program):
    p = _Padded(k)
    return p.zeros + [p.load()] + p.stack() + [f"{p.out}[...] = _w.mean(axis=3).reshape({p.out}.shape)"]


@emit.register
def _max_pool_grad(k: MaxPoolGrad, program):
    """The first arg-max of each window takes the window's gradient (NumPy's argmax)."""
    p = _Padded(k)
    return p.zeros + ["_pad[...] = -numpy.inf", p.load()] + p.stack() + [
        "_arg = _w.argmax(axis=3)", "_pad[...] = 0.0", *p.offsets,
        f"        {p.window} += numpy.where(_arg == dy * {p.g.kw} + dx, {p.src[1]}.reshape({p.images}), 0.0)",
        p.store()]


@emit.register
def _avg_pool_grad(k: AvgPoolGrad, program):
    p = _Padded(k)
    return p.zeros + [*p.offsets, f"        {p.window} += {p.src[0]}.reshape({p.images}) / {p.g.kh * p.g.kw}",
                      p.store()]


@emit.register
def _reshape(k: Reshape, program):
    return [f"{buf(k.out)}.reshape(-1)[...] = {buf(k.operands[0].buffer)}.reshape(-1)"]


# --------------------------------------------------------------------------- embeddings
# The ids are exact integers held in the float dtype (``ir.Gather``): a row lookup and its adjoint.


@emit.register
def _gather(k: Gather, program):
    table, ids = (buf(o.buffer) for o in k.operands)
    return [f"{buf(k.out)}[...] = {table}[{ids}[:, 0].astype(numpy.int64)]"]


@emit.register
def _scatter_add(k: ScatterAdd, program):
    """``numpy.add.at``: a repeated id adds every one of its rows (plain indexing would keep one)."""
    ids, G = (buf(o.buffer) for o in k.operands)
    return [f"{buf(k.out)}[...] = 0.0", f"numpy.add.at({buf(k.out)}, {ids}[:, 0].astype(numpy.int64), {G})"]


def generate(program: Program) -> str:
    """The module source for ``program``: a function ``run(bufs, n, scalars)``."""
    names = program.externals + list(program.persistent) + list(program.buffers)
    body = [f"{buf(nm)} = bufs[{nm!r}]" for nm in names]
    body += [f"{s} = scalars[{str(s)!r}]" for s in program.scalars]
    for k in program.kernels:
        body.append(f"# {k.out} = {k.kind}{program.note(k.out)}")
        body += emit(k, program)
    return (
        "# generated by symdl (numpy reference backend)\n"
        "import math\nimport numpy\nimport scipy.special\n\n"
        + helper_source(program, "array") + "\n"
        "def run(bufs, n, scalars):\n" + "\n".join(indent(body)) + "\n"
    )


class Runner(RunnerBase):
    """Runs a program with NumPy over the shared arena layout."""

    def __init__(self, program: Program, dtype):
        super().__init__(program, dtype)
        self.source = generate(program)
        namespace: dict = {}
        exec(compile(self.source, "<symdl numpy program>", "exec"), namespace)  # noqa: S102 - our own source
        self._run = namespace["run"]

    def call(self, external: list, scalars: list, n: int) -> float:
        bufs = self.buffers(n)
        bufs.update(zip(self.external, external))
        with np.errstate(over="ignore", under="ignore"):  # exp(1000) -> inf -> σ = 0 is the right answer
            self._run(bufs, n, dict(zip(self.scalar_names, scalars)))
        return float(bufs["loss"][0, 0]) if "loss" in self.program.outputs else 0.0


def compile_program(program: Program, dtype) -> Runner:
    return Runner(program, dtype)


# --------------------------------------------------------------------------- recurrence
# ``ir.Scan`` / ``ir.ScanGrad``: a Python loop over the steps, every sequence at once (``scan_code``).
from ..ir.kernels import Scan, ScanGrad  # noqa: E402
from .scan_code import array_lines  # noqa: E402


@emit.register(Scan)
@emit.register(ScanGrad)
def _scan(k, program):
    return array_lines(k, program)
