"""The recurrence kernels (``ir.Scan``, ``ir.ScanGrad``) as Python source, for every backend.

A scan runs the steps of one sequence in order; ``sequence_lines`` prints what one sequence ``i``
does as scalar loops (the CPU kernel's body inside its loop over sequences, a CUDA thread's body),
``array_lines`` the NumPy reference: every sequence at once, one step after another, the
recurrent product a NumPy ``dot``.

Forward, step ``t`` of sequence ``i`` and unit ``j``: the ``k`` input gates ``XP[ri, g·u + j]``, the
``k`` recurrent gates ``bu[g·u + j] + Σ_m h[rp, m]·U[m, g·u + j]`` and the ``s`` previous states
``S[rp, c·u + j]`` (zeros at the first step) are the cell's variables; the cell's formulas give the
new states. Backward, steps from the last: ``δS[ro] = G[ro] + carry`` (the carry stored in the
output's ``δS`` block by the step after), then ``δXP``, ``δUP`` and the carry into the previous
step, ``Σ_c δS_c ∂c/∂p`` plus, for ``h``, ``δUP[ro] Uᵀ``; the local derivatives are ``sp.diff``
of the cell (``cell_derivatives``).
"""
from __future__ import annotations

import functools

import sympy as sp

from ..graph.nodes import VARS
from ..ir.kernels import ScanGrad
from .base import buf
from .scalar_code import PRINTERS, prepared


@functools.lru_cache(maxsize=64)
def cell_derivatives(cell: tuple, gates: int, states: int, extras: int = 0) -> tuple:
    """``d[c][v] = ∂ cell[c] / ∂ VARS[v]`` (``sp.diff``: SymPy derives them)."""
    variables = VARS[: 2 * gates + states + extras]
    return tuple(tuple(sp.diff(sp.sympify(b), v) for v in variables) for b in cell)


def cell_code(exprs, names: dict, flavor: str, prefix: str = "_q") -> tuple:
    """``(lines, results)``: the expressions CSE'd together, printed in ``flavor`` with the symbols
    in ``names`` (``{symbol: text}``) read as that text."""
    exprs = [prepared(e) for e in exprs]
    named = {s: sp.Symbol(t, real=True) for s, t in names.items()}
    exprs = [e.xreplace(named) for e in exprs]
    temps, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(prefix, real=True), optimizations=None)
    printer = PRINTERS[flavor]({"fully_qualified_modules": True, "inline": True, "allow_unknown_functions": False})
    return [f"{s} = {printer.doprint(e)}" for s, e in temps], [printer.doprint(r) for r in reduced]


def _delta_symbols(states: int) -> list:
    return [sp.Symbol(f"_d{c}", real=True) for c in range(states)]


def backward_exprs(k) -> tuple:
    """``(δx per gate, δu per gate, carry per state)``: ``Σ_c δ_c ∂c/∂v`` for every cell variable."""
    dx, du, carry, _ = _through_all(k)
    return dx, du, carry


def extras_exprs(k) -> list:
    """``δ`` of each extra input (``EI``'s then ``EO``'s): ``Σ_c δ_c ∂c/∂e``."""
    return _through_all(k)[3]


def _through_all(k) -> tuple:
    d = cell_derivatives(tuple(k.cell), k.gates, k.states, k.extras_in + k.extras_out)
    deltas = _delta_symbols(k.states)

    def through(v):
        return sp.Add(*(deltas[c] * d[c][v] for c in range(k.states)))

    kk, base = k.gates, 2 * k.gates + k.states
    return ([through(g) for g in range(kk)], [through(kk + g) for g in range(kk)],
            [through(2 * kk + c) for c in range(k.states)],
            [through(base + m) for m in range(k.extras_in + k.extras_out)])


def _rows(k, T) -> list:
    """Lines binding ``ri``, ``ro``, ``rp``: step ``t``'s input, output and previous output rows."""
    return [f"_ri = i * {T} + " + (f"({T} - 1 - _t)" if k.reverse_in else "_t"),
            f"_ro = i * {T} + " + (f"({T} - 1 - _t)" if k.reverse_out else "_t"),
            "_rp = _ro + 1" if k.reverse_out else "_rp = _ro - 1"]


def _bias(k, program, at: int = 0):
    """``(B, two rows)``: the bias operand's code name (None: no bias) and whether it has a recurrent row."""
    B = k.optional()["B"]
    if B is None:
        return None, False
    return buf(B.buffer), sp.sympify(program.shape_of(B.buffer)[0]) != 1


def extras_of(k) -> list:
    """``[(operand, first variable, count, at the output row)]``: the extra-input operands present, ``EI``
    then ``EO``; extra ``m`` of unit ``j`` is the cell variable ``VARS[first + m]``, read from column
    ``m·u + j`` of its operand's row (what every backend's scan kernels read)."""
    o, first, out = k.optional(), 2 * k.gates + k.states, []
    for name, count in (("EI", k.extras_in), ("EO", k.extras_out)):
        if o[name] is not None:
            out.append((o[name], first, count, name == "EO"))
            first += count
    return out


def sequence_lines(k, program, flavor: str, T: str, u: str) -> list:
    """The scalar loops of sequence ``i`` (``T``, ``u``: the step count and the units, as code)."""
    if isinstance(k, ScanGrad):
        return _backward_lines(k, flavor, T, u, *_bias(k, program))
    return _forward_lines(k, flavor, T, u, *_bias(k, program))


def _extra_lines(k, u) -> list:
    """Unit ``j``'s extra inputs: ``EI`` at the step's input row, ``EO`` at its output row."""
    return [f"v{first + m} = {buf(E.buffer)}[{'_ro' if at_out else '_ri'}, {m} * {u} + j]"
            for E, first, count, at_out in extras_of(k) for m in range(count)]


def _forward_lines(k, flavor, T, u, B, two) -> list:
    out = buf(k.out)
    XP, U = buf(k.operands[0].buffer), buf(k.operands[1].buffer)
    g_count, s_count = k.gates, k.states
    names = {VARS[v]: f"v{v}" for v in range(k.variables)}
    body, results = cell_code(list(k.cell), names, flavor)
    lines = [f"for _t in range({T}):", *("    " + r for r in _rows(k, T)), f"    for j in range({u}):"]
    plus = (lambda row, g: f" + {B}[{row}, {g} * {u} + j]") if B else (lambda row, g: "")  # noqa: E731
    inner = [f"v{g} = {XP}[_ri, {g} * {u} + j]{plus(0, g)}" for g in range(g_count)]
    inner += [f"_a{g} = " + (f"{B}[1, {g} * {u} + j]" if two else "0.0") for g in range(g_count)]
    inner += ["if _t > 0:", f"    for _m in range({u}):", f"        _h = {out}[_rp, _m]"]
    inner += [f"        _a{g} += _h * {U}[{g} * {u} + j, _m]" for g in range(g_count)]  # U is Uᵀ here
    inner += [f"    v{2 * g_count + c} = {out}[_rp, {c} * {u} + j]" for c in range(s_count)]
    inner += ["else:"] + [f"    v{2 * g_count + c} = 0.0" for c in range(s_count)]
    inner += [f"v{g_count + g} = _a{g}" for g in range(g_count)]
    inner += _extra_lines(k, u)
    inner += body + [f"{out}[_ro, {c} * {u} + j] = {r}" for c, r in enumerate(results)]
    return lines + ["        " + line for line in inner]


def _backward_lines(k, flavor, T, u, B, two) -> list:
    out = buf(k.out)
    XP, UP, S, G, U = (buf(o.buffer) for o in k.operands[:5])
    g_count, s_count = k.gates, k.states
    ku, w2 = f"({g_count} * {u})", f"({2 * g_count} * {u})"
    names = {VARS[v]: f"v{v}" for v in range(k.variables)}
    dx, du, carry = backward_exprs(k)
    body, results = cell_code(dx + du + carry + extras_exprs(k), names, flavor)
    done = 2 * g_count + s_count
    rx, ru, rc = results[:g_count], results[g_count: 2 * g_count], results[2 * g_count: done]
    lines = [f"for _tt in range({T}):", f"    _t = {T} - 1 - _tt", *("    " + r for r in _rows(k, T)),
             f"    for j in range({u}):"]
    plus = (lambda row, g: f" + {B}[{row}, {g} * {u} + j]") if B else (lambda row, g: "")  # noqa: E731
    inner = [f"v{g} = {XP}[_ri, {g} * {u} + j]{plus(0, g)}" for g in range(g_count)]
    inner += [f"v{g_count + g} = {UP}[_ro, {g} * {u} + j]{plus(1, g) if two else ''}" for g in range(g_count)]
    inner += ["if _t > 0:"] + [f"    v{2 * g_count + c} = {S}[_rp, {c} * {u} + j]" for c in range(s_count)]
    inner += ["else:"] + [f"    v{2 * g_count + c} = 0.0" for c in range(s_count)]
    inner += [f"_d{c} = {G}[_ro, {c} * {u} + j]" for c in range(s_count)]
    inner += [f"if _t < {T} - 1:"] + [f"    _d{c} += {out}[_ro, {w2} + {c} * {u} + j]" for c in range(s_count)]
    inner += [f"{out}[_ro, {w2} + {c} * {u} + j] = _d{c}" for c in range(s_count)]
    inner += _extra_lines(k, u)
    inner += body
    for m, r in enumerate(results[done:]):  # δ of the extras after [δXP | δUP | δS], at the rows read
        row = "_ro" if m >= k.extras_in else "_ri"
        inner.append(f"{out}[{row}, ({done} + {m}) * {u} + j] = {r}")
    inner += [f"{out}[_ri, {g} * {u} + j] = {r}" for g, r in enumerate(rx)]
    inner += [f"{out}[_ro, {ku} + {g} * {u} + j] = {r}" for g, r in enumerate(ru)]
    inner += ["if _t > 0:"] + [f"    {out}[_rp, {w2} + {c} * {u} + j] = {r}" for c, r in enumerate(rc)]
    tail = ["    if _t > 0:", f"        for j in range({u}):", "            _acc = 0.0",
            f"            for _m in range({ku}):", f"                _acc += {out}[_ro, {ku} + _m] * {U}[j, _m]",
            f"            {out}[_rp, {w2} + j] += _acc"]
    return lines + ["        " + line for line in inner] + tail


def array_lines(k, program) -> list:
    """The NumPy reference: every sequence at once, a Python loop over the steps."""
    T = int(k.steps[0])
    out = buf(k.out)
    g_count, s_count = k.gates, k.states
    if isinstance(k, ScanGrad):
        XP, UP, S, G, U = (buf(o.buffer) for o in k.operands[:5])
        u = int(program.shape_of(k.operands[4].buffer)[0])
    else:
        XP, U = buf(k.operands[0].buffer), buf(k.operands[1].buffer)
        u = int(program.shape_of(k.operands[1].buffer)[1])  # Uᵀ (k·u, u)
    B, two = _bias(k, program)
    ku = g_count * u
    bx = f" + {B}[0]" if B else ""
    bu = f" + {B}[1]" if two else ""
    names = {VARS[v]: f"v{v}" for v in range(k.variables)}
    at = lambda rev: f"{T - 1} - _t" if rev else "_t"  # noqa: E731
    lines = [f"_o = {out}.reshape(n, {T}, -1)", f"_x = ({XP}{bx}).reshape(n, {T}, {ku})"]
    extras = []
    for e, (E, first, count, at_out) in enumerate(extras_of(k)):  # extra m of unit j: column m·u + j
        lines.append(f"_e{e} = {buf(E.buffer)}.reshape(n, {T}, {count * u})")
        row = "_to" if at_out else "_ti"
        extras += [f"v{first + m} = _e{e}[:, {row}, {m * u}:{(m + 1) * u}]" for m in range(count)]
    if not isinstance(k, ScanGrad):
        body, results = cell_code(list(k.cell), names, "array")
        lines += [f"_p = numpy.zeros((n, {s_count * u}), {out}.dtype)", f"for _t in range({T}):",
                  f"    _ti, _to = {at(k.reverse_in)}, {at(k.reverse_out)}",
                  f"    _up = numpy.dot(_p[:, :{u}], {U}.T){bu}"]
        inner = [f"v{g} = _x[:, _ti, {g * u}:{(g + 1) * u}]" for g in range(g_count)]
        inner += [f"v{g_count + g} = _up[:, {g * u}:{(g + 1) * u}]" for g in range(g_count)]
        inner += [f"v{2 * g_count + c} = _p[:, {c * u}:{(c + 1) * u}]" for c in range(s_count)]
        inner += extras
        inner += body + [f"_o[:, _to, {c * u}:{(c + 1) * u}] = {r}" for c, r in enumerate(results)]
        inner += ["_p = _o[:, _to, :].copy()"]
        return lines + ["    " + line for line in inner]
    dx, du, carry = backward_exprs(k)
    dextra = extras_exprs(k)
    names.update({d: f"_d{c}" for c, d in enumerate(_delta_symbols(s_count))})
    body, results = cell_code(dx + du + carry + dextra, names, "array")
    lines += [f"_up = ({UP}{bu}).reshape(n, {T}, {ku})", f"_s = {S}.reshape(n, {T}, {s_count * u})",
              f"_g = {G}.reshape(n, {T}, {s_count * u})", f"_carry = numpy.zeros((n, {s_count * u}), {out}.dtype)",
              f"for _tt in range({T}):", f"    _t = {T - 1} - _tt", f"    _ti, _to = {at(k.reverse_in)}, {at(k.reverse_out)}",
              f"    _tp = _to + 1 if {bool(k.reverse_out)} else _to - 1"]
    ws = (2 * g_count + s_count) * u
    inner = [f"_D = _g[:, _to, :] + _carry", f"_o[:, _to, {2 * ku}:{ws}] = _D"]
    inner += [f"_d{c} = _D[:, {c * u}:{(c + 1) * u}]" for c in range(s_count)]
    inner += [f"v{g} = _x[:, _ti, {g * u}:{(g + 1) * u}]" for g in range(g_count)]
    inner += [f"v{g_count + g} = _up[:, _to, {g * u}:{(g + 1) * u}]" for g in range(g_count)]
    inner += [f"v{2 * g_count + c} = _s[:, _tp, {c * u}:{(c + 1) * u}] if _t > 0 else numpy.zeros_like(_d0)"
              for c in range(s_count)]
    inner += extras
    inner += body
    inner += [f"_o[:, _ti, {g * u}:{(g + 1) * u}] = {r}" for g, r in enumerate(results[:g_count])]
    inner += [f"_o[:, _to, {ku + g * u}:{ku + (g + 1) * u}] = {r}" for g, r in enumerate(results[g_count: 2 * g_count])]
    done = 2 * g_count + s_count
    for m, r in enumerate(results[done:]):  # δ of the extras, at the rows they were read
        row = "_to" if m >= k.extras_in else "_ti"
        inner.append(f"_o[:, {row}, {ws + m * u}:{ws + (m + 1) * u}] = {r}")
    inner += [f"_carry = numpy.empty((n, {s_count * u}), {out}.dtype)"]
    inner += [f"_carry[:, {c * u}:{(c + 1) * u}] = {r}" for c, r in enumerate(results[2 * g_count: done])]
    inner += [f"_carry[:, :{u}] += numpy.dot(_o[:, _to, {ku}:{2 * ku}], {U}.T)"]
    return lines + ["    " + line for line in inner]
