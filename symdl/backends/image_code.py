"""Scalar code for the image kernels (``ir.ImageOp``) that the CPU and CUDA backends share.

Every image op is written as a *gather*: ``row_body(k)`` prints what one output row ``i``
(one pixel, all its channels) does, reading whatever it needs. No two iterations write one
entry, so the CPU runs the rows under ``prange`` and CUDA gives each row a thread, with no
write races: the scatter-adds of backprop (``col2im``, the pooling gradients) visit, for each
input pixel, the windows that contain it.

Images are NHWC batches held as ``(n·H·W, C)`` matrices (``ir.Geometry``).
"""
from __future__ import annotations

from ..ir import ImageOp
from .base import buf, indent


def _split(i, H, W, names=("_b", "_y", "_x")) -> list:
    """``_b, _y, _x`` of row ``i`` of an ``(n·H·W, C)`` image batch."""
    b, y, x = names
    return [f"{b} = {i} // {H * W}", f"_r = {i} - {b} * {H * W}", f"{y} = _r // {W}", f"{x} = _r - {y} * {W}"]


def _covering(g) -> list:
    """The ranges ``_oy0.._oy1``, ``_ox0.._ox1`` of output pixels whose windows contain pixel (_y, _x)."""
    lines = []
    for v, p, k, s, o in (("y", g.pt, g.kh, g.sh, g.OH), ("x", g.pl, g.kw, g.sw, g.OW)):
        lines += [f"_a = _{v} + {p - k + 1}",
                  f"_o{v}0 = (_a + {s - 1}) // {s} if _a > 0 else 0",
                  f"_o{v}1 = min({o - 1}, (_{v} + {p}) // {s})"]
    return lines


def row_body(k: ImageOp, out_cols: str) -> list:
    """Lines computing row ``i`` of ``k.out`` (``out_cols`` columns) from ``k``'s operands."""
    g = k.geometry
    out = buf(k.out)
    src = [buf(o.buffer) for o in k.operands]
    C = g.C
    if k.op == "reshape":
        return [f"for j in range({out_cols}):", f"    _q = i * ({out_cols}) + j",
                f"    _s = _q // {src[0]}.shape[1]",
                f"    {out}[i, j] = {src[0]}[_s, _q - _s * {src[0]}.shape[1]]"]
    if k.op == "im2col":
        return _split("i", g.OH, g.OW, ("_b", "_oy", "_ox")) + [
            f"for _dy in range({g.kh}):",
            f"    _iy = _oy * {g.sh} + _dy - {g.pt}",
            f"    for _dx in range({g.kw}):",
            f"        _ix = _ox * {g.sw} + _dx - {g.pl}",
            f"        _col = (_dy * {g.kw} + _dx) * {C}",
            f"        if _iy >= 0 and _iy < {g.H} and _ix >= 0 and _ix < {g.W}:",
            f"            _src = (_b * {g.H} + _iy) * {g.W} + _ix",
            f"            for _c in range({C}):",
            f"                {out}[i, _col + _c] = {src[0]}[_src, _c]",
            "        else:",
            f"            for _c in range({C}):",
            f"                {out}[i, _col + _c] = 0.0"]
    if k.op in ("maxpool", "avgpool"):
        head = _split("i", g.OH, g.OW, ("_b", "_oy", "_ox")) + [
            f"_row0 = (_b * {g.H} + _oy * {g.sh}) * {g.W} + _ox * {g.sw}", f"for _c in range({C}):"]
        if k.op == "avgpool":
            return head + ["    _acc = 0.0", f"    for _dy in range({g.kh}):", f"        for _dx in range({g.kw}):",
                           f"            _acc += {src[0]}[_row0 + _dy * {g.W} + _dx, _c]",
                           f"    {out}[i, _c] = _acc / {g.kh * g.kw}"]
        return head + _argmax(g, src[0], "    ") + [f"    {out}[i, _c] = _best"]
    # gradients: gather over the windows that contain input pixel i
    head = _split("i", g.H, g.W) + _covering(g) + [f"for _c in range({C}):", "    _acc = 0.0",
                                                     "    for _oy in range(_oy0, _oy1 + 1):",
                                                     "        for _ox in range(_ox0, _ox1 + 1):",
                                                     f"            _src = (_b * {g.OH} + _oy) * {g.OW} + _ox"]
    tail = [f"    {out}[i, _c] = _acc"]
    if k.op == "col2im":
        return head + [f"            _dy = _y + {g.pt} - _oy * {g.sh}", f"            _dx = _x + {g.pl} - _ox * {g.sw}",
                       f"            _acc += {src[0]}[_src, (_dy * {g.kw} + _dx) * {C} + _c]"] + tail
    if k.op == "avgpool_grad":
        return head + [f"            _acc += {src[0]}[_src, _c]"] + [f"    {out}[i, _c] = _acc / {g.kh * g.kw}"]
    if k.op == "maxpool_grad":  # the window's gradient goes to its first arg-max (PyTorch's rule)
        return head + [f"            _row0 = (_b * {g.H} + _oy * {g.sh}) * {g.W} + _ox * {g.sw}"] + \
            _argmax(g, src[0], "            ") + ["            if _arg == i:",
                                                   f"                _acc += {src[1]}[_src, _c]"] + tail
    raise NotImplementedError(f"no scalar code for the image op {k.op!r}")


def _argmax(g, x, pad) -> list:
    """``_best``/``_arg``: the window's maximum and its first position (a NaN wins, as in PyTorch)."""
    return [pad + line for line in [
        f"_best = {x}[_row0, _c]", "_arg = _row0", f"for _dy in range({g.kh}):", f"    for _dx in range({g.kw}):",
        f"        _q = _row0 + _dy * {g.W} + _dx", f"        _v = {x}[_q, _c]",
        "        if _v > _best or _v != _v:", "            _best = _v", "            _arg = _q"]]


__all__ = ["row_body", "indent"]
