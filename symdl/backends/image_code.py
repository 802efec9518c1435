"""Scalar code for the image kernels (``ir.ImageKernel``, ``ir.Reshape``) that the CPU and CUDA
backends share: ``row_body`` has one handler per kernel class.

Every image kernel is written so that no two iterations write one entry: ``row_body(k)`` prints
what iteration ``i`` does, and the CPU's step threads share the iterations (``cpu.runtime``) and
CUDA gives each a thread, with no write races. Iteration ``i`` is row ``i`` of the output (``loop_rows(k)`` names
the buffer whose rows are counted), a *gather*: one pixel, all its channels, reading whatever it
needs; the scatter-adds of backprop (``col2im``, the pooling gradients) visit, for each input
pixel, the windows that contain it. The exception is a pooling gradient whose windows do not
overlap (pooling's usual case): iteration ``i`` is window ``i``, which finds its arg-max once and
writes its own *cell* of the image (its window, and the pixels up to the next window that no
window reads), instead of every pixel searching its window again.

Memory order: the channels of a pixel are contiguous (NHWC), so every inner loop runs over
channels (or over a window row's ``kw·C`` contiguous entries); a gradient row accumulates
window by window into its own output row. Tests that the geometry decides (a window inside
the image, windows that do not overlap) are decided here, when the code is printed.

Images are NHWC batches held as ``(n·H·W, C)`` matrices (``ir.Geometry``).
"""
from __future__ import annotations

from functools import singledispatch

from ..ir.kernels import AvgPool, AvgPoolGrad, Col2Im, Im2Col, MaxPool, MaxPoolGrad, Reshape
from .base import buf, indent


def _split(i, H, W, names=("_b", "_y", "_x")) -> list:
    """``_b, _y, _x`` of row ``i`` of an ``(n·H·W, C)`` image batch."""
    b, y, x = names
    return [f"{b} = {i} // {H * W}", f"_r = {i} - {b} * {H * W}", f"{y} = _r // {W}", f"{x} = _r - {y} * {W}"]


def _inside(g) -> tuple:
    """Whether every window lies inside the image, vertically and horizontally (no padding read)."""
    return (g.pt == 0 and (g.OH - 1) * g.sh + g.kh <= g.H, g.pl == 0 and (g.OW - 1) * g.sw + g.kw <= g.W)


def _disjoint(g) -> bool:
    """Whether windows never overlap: each input pixel is in at most one window (pooling's usual case)."""
    return g.sh >= g.kh and g.sw >= g.kw


def _by_window(k) -> bool:
    """Whether ``k`` runs one iteration per window, each writing its cell (see the module notes)."""
    if not isinstance(k, (MaxPoolGrad, AvgPoolGrad)):
        return False
    g = k.geometry
    return _disjoint(g) and g.pt == 0 and g.pl == 0


def loop_rows(k) -> str:
    """The buffer whose rows ``row_body``'s iterations count: the output's, or the windows' (``G``)."""
    return k.operands[-1].buffer if _by_window(k) else k.out


def _covering(g) -> list:
    """The ranges ``_oy0.._oy1``, ``_ox0.._ox1`` of output pixels whose windows contain pixel (_y, _x)."""
    lines = []
    for v, p, k, s, o in (("y", g.pt, g.kh, g.sh, g.OH), ("x", g.pl, g.kw, g.sw, g.OW)):
        lines += [f"_a = _{v} + {p - k + 1}",
                  f"_o{v}0 = (_a + {s - 1}) // {s} if _a > 0 else 0",
                  f"_o{v}1 = min({o - 1}, (_{v} + {p}) // {s})"]
    return lines


def _zero(out, first, count, pad="", row="i") -> list:
    """Zero ``count`` entries of ``out`` from column ``first`` of row ``row``."""
    column = "_q" if first == 0 else f"{first} + _q"
    return [f"{pad}for _q in range({count}):", f"{pad}    {out}[{row}, {column}] = 0.0"]


@singledispatch
def row_body(k, out_cols: str) -> list:
    """Lines computing row ``i`` of ``k.out`` (``out_cols`` columns) from ``k``'s operands, or, for
    a pooling gradient run by window (``loop_rows``), window ``i``'s cell of it."""
    raise NotImplementedError(f"no scalar code for the kernel {type(k).__name__}")


@row_body.register
def _reshape(k: Reshape, out_cols):
    """The same row-major memory: walk the source entry by entry, no division per entry."""
    out, s = buf(k.out), buf(k.operands[0].buffer)
    return [f"_q = i * ({out_cols})", f"_s = _q // {s}.shape[1]", f"_t = _q - _s * {s}.shape[1]",
            f"for j in range({out_cols}):", f"    {out}[i, j] = {s}[_s, _t]", "    _t += 1",
            f"    if _t == {s}.shape[1]:", "        _t = 0", "        _s += 1"]


@row_body.register
def _im2col(k: Im2Col, out_cols):
    """Row ``(b, oy, ox)`` of the patch matrix: window row ``dy`` is ``kw·C`` entries, contiguous
    in the image too (pixels ``ix..ix+kw-1`` of one image row, ``C`` channels each)."""
    g, out, x = k.geometry, buf(k.out), buf(k.operands[0].buffer)
    rows_in, cols_in = _inside(g)
    C, span = g.C, g.kw * g.C
    pixel = [f"for _c in range({C}):", f"    {out}[i, _col + _dx * {C} + _c] = {x}[_src + _dx, _c]"]
    copy = [f"_src = (_b * {g.H} + _iy) * {g.W} + _ix0", f"for _dx in range({g.kw}):"]
    if cols_in:  # (one flat loop over the kw·C entries, indexed by division, was slower in serial code)
        copy += indent(pixel)
    else:
        copy += ["    _ix = _ix0 + _dx", f"    if _ix >= 0 and _ix < {g.W}:", *indent(pixel, 2),
                 "    else:", *_zero(out, f"_col + _dx * {C}", C, "        ")]
    lines = _split("i", g.OH, g.OW, ("_b", "_oy", "_ox")) + [
        f"_ix0 = _ox * {g.sw} - {g.pl}", f"for _dy in range({g.kh}):", f"    _iy = _oy * {g.sh} + _dy - {g.pt}",
        f"    _col = _dy * {span}"]
    if rows_in:
        return lines + indent(copy)
    return lines + [f"    if _iy >= 0 and _iy < {g.H}:"] + indent(copy, 2) + ["    else:"] + \
        _zero(out, "_col", span, "        ")


def _pooled_pixel(g) -> list:
    """The head of row ``(b, oy, ox)`` of a pooled image (pooling windows lie inside the image):
    ``_row0``, the window's first pixel, and a loop over channels ``_c``."""
    return _split("i", g.OH, g.OW, ("_b", "_oy", "_ox")) + [
        f"_row0 = (_b * {g.H} + _oy * {g.sh}) * {g.W} + _ox * {g.sw}", f"for _c in range({g.C}):"]


@row_body.register
def _max_pool(k: MaxPool, out_cols):
    g, out, x = k.geometry, buf(k.out), buf(k.operands[0].buffer)
    return _pooled_pixel(g) + _argmax(g, x, "    ", arg=False) + [f"    {out}[i, _c] = _best"]


@row_body.register
def _avg_pool(k: AvgPool, out_cols):
    g, out, x = k.geometry, buf(k.out), buf(k.operands[0].buffer)
    return _pooled_pixel(g) + ["    _acc = 0.0", f"    for _dy in range({g.kh}):", f"        for _dx in range({g.kw}):",
                               f"            _acc += {x}[_row0 + _dy * {g.W} + _dx, _c]",
                               f"    {out}[i, _c] = _acc / {g.kh * g.kw}"]


def _gradient(g, out, term) -> list:
    """Row ``i`` (input pixel ``(b, y, x)``) of a gradient: the sum over the windows containing it,
    ``term`` adding window ``_src``'s share (its first column ``_col`` for a patch matrix)."""
    return _split("i", g.H, g.W) + _covering(g) + _zero(out, 0, g.C) + [
        "for _oy in range(_oy0, _oy1 + 1):", "    for _ox in range(_ox0, _ox1 + 1):",
        f"        _src = (_b * {g.OH} + _oy) * {g.OW} + _ox"] + indent(term, 2)


def _window_cell(g, out, write) -> list:
    """Window ``i`` ``(b, oy, ox)`` of a pooling gradient whose windows do not overlap: zero its
    cell (rows ``oy·sh`` up to the next window's, or to the image's end after the last window;
    columns alike), then ``write`` its gradient (from the window's first pixel ``_row0``).
    The cells tile the image, so every entry of the output is written by exactly one window."""
    return _split("i", g.OH, g.OW, ("_b", "_oy", "_ox")) + [
        f"_y0 = _oy * {g.sh}", f"_y1 = {g.H} if _oy == {g.OH - 1} else _y0 + {g.sh}",
        f"_x0 = _ox * {g.sw}", f"_x1 = {g.W} if _ox == {g.OW - 1} else _x0 + {g.sw}",
        "for _y in range(_y0, _y1):", f"    _p = (_b * {g.H} + _y) * {g.W}",
        "    for _x in range(_x0, _x1):", *_zero(out, 0, g.C, "        ", "_p + _x"),
        f"_row0 = (_b * {g.H} + _y0) * {g.W} + _x0"] + write


@row_body.register
def _col2im(k: Col2Im, out_cols):
    g, out, cols = k.geometry, buf(k.out), buf(k.operands[0].buffer)
    return _gradient(g, out, [
        f"_col = ((_y + {g.pt} - _oy * {g.sh}) * {g.kw} + _x + {g.pl} - _ox * {g.sw}) * {g.C}",
        f"for _c in range({g.C}):", f"    {out}[i, _c] += {cols}[_src, _col + _c]"])


@row_body.register
def _max_pool_grad(k: MaxPoolGrad, out_cols):
    """The window's gradient goes to its first arg-max (PyTorch's rule)."""
    g, out = k.geometry, buf(k.out)
    x, G = (buf(o.buffer) for o in k.operands)
    if _by_window(k):
        return _window_cell(g, out, [f"for _c in range({g.C}):", *_argmax(g, x, "    "),
                                     f"    {out}[_arg, _c] = {G}[i, _c]"])
    return _gradient(g, out, [f"_row0 = (_b * {g.H} + _oy * {g.sh}) * {g.W} + _ox * {g.sw}", f"for _c in range({g.C}):",
                              *_argmax(g, x, "    "), "    if _arg == i:", f"        {out}[i, _c] += {G}[_src, _c]"])


@row_body.register
def _avg_pool_grad(k: AvgPoolGrad, out_cols):
    """The window's gradient shared evenly by its pixels."""
    g, out, G = k.geometry, buf(k.out), buf(k.operands[0].buffer)
    if _by_window(k):
        return _window_cell(g, out, [f"for _dy in range({g.kh}):", f"    for _dx in range({g.kw}):",
                                     f"        _q = _row0 + _dy * {g.W} + _dx", f"        for _c in range({g.C}):",
                                     f"            {out}[_q, _c] = {G}[i, _c] / {g.kh * g.kw}"])
    return _gradient(g, out, [f"for _c in range({g.C}):", f"    {out}[i, _c] += {G}[_src, _c] / {g.kh * g.kw}"])


def _argmax(g, x, pad, arg=True) -> list:
    """``_best``/``_arg``: the window's maximum and its first position (a NaN wins, as in PyTorch).

    Conditional expressions, not an ``if`` block: under Numba's ``prange`` the ``if`` form of a 2x2
    max-pool over ReLU outputs ran 5-9x slower than serially; this form runs alike in both."""
    lines = [f"_best = {x}[_row0, _c]"] + (["_arg = _row0"] if arg else []) + [
        f"for _dy in range({g.kh}):", f"    for _dx in range({g.kw}):",
        f"        _q = _row0 + _dy * {g.W} + _dx", f"        _v = {x}[_q, _c]",
        "        _t = _v > _best or _v != _v"] + (["        _arg = _q if _t else _arg"] if arg else []) + [
        "        _best = _v if _t else _best"]
    return [pad + line for line in lines]


__all__ = ["row_body", "loop_rows", "indent"]
