"""The image kernels (``ir.ImageKernel``) as ONNX gathers over constant index tables.

An image batch ``(n·H·W, C)`` is, per image, ``H·W·C`` entries in NHWC order. Every image
kernel is a *gather*: each output entry reads entries of its input at positions the geometry
fixes (``window_index``), so each kernel is ``Gather`` with a constant index table over the
batch reshaped to ``(n, H·W·C + 1)``; the extra last entry is the padding's value (0, or
``-inf`` for a maximum). The gradients are the transposed gathers (``inverse``): each input
entry sums the output entries that read it, a gather of a ``(entries, m)`` table and a
``ReduceSum``. No NCHW transposes are needed, and the result is the same arithmetic as the
NumPy reference (exact copies; sums of the same terms).

In float32 graphs (``Graph.native_images``) the forward image kernels are ONNX's own instead,
for speed where a model is served: a patch matrix times a kernel is one ``Conv``, and the
pools are ``MaxPool`` and ``AveragePool`` (padding counted, as symdl divides by the window).
ONNX's are NCHW: explicit ``Transpose`` nodes around each (ONNX Runtime cancels the pairs
between consecutive ones).

>>> from symdl.ir.kernels import Geometry
>>> window_index(Geometry((3, 3, 1, 2, 2, 1, 1, 0, 0, 2, 2)), ("oy", "ox", "dy", "dx", "c"))[:4].tolist()
[0, 1, 3, 4]
"""
from __future__ import annotations

import numpy as np

from .graph import Graph


def window_index(g, order) -> np.ndarray:
    """For every ``(oy, ox, dy, dx, c)`` (flattened in ``order``), the entry of one image
    ``(y·W + x)·C + c`` its window reads, or -1 where the window lies in the padding."""
    oy, ox, dy, dx, c = np.meshgrid(np.arange(g.OH), np.arange(g.OW), np.arange(g.kh), np.arange(g.kw),
                                    np.arange(g.C), indexing="ij")
    y, x = oy * g.sh + dy - g.pt, ox * g.sw + dx - g.pl
    index = np.where((y >= 0) & (y < g.H) & (x >= 0) & (x < g.W), (y * g.W + x) * g.C + c, -1)
    axes = {"oy": 0, "ox": 1, "dy": 2, "dx": 3, "c": 4}
    return np.transpose(index, [axes[a] for a in order]).reshape(-1).astype(np.int64)


def inverse(dest: np.ndarray, size: int) -> np.ndarray:
    """The transposed gather of ``dest`` (source position -> destination entry, -1: none): a
    ``(size, m)`` table of the source positions each destination sums, padded with
    ``len(dest)`` (the source's padding entry, 0)."""
    sources = np.nonzero(dest >= 0)[0]
    targets = dest[sources]
    order = np.argsort(targets, kind="stable")
    sources, targets = sources[order], targets[order]
    counts = np.bincount(targets, minlength=size)
    table = np.full((size, max(int(counts.max(initial=0)), 1)), len(dest), np.int64)
    starts = np.cumsum(counts) - counts
    table[targets, np.arange(len(targets)) - starts[targets]] = sources
    return table


def padded_rows(graph: Graph, value: str, entries: int, fill: float) -> str:
    """``value`` (a batch) as ``(n, entries + 1)``: each image's entries, then ``fill``."""
    flat = graph.node("Reshape", [value, graph.const([-1, entries], np.int64)])
    return graph.node("Pad", [flat, graph.const([0, 0, 0, 1], np.int64), graph.const(fill)])


def gather(graph: Graph, value: str, entries: int, table: np.ndarray, fill: float = 0.0) -> str:
    """``(n, *table.shape)``: each image's entries at ``table`` (``entries`` there: ``fill``)."""
    rows = padded_rows(graph, value, entries, fill)
    return graph.node("Gather", [rows, graph.const(table, np.int64)], axis=1)


def scatter_sum(graph: Graph, value: str, dest: np.ndarray, size: int) -> str:
    """``(n, size)``: the transposed gather; source entry ``k`` of each image adds to ``dest[k]``."""
    table = inverse(dest, size)
    return graph.reduce("ReduceSum", gather(graph, value, len(dest), table), [2], keepdims=0)


def pixel_rows(graph: Graph, value: str, channels: int) -> str:
    """``(n, entries)`` back as the matrix of pixel rows ``(n·pixels, channels)``."""
    return graph.node("Reshape", [value, graph.const([-1, channels], np.int64)])


def _pads(g):
    """ONNX ``pads`` (top, left, bottom, right) giving exactly ``OH x OW`` outputs, or None."""
    bottom = max(0, (g.OH - 1) * g.sh + g.kh - g.H - g.pt)
    right = max(0, (g.OW - 1) * g.sw + g.kw - g.W - g.pl)
    if (g.H + g.pt + bottom - g.kh) // g.sh + 1 != g.OH or (g.W + g.pl + right - g.kw) // g.sw + 1 != g.OW:
        return None
    return [g.pt, g.pl, bottom, right]


def _nchw(graph: Graph, value: str, g) -> str:
    images = graph.node("Reshape", [value, graph.const([-1, g.H, g.W, g.C], np.int64)])
    return graph.node("Transpose", [images], perm=[0, 3, 1, 2])


def _rows(graph: Graph, value: str, channels: int) -> str:
    return pixel_rows(graph, graph.node("Transpose", [value], perm=[0, 2, 3, 1]), channels)


def native_conv(graph: Graph, g, x: str, kernel: str, filters: int):
    """``im2col(x) @ kernel`` as one NCHW ``Conv`` (None when ONNX's padding cannot say ``g``)."""
    pads = _pads(g) if graph.native_images else None
    if pads is None:
        return None
    hwio = graph.node("Reshape", [kernel, graph.const([g.kh, g.kw, g.C, filters], np.int64)])
    oihw = graph.node("Transpose", [hwio], perm=[3, 2, 0, 1])
    y = graph.node("Conv", [_nchw(graph, x, g), oihw], kernel_shape=[g.kh, g.kw], strides=[g.sh, g.sw], pads=pads)
    return _rows(graph, y, filters)


def native_pool(graph: Graph, op: str, g, x: str):
    """A pool as ONNX's ``MaxPool`` / ``AveragePool`` (None when not native or the padding does not fit)."""
    pads = _pads(g) if graph.native_images else None
    if pads is None:
        return None
    extra = {"count_include_pad": 1} if op == "AveragePool" else {}
    y = graph.node(op, [_nchw(graph, x, g)], kernel_shape=[g.kh, g.kw], strides=[g.sh, g.sw], pads=pads, **extra)
    return _rows(graph, y, g.C)
