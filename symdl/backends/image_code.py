"""Scalar code for the image kernels (``ir.ImageOp``) that the CPU and CUDA backends share.

Every image op is written so that no two iterations write one entry: ``row_body(k)`` prints
what iteration ``i`` does, and the CPU runs the iterations under ``prange`` and CUDA gives each a
thread, with no write races. Iteration ``i`` is row ``i`` of the output (``loop_rows(k)`` names
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

from ..ir.kernels import ImageOp
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


def _by_window(k: ImageOp) -> bool:
    """Whether ``k`` runs one iteration per window, each writing its cell (see the module notes)."""
    g = k.geometry
    return k.op in ("maxpool_grad", "avgpool_grad") and _disjoint(g) and g.pt == 0 and g.pl == 0


def loop_rows(k: ImageOp) -> str:
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


def _im2col(g, out, x) -> list:
    """Row ``(b, oy, ox)`` of the patch matrix: window row ``dy`` is ``kw·C`` entries, contiguous
    in the image too (pixels ``ix..ix+kw-1`` of one image row, ``C`` channels each)."""
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


def _pool(k, g, out, x) -> list:
    """Row ``(b, oy, ox)`` of a pooled image (pooling windows lie inside the image)."""
    head = _split("i", g.OH, g.OW, ("_b", "_oy", "_ox")) + [
        f"_row0 = (_b * {g.H} + _oy * {g.sh}) * {g.W} + _ox * {g.sw}", f"for _c in range({g.C}):"]
    if k.op == "avgpool":
        return head + ["    _acc = 0.0", f"    for _dy in range({g.kh}):", f"        for _dx in range({g.kw}):",
                       f"            _acc += {x}[_row0 + _dy * {g.W} + _dx, _c]",
                       f"    {out}[i, _c] = _acc / {g.kh * g.kw}"]
    return head + _argmax(g, x, "    ", arg=False) + [f"    {out}[i, _c] = _best"]


def _gradient(k, g, out, src) -> list:
    """Row ``i`` (input pixel ``(b, y, x)``) of a gradient: the sum over the windows containing it."""
    C = g.C
    if k.op == "col2im":
        body = [f"_col = ((_y + {g.pt} - _oy * {g.sh}) * {g.kw} + _x + {g.pl} - _ox * {g.sw}) * {C}",
                f"for _c in range({C}):", f"    {out}[i, _c] += {src[0]}[_src, _col + _c]"]
    elif k.op == "avgpool_grad":
        body = [f"for _c in range({C}):", f"    {out}[i, _c] += {src[0]}[_src, _c] / {g.kh * g.kw}"]
    else:  # the window's gradient goes to its first arg-max (PyTorch's rule)
        body = [f"_row0 = (_b * {g.H} + _oy * {g.sh}) * {g.W} + _ox * {g.sw}", f"for _c in range({C}):",
                *_argmax(g, src[0], "    "), "    if _arg == i:", f"        {out}[i, _c] += {src[1]}[_src, _c]"]
    return _split("i", g.H, g.W) + _covering(g) + _zero(out, 0, C) + [
        "for _oy in range(_oy0, _oy1 + 1):", "    for _ox in range(_ox0, _ox1 + 1):",
        f"        _src = (_b * {g.OH} + _oy) * {g.OW} + _ox"] + indent(body, 2)


def _window_cell(k, g, out, src) -> list:
    """Window ``i`` ``(b, oy, ox)`` of a pooling gradient whose windows do not overlap: zero its
    cell (rows ``oy·sh`` up to the next window's, or to the image's end after the last window;
    columns alike), then write its gradient: to each channel's first arg-max, or shared evenly.
    The cells tile the image, so every entry of the output is written by exactly one window."""
    C, G = g.C, src[-1]
    lines = _split("i", g.OH, g.OW, ("_b", "_oy", "_ox")) + [
        f"_y0 = _oy * {g.sh}", f"_y1 = {g.H} if _oy == {g.OH - 1} else _y0 + {g.sh}",
        f"_x0 = _ox * {g.sw}", f"_x1 = {g.W} if _ox == {g.OW - 1} else _x0 + {g.sw}",
        "for _y in range(_y0, _y1):", f"    _p = (_b * {g.H} + _y) * {g.W}",
        "    for _x in range(_x0, _x1):", *_zero(out, 0, C, "        ", "_p + _x")]
    lines.append(f"_row0 = (_b * {g.H} + _y0) * {g.W} + _x0")
    if k.op == "avgpool_grad":
        return lines + [f"for _dy in range({g.kh}):", f"    for _dx in range({g.kw}):",
                        f"        _q = _row0 + _dy * {g.W} + _dx", f"        for _c in range({C}):",
                        f"            {out}[_q, _c] = {G}[i, _c] / {g.kh * g.kw}"]
    return lines + [f"for _c in range({C}):", *_argmax(g, src[0], "    "), f"    {out}[_arg, _c] = {G}[i, _c]"]


def row_body(k: ImageOp, out_cols: str) -> list:
    """Lines computing row ``i`` of ``k.out`` (``out_cols`` columns) from ``k``'s operands."""
    g = k.geometry
    out = buf(k.out)
    src = [buf(o.buffer) for o in k.operands]
    if k.op == "reshape":  # the same row-major memory: walk the source entry by entry, no division per entry
        s = src[0]
        return [f"_q = i * ({out_cols})", f"_s = _q // {s}.shape[1]", f"_t = _q - _s * {s}.shape[1]",
                f"for j in range({out_cols}):", f"    {out}[i, j] = {s}[_s, _t]", "    _t += 1",
                f"    if _t == {s}.shape[1]:", "        _t = 0", "        _s += 1"]
    if k.op == "im2col":
        return _im2col(g, out, src[0])
    if k.op in ("maxpool", "avgpool"):
        return _pool(k, g, out, src[0])
    if _by_window(k):
        return _window_cell(k, g, out, src)
    if k.op in ("col2im", "avgpool_grad", "maxpool_grad"):
        return _gradient(k, g, out, src)
    raise NotImplementedError(f"no scalar code for the image op {k.op!r}")


def _argmax(g, x, pad, arg=True) -> list:
    """``_best``/``_arg``: the window's maximum and its first position (a NaN wins, as in PyTorch).

    Conditional expressions, not an ``if`` block: under ``prange`` the ``if`` form of a 2x2
    max-pool over ReLU outputs ran 5-9x slower than serially; this form runs alike in both."""
    lines = [f"_best = {x}[_row0, _c]"] + (["_arg = _row0"] if arg else []) + [
        f"for _dy in range({g.kh}):", f"    for _dx in range({g.kw}):",
        f"        _q = _row0 + _dy * {g.W} + _dx", f"        _v = {x}[_q, _c]",
        "        _t = _v > _best or _v != _v"] + (["        _arg = _q if _t else _arg"] if arg else []) + [
        "        _best = _v if _t else _best"]
    return [pad + line for line in lines]


__all__ = ["row_body", "loop_rows", "indent"]
