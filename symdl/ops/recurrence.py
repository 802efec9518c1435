"""Recurrence as one scan node: SimpleRNN, LSTM and GRU cells, backpropagation through time.

Sequences are rows: a batch ``(n, T, f)`` is the matrix ``(n·T, f)``, row ``b·T + t``. A recurrent
layer is

* ``XP = X W + b``: the input projection of every step, one ordinary product;
* ``S = scan(cell, XP, U, bu)``: the states of every step ``(n·T, s·u)`` (LSTM ``[h | c]``, s = 2;
  GRU, SimpleRNN ``h``). At step ``t`` of sequence ``b``, ``UP_t = h_{t-1} U (+ bu)`` (``h_{-1} = 0``)
  and per unit ``j`` a *scalar* SymPy cell formula maps the ``k`` input gates, the ``k`` recurrent
  gates and the ``s`` previous states to the ``s`` new states (``Cell``).
* its gradient: ``bptt(cell, G; XP, UP, S, U)`` (``ScanGrad``), one backward scan over ``t`` giving
  ``[δXP | δUP | δS]`` (``δS`` the total gradient of every state, the carried one included). The
  per-unit local derivatives are ``sp.diff`` of the cell formula; the carry is
  ``δp_{t-1} = Σ_c δS_t,c ∂c/∂p + [h] δUP_t Uᵀ``. Then ``δW = Xᵀ δXP``, ``δU = Shift(h)ᵀ δUP``,
  ``δbu = 1ᵀ δUP``, ``δX = δXP Wᵀ``: ordinary nodes, ``UP = Shift(h) U + bu`` one ordinary product.

Second derivatives (``sd.hvp``) differentiate the loss's tangent: the tangent of a scan is a scan
(``_jvp_scan``) whose cell, ``sp.diff`` of the original at the point where it is taken, reads that
point and the known part of ``u̇`` as *extra per-step inputs*: ``EI`` at each step's input row, ``EO``
at its output row (``scan(..., extras_in=, extras_out=)``); its ``ScanGrad`` gives ``[δEI | δEO]`` too.

``reverse_in`` reads the inputs from the last step to the first (Keras's ``go_backwards``: the
states are stored in the order they are computed); ``reverse_out`` also stores them at their
input's row (the backward half of ``Bidirectional``, aligned with the forward half).
``Shift`` moves rows one step within each sequence (zeros at the first step) and is built from
``Reshape``, ``Cols`` and ``Place``: no kernel of its own.

>>> import symdl as sd
>>> from symdl.graph.nodes import sequence_input
>>> x = sequence_input("x", (3, 2)); W = sd.param("W", (2, 4)); U = sd.param("U", (1, 4))
>>> S = scan(lstm_cell(), x @ W, U, None, 3)
>>> S.shape
(3*n, 2)
>>> print(S)
lstm_scan(x*W, U)
>>> print(sd.grad(sd.total(S), [U])[U])
shift(cols(lstm_scan(x*W, U), 0, 1)).T*cols(lstm_bptt(1; x*W, shift(cols(lstm_scan(x*W, U), 0, 1))*U, lstm_scan(x*W, U), U), 4, 8)
"""
from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass

import sympy as sp
from sympy.core.symbol import Str
from sympy.matrices.expressions import MatrixExpr, Transpose
from sympy.printing.precedence import PRECEDENCE

from ..autodiff.jvp import JVP, linear_in_first_operand
from ..autodiff.vjp import VJP
from ..formulas import activations as functions
from ..graph.nodes import (
    PRINT_RULES, VARS, Broadcast, Ops, Printable, ShapeMismatch, SumRows, name_of, shape_text,
)
from ..ir import kernels as ir
from ..ir.kernels import Operand
from ..ir.lowering import LOWER, lower_expansion
from .concat import Cols, Place, concat
from .conv import Reshape


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """A recurrent cell: ``gates`` input gates ``x_g`` and recurrent gates ``u_g`` per unit, ``states``
    carried states ``p_c``; ``bodies[c]`` the new state ``c`` as a SymPy scalar formula over
    ``VARS``: ``x_g = VARS[g]``, ``u_g = VARS[gates + g]``, ``p_c = VARS[2·gates + c]``. State 0 is
    ``h``, the output (and the one the recurrent product reads)."""

    name: str
    gates: int
    states: int
    bodies: tuple
    gate_names: tuple = ()
    state_names: tuple = ("h",)
    extras_in: int = 0  # per-step inputs read at the input row (``EI``), variables after the states
    extras_out: int = 0  # per-step inputs read at the output row (``EO``), after ``EI``'s

    def __post_init__(self):
        if len(self.bodies) != self.states:
            raise ValueError(f"cell {self.name}: {self.states} state(s) but {len(self.bodies)} formula(s)")
        if len(self.state_names) != self.states:  # unnamed states: h, then s1, s2, ...
            names = tuple(self.state_names[:1] or ("h",)) + tuple(f"s{c}" for c in range(1, self.states))
            object.__setattr__(self, "state_names", names)

    def x(self, g):
        return VARS[g]

    def u(self, g):
        return VARS[self.gates + g]

    def p(self, c):
        return VARS[2 * self.gates + c]

    def ein(self, m):
        return VARS[2 * self.gates + self.states + m]

    def eout(self, m):
        return VARS[2 * self.gates + self.states + self.extras_in + m]

    @property
    def variables(self) -> tuple:
        return tuple(VARS[: 2 * self.gates + self.states + self.extras_in + self.extras_out])

    @functools.cached_property
    def derivatives(self) -> tuple:
        """``derivatives[c][v]``: ``∂ body_c / ∂ VARS[v]`` by ``sp.diff`` (SymPy derives them)."""
        return tuple(tuple(sp.diff(b, v) for v in self.variables) for b in self.bodies)


def _fn(activation, what):
    """A scalar function from an activation name (``None``/``"linear"``: the identity)."""
    applied = functions.get(activation)
    if applied is None:
        return lambda t: t
    fn = getattr(applied, "function", None)
    if fn is None:
        raise ValueError(f"{what}: unknown activation {activation!r}")
    return fn


def simple_rnn_cell(activation="tanh") -> Cell:
    """``h = act(x + u)`` (Keras's ``SimpleRNN``: one gate)."""
    act = _fn(activation, "SimpleRNN")
    return Cell("simple_rnn", 1, 1, (act(VARS[0] + VARS[1]),), ("h",))


def lstm_cell(activation="tanh", recurrent_activation="sigmoid") -> Cell:
    """Keras's LSTM, gates ``i, f, c, o``: ``c = f·c' + i·g``, ``h = o·act(c)`` with
    ``i = σ(x_i + u_i)``, ``f = σ(x_f + u_f)``, ``g = act(x_c + u_c)``, ``o = σ(x_o + u_o)``. States ``[h, c]``."""
    act, rec = _fn(activation, "LSTM"), _fn(recurrent_activation, "LSTM")
    x, u = VARS[0:4], VARS[4:8]
    c_prev = VARS[9]
    i, f, g, o = rec(x[0] + u[0]), rec(x[1] + u[1]), act(x[2] + u[2]), rec(x[3] + u[3])
    c = f * c_prev + i * g
    return Cell("lstm", 4, 2, (o * act(c), c), ("i", "f", "c", "o"), ("h", "c"))


def gru_cell(activation="tanh", recurrent_activation="sigmoid") -> Cell:
    """Keras's GRU with ``reset_after=True`` (PyTorch's form), gates ``z, r, h``:
    ``z = σ(x_z + u_z)``, ``r = σ(x_r + u_r)``, ``ĥ = act(x_h + r·u_h)``, ``h = z·h' + (1 − z)·ĥ``."""
    act, rec = _fn(activation, "GRU"), _fn(recurrent_activation, "GRU")
    x, u, h_prev = VARS[0:3], VARS[3:6], VARS[6]
    z, r = rec(x[0] + u[0]), rec(x[1] + u[1])
    hh = act(x[2] + r * u[2])
    return Cell("gru", 3, 1, (z * h_prev + (1 - z) * hh,), ("z", "r", "h"))


# --------------------------------------------------------------------------- nodes


def _spec(cell: Cell, T: int, reverse_in: bool, reverse_out: bool) -> sp.Tuple:
    return sp.Tuple(Str(cell.name), sp.Tuple(*cell.bodies), sp.Integer(cell.gates), sp.Integer(cell.states),
                    sp.Integer(T), sp.Integer(int(reverse_in)), sp.Integer(int(reverse_out)),
                    sp.Tuple(*(Str(g) for g in cell.gate_names)), sp.Tuple(*(Str(s) for s in cell.state_names)),
                    sp.Integer(cell.extras_in), sp.Integer(cell.extras_out))


#: node -> its number, and number -> node (``_Entry``), held weakly: a graph a session drops is freed.
_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_NODES: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_NUMBERS = itertools.count()


class _Entry(sp.Function):
    """An entry of a recurrence node at a symbolic index (SymPy's sum over a product's inner index):
    it evaluates to the entry once the indices are numbers. An explicit matrix there (``conv._entry_of``)
    would be expanded whole by ``Sum.doit``'s ``apart``, which stalls on a recurrence's long formulas."""

    @classmethod
    def eval(cls, key, i, j):
        if i.is_Integer and j.is_Integer:
            return _NODES[int(key)]._int_entry(int(i), int(j))
        return None


def _deferred_entry(node, i, j, **kw):
    if isinstance(i, (int, sp.Integer)) and isinstance(j, (int, sp.Integer)):
        return node._int_entry(int(i), int(j), **kw)
    key = _KEYS.get(node)
    if key is None:
        key = _KEYS[node] = next(_NUMBERS)
        _NODES[key] = node
    return _Entry(sp.Integer(key), i, j)


class _ScanBase(Printable, Ops, MatrixExpr):
    """Matrix operands, then the cell's spec (``_spec``) as the last argument."""

    precedence = PRECEDENCE["Atom"]

    def __new__(cls, *args):
        return MatrixExpr.__new__(cls, *args)

    @property
    def mats(self) -> tuple:
        return self.args[:-1]

    @property
    def spec(self):
        return self.args[-1]

    @property
    def cell(self) -> Cell:
        name, bodies, k, s, _, _, _, gates, states, ei, eo = self.spec
        return _cell_of(str(name), tuple(bodies), int(k), int(s), tuple(str(g) for g in gates),
                        tuple(str(c) for c in states), int(ei), int(eo))

    @property
    def steps(self) -> int:
        return int(self.spec[4])

    @property
    def reverse_in(self) -> bool:
        return bool(self.spec[5])

    @property
    def reverse_out(self) -> bool:
        return bool(self.spec[6])

    @property
    def out_sequence(self) -> int:
        """``T``: the rows are ``n`` sequences of ``T`` steps (``embedding.sequence_length``)."""
        return self.steps

    @property
    def units(self) -> int:
        return int(self._U.shape[0])

    base = 2  # the matrix operands before the optional ones: (XP, U) or (XP, UP, S, G, U)

    def _optional(self) -> dict:
        """``{"B": bias, "EI": extras read at input rows, "EO": at output rows}``, each or None: the
        operands after the first ``base``, in that order."""
        cell, rest = self.cell, list(self.mats[self.base:])
        eo = rest.pop() if cell.extras_out else None
        ei = rest.pop() if cell.extras_in else None
        return {"B": rest[0] if rest else None, "EI": ei, "EO": eo}

    @property
    def bias(self):
        """``B`` ``(r, k·u)`` or None: row 0 added to the input gates, row 1 (r = 2) to the recurrent ones."""
        return self._optional()["B"]

    @property
    def extras(self) -> tuple:
        """``(EI, EO)``: the per-step extra inputs read at the input rows and at the output rows (or None)."""
        o = self._optional()
        return o["EI"], o["EO"]

    def step_rows(self, b, t):
        """``(input row, output row, previous output row or None)`` of step ``t`` of sequence ``b``."""
        T = self.steps
        at = lambda rev, s: b * T + (T - 1 - s if rev else s)  # noqa: E731
        prev = at(self.reverse_out, t - 1) if t > 0 else None
        return at(self.reverse_in, t), at(self.reverse_out, t), prev

    def _entry(self, i, j, **kw):
        return _deferred_entry(self, i, j, **kw)


@functools.lru_cache(maxsize=256)
def _cell_of(name, bodies, k, s, gates, states, ei=0, eo=0) -> Cell:
    return Cell(name, k, s, bodies, gates, states, ei, eo)


class Scan(_ScanBase):
    """``cell_scan(XP, U[, bu][, EI][, EO])``: the states of every step ``(n·T, s·u)`` (see the module;
    ``EI``, ``EO``: a cell's extra per-step inputs, read at each step's input and output rows)."""

    notation = "cell_scan(XP, U): the recurrent cell run over the steps of each sequence, states of every step"
    explain_role = "H"  # sd.explain names each scan's states Hk and its δ δHk
    hvp_by_tangent = True  # sd.hvp differentiates the loss's tangent (a scan) rather than ScanGrad

    @property
    def _U(self):
        return self.args[1]

    @property
    def shape(self):
        return (self.args[0].shape[0], self.cell.states * self._U.shape[0])

    def _int_entry(self, i, j, **kw):
        T = self.steps
        return _forward(self, i // T, tuple(sorted(kw.items())))[i][j]


class ScanGrad(_ScanBase):
    """``cell_bptt(G; XP, UP, S, U)``: backpropagation through time, ``[δXP | δUP | δS]``
    ``(n·T, 2·k·u + s·u)``, from one reverse loop over the steps (see the module); a cell with extra
    inputs adds ``[δEI | δEO]``."""

    notation = ("cell_bptt(G; XP, UP, S, U): backpropagation through time, [δXP | δUP | δS] of every step "
                "(δS: each state's whole gradient, the carry from the next step included)")

    base = 5

    @property
    def _U(self):
        return self.args[4]

    @property
    def shape(self):
        c = self.cell
        return (self.args[0].shape[0], (2 * c.gates + c.states + c.extras_in + c.extras_out) * self._U.shape[0])

    def _int_entry(self, i, j, **kw):
        T = self.steps
        return _backward(self, i // T, tuple(sorted(kw.items())))[i][j]


# --------------------------------------------------------------------------- scalar unrolling (prove)


def _bias_rows(node, kw) -> tuple:
    """The input and recurrent biases as lists of ``k·u`` scalars (zeros where there is none)."""
    ku = node.cell.gates * node.units
    B = node.bias
    zero = [sp.Integer(0)] * ku
    if B is None:
        return zero, zero
    bx = [B._entry(0, c, **kw) for c in range(ku)]
    return bx, ([B._entry(1, c, **kw) for c in range(ku)] if int(B.shape[0]) == 2 else zero)


def _extras_env(node, ri: int, ro: int, j: int, kw: dict) -> dict:
    """The extra inputs of unit ``j`` at a step: ``EI`` read at its input row, ``EO`` at its output row."""
    cell, u = node.cell, node.units
    EI, EO = node.extras
    env = {cell.ein(m): EI._entry(ri, m * u + j, **kw) for m in range(cell.extras_in)}
    env.update({cell.eout(m): EO._entry(ro, m * u + j, **kw) for m in range(cell.extras_out)})
    return env


@functools.lru_cache(maxsize=64)
def _forward(node: Scan, b: int, kw: tuple) -> dict:
    """``{row: [state entries]}`` of sequence ``b``: the scan unrolled with SymPy scalars."""
    kw = dict(kw)
    XP, U = node.args[:2]
    bx, bu = _bias_rows(node, kw)
    cell, u = node.cell, node.units
    k, s = cell.gates, cell.states
    out, prev = {}, [sp.Integer(0)] * (s * u)
    for t in range(node.steps):
        ri, ro, _ = node.step_rows(b, t)
        up = [bu[c] + sp.Add(*(prev[m] * U._entry(m, c, **kw) for m in range(u))) for c in range(k * u)]
        row = [None] * (s * u)
        for j in range(u):
            env = {cell.x(g): XP._entry(ri, g * u + j, **kw) + bx[g * u + j] for g in range(k)}
            env.update({cell.u(g): up[g * u + j] for g in range(k)})
            env.update({cell.p(c): prev[c * u + j] for c in range(s)})
            env.update(_extras_env(node, ri, ro, j, kw))
            for c in range(s):
                row[c * u + j] = cell.bodies[c].xreplace(env)
        out[ro] = row
        prev = row
    return out


@functools.lru_cache(maxsize=64)
def _backward(node: ScanGrad, b: int, kw: tuple) -> dict:
    """``{row: [δXP..., δUP..., δS...]}`` of sequence ``b``: the BPTT recurrence with SymPy scalars
    (local derivatives ``sp.diff`` of the cell; the carry through ``f``, ``z`` and ``U``)."""
    kw = dict(kw)
    XP, UP, S, G, U = node.args[:5]
    bx, bu = _bias_rows(node, kw)
    cell, u = node.cell, node.units
    k, s = cell.gates, cell.states
    ei, eo = cell.extras_in, cell.extras_out
    ku, ws = k * u, (2 * k + s) * u
    out = {}
    carry = [sp.Integer(0)] * (s * u)
    for t in reversed(range(node.steps)):
        ri, ro, rp = node.step_rows(b, t)
        D = [G._entry(ro, c, **kw) + carry[c] for c in range(s * u)]
        dx, dup, nxt = [None] * ku, [None] * ku, [sp.Integer(0)] * (s * u)
        dei, deo = [None] * (ei * u), [None] * (eo * u)
        for j in range(u):
            env = {cell.x(g): XP._entry(ri, g * u + j, **kw) + bx[g * u + j] for g in range(k)}
            env.update({cell.u(g): UP._entry(ro, g * u + j, **kw) + bu[g * u + j] for g in range(k)})
            env.update({cell.p(c): S._entry(rp, c * u + j, **kw) if rp is not None else sp.Integer(0)
                        for c in range(s)})
            env.update(_extras_env(node, ri, ro, j, kw))

            def through(v):
                return sp.Add(*(D[c * u + j] * cell.derivatives[c][v].xreplace(env) for c in range(s)))

            for g in range(k):
                dx[g * u + j] = through(g)
                dup[g * u + j] = through(k + g)
            for c in range(s):
                nxt[c * u + j] = through(2 * k + c)
            for m in range(ei):
                dei[m * u + j] = through(2 * k + s + m)
            for m in range(eo):
                deo[m * u + j] = through(2 * k + s + ei + m)
        for j in range(u):  # h_{t-1} also feeds every recurrent gate of step t
            nxt[j] += sp.Add(*(dup[col] * U._entry(j, col, **kw) for col in range(ku)))
        width = ws + (ei + eo) * u
        rows = out.setdefault(ri, [None] * width)
        rows[:ku] = dx
        rows[ws: ws + ei * u] = dei
        rows_o = out.setdefault(ro, [None] * width)
        rows_o[ku: 2 * ku] = dup
        rows_o[2 * ku: ws] = D
        rows_o[ws + ei * u:] = deo
        carry = nxt
    return out


# --------------------------------------------------------------------------- builders


def shift(x, T: int, reverse: bool = False):
    """Rows moved one step later within each sequence of ``T`` rows (``reverse``: one step earlier),
    zeros where nothing comes in: the previous step's values ``(n·T, w)`` (``Shifted``)."""
    return Shifted(x, sp.Integer(T), sp.Integer(int(reverse)))


class Shifted(Printable, Ops, MatrixExpr):
    """``shift(h)``: each sequence's rows moved one step (the previous step's ``h``; zeros at the first
    step). Linear; its adjoint is the shift the other way. It lowers as its ``expansion`` (``Reshape``,
    ``Cols``, ``Place``): no kernel of its own."""

    precedence = PRECEDENCE["Atom"]
    notation = "shift(h): each sequence's rows moved one step (the previous step's h; zeros at the first)"

    def __new__(cls, x, T, reverse):
        return MatrixExpr.__new__(cls, x, sp.Integer(T), sp.Integer(int(reverse)))

    @property
    def shape(self):
        return self.args[0].shape

    @property
    def out_sequence(self) -> int:
        return int(self.args[1])

    def _entry(self, i, j, **kw):
        return _deferred_entry(self, i, j, **kw)

    def _int_entry(self, i, j, **kw):
        x, T, rev = self.args[0], int(self.args[1]), bool(self.args[2])
        t = i % T
        if (t == T - 1) if rev else (t == 0):
            return sp.Integer(0)
        return x._entry(i + 1 if rev else i - 1, j, **kw)

    @property
    def expansion(self):
        x, T, rev = self.args[0], int(self.args[1]), bool(self.args[2])
        rows, w = x.shape[0], int(x.shape[1])
        if T == 1:
            return x * 0
        flat = Reshape(x, rows / T, T * w)
        moved = Place(Cols(flat, w, T * w), 0, T * w) if rev else Place(Cols(flat, 0, (T - 1) * w), w, T * w)
        return Reshape(moved, rows, w)


def scan(cell: Cell, XP, U, bu, T: int, *, reverse_in=False, reverse_out=False, extras_in=None, extras_out=None,
         where="recurrent layer"):
    """The states of every step: ``Scan`` over the projected inputs ``XP`` ``(n·T, k·u)`` with the
    recurrent kernel ``U`` ``(u, k·u)`` and an optional bias ``bu``: ``(1, k·u)`` (added to the input
    gates: Keras's LSTM and SimpleRNN ``bias``) or ``(2, k·u)`` (row 1 added to the recurrent gates
    inside the cell: Keras's GRU with ``reset_after``). A cell with extra per-step inputs (a scan's
    tangent, ``_jvp_scan``) reads them from ``extras_in`` ``(n·T, cell.extras_in·u)`` at each step's
    input row and ``extras_out`` ``(n·T, cell.extras_out·u)`` at its output row, unit ``j`` of extra
    ``m`` in column ``m·u + j``."""
    for m in (XP, U) + tuple(e for e in (bu, extras_in, extras_out) if e is not None):
        if not isinstance(m, MatrixExpr):
            raise TypeError(f"{where}: scan takes matrix expressions, got {m!r}")
    u = int(U.shape[0])
    ku = cell.gates * u
    if U.shape[1] != ku or XP.shape[1] != ku:
        raise ShapeMismatch(f"{where}: the {cell.name} cell with {u} units needs the projected inputs and the "
                            f"recurrent kernel {cell.gates}·{u} = {ku} wide, got {name_of(XP)} {shape_text(XP)} and "
                            f"{name_of(U)} {shape_text(U)}")
    if bu is not None and tuple(bu.shape) not in ((1, ku), (2, ku)):
        raise ShapeMismatch(f"{where}: the bias {name_of(bu)} {shape_text(bu)} must be (1, {ku}) or (2, {ku})")
    for what, E, count in (("extras_in", extras_in, cell.extras_in), ("extras_out", extras_out, cell.extras_out)):
        if (E is None) != (count == 0):
            raise ValueError(f"{where}: the {cell.name} cell reads {count} extra input(s) per unit ({what}), "
                             f"got {'none' if E is None else name_of(E)}")
        if E is not None and (sp.expand(E.shape[0] - XP.shape[0]) != 0 or E.shape[1] != count * u):
            raise ShapeMismatch(f"{where}: {what} {name_of(E)} {shape_text(E)} must have the rows of "
                                f"{name_of(XP)} and {count}·{u} = {count * u} columns")
    mats = (XP, U) + tuple(e for e in (bu, extras_in, extras_out) if e is not None)
    return Scan(*mats, _spec(cell, T, reverse_in, reverse_out))


def last_step(h, T: int, first: bool = False):
    """Each sequence's last row ``(n, w)`` of ``h`` ``(n·T, w)`` (``first``: its first row)."""
    w = int(h.shape[1])
    flat = Reshape(h, h.shape[0] / T, T * w)
    return Cols(flat, 0, w) if first else Cols(flat, (T - 1) * w, T * w)


# --------------------------------------------------------------------------- rules


def _hidden(S, cell, u):
    return Cols(S, 0, u) if cell.states > 1 else S


def _reads(cell: Cell, variables) -> bool:
    """Whether any of the cell's formulas reads one of ``variables``."""
    return any(b.free_symbols & set(variables) for b in cell.bodies)


@VJP.rule(Scan)
def _vjp_scan(node, G):
    XP, U = node.args[:2]
    bu, (EI, EO), cell, T, u = node.bias, node.extras, node.cell, node.steps, node.units
    k, s = cell.gates, cell.states
    ku, ws, wi = k * u, (2 * k + s) * u, cell.extras_in * u
    H = shift(_hidden(node, cell, u), T, node.reverse_out)
    optional = tuple(m for m in (bu, EI, EO) if m is not None)
    R = _grad_class(cell)(XP, H @ U, node, G, U, *optional, node.spec)
    dUP = Cols(R, ku, 2 * ku)
    out = [(U, H.T @ dUP)]
    if _reads(cell, [cell.x(g) for g in range(k)]):  # a tangent scan with no input tangent reads no x
        out.append((XP, Cols(R, 0, ku)))
    if bu is not None:  # [1ᵀδXP | 1ᵀδUP] is the (2, k·u) bias's gradient read row by row
        r = int(bu.shape[0])
        out.append((bu, SumRows(Cols(R, 0, r * ku)) if r == 1 else Reshape(SumRows(Cols(R, 0, r * ku)), r, ku)))
    if EI is not None:
        out.append((EI, Cols(R, ws, ws + wi)))
    if EO is not None:
        out.append((EO, Cols(R, ws + wi, int(R.shape[1]))))
    return out


@VJP.rule(ScanGrad)
def _vjp_scan_grad(node, G):
    raise NotImplementedError(f"the {node.cell.name} recurrence's gradient has no gradient of its own: a gradient "
                              "of a gradient through a recurrent layer (reverse over reverse) is not supported; "
                              "sd.hvp and sd.hessian go through the scan's tangent instead (reverse over forward)")


@JVP.rule(ScanGrad)
def _jvp_scan_grad(node, tan):
    raise NotImplementedError(f"forward mode through the {node.cell.name} recurrence's gradient (explain_hvp: forward "
                              "over reverse) is not supported; sd.hvp and sd.hessian work through recurrent layers "
                              "(reverse over forward: the gradient of the loss's tangent), and "
                              "sd.explain(symdl.autodiff.jvp.tangents([loss], {param: direction})[loss], params) "
                              "prints that derivation")


def _bias_row(B, r: int, ku: int):
    """Row ``r`` of a ``(1, k·u)`` or ``(2, k·u)`` bias as a ``(1, k·u)`` row."""
    if int(B.shape[0]) == 1:
        return B if r == 0 else None
    return Cols(Reshape(B, 1, 2 * ku), r * ku, (r + 1) * ku)


def _plus(*terms):
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


@JVP.rule(Scan)
def _jvp_scan(node, tan):
    """The tangent of a scan is a scan: ``ṡ_t = Σ_g ∂c/∂x_g ẋ_g + Σ_g ∂c/∂u_g u̇_g + Σ_c' ∂c/∂p_c' ṗ_c'
    (+ Σ_e ∂c/∂e ė)``, with ``u̇_t = ḣ_{t-1} U + h_{t-1} U̇ + ḃu``: a linear recurrence through the same
    ``U``. Its cell (``sp.diff`` of this one) reads the point ``(x, u, p)`` where the derivatives are
    taken, and the known part of ``u̇`` (``K = shift(h) U̇ + ḃu``), as per-step extra inputs."""
    XP, U = node.args[:2]
    B, (EI, EO), cell, T, u = node.bias, node.extras, node.cell, node.steps, node.units
    k, s, ei, eo = cell.gates, cell.states, cell.extras_in, cell.extras_out
    ku = k * u
    tangent = lambda m: None if m is None else tan(m)  # noqa: E731
    dXP, dU, dB, dEI, dEO = (tangent(m) for m in (XP, U, B, EI, EO))
    if all(d is None for d in (dXP, dU, dB, dEI, dEO)):
        return None
    H = shift(_hidden(node, cell, u), T, node.reverse_out)
    rows = XP.shape[0]
    row = lambda M, r: None if M is None else _bias_row(M, r, ku)  # noqa: E731
    xdot = _plus(dXP, None if row(dB, 0) is None else Broadcast(row(dB, 0), rows, ku))
    K = _plus(None if dU is None else H @ dU, None if row(dB, 1) is None else Broadcast(row(dB, 1), rows, ku))
    point_x = _plus(XP, row(B, 0))
    point_u = _plus(H @ U, row(B, 1))
    ins = [point_x] + [m for m in (EI, dEI) if m is not None]
    outs = [point_u, shift(node, T, node.reverse_out)] + [m for m in (EO, K, dEO) if m is not None]
    tc_in = k + ei * (1 + (dEI is not None))
    tc_out = k + s + eo * (1 + (dEO is not None)) + k * (K is not None)
    base = 2 * k + s
    at_in = lambda m: VARS[base + m]  # noqa: E731
    at_out = lambda m: VARS[base + tc_in + m]  # noqa: E731
    point = {cell.x(g): at_in(g) for g in range(k)}  # the original cell's variables -> the extras
    point.update({cell.ein(m): at_in(k + m) for m in range(ei)})
    point.update({cell.u(g): at_out(g) for g in range(k)})
    point.update({cell.p(c): at_out(k + c) for c in range(s)})
    point.update({cell.eout(m): at_out(k + s + m) for m in range(eo)})
    moves = [(cell.x(g), VARS[g] if xdot is not None else 0) for g in range(k)]
    moves += [(cell.u(g), VARS[k + g] + (at_out(k + s + eo + g) if K is not None else 0)) for g in range(k)]
    moves += [(cell.p(c), VARS[2 * k + c]) for c in range(s)]
    if dEI is not None:
        moves += [(cell.ein(m), at_in(k + ei + m)) for m in range(ei)]
    if dEO is not None:
        moves += [(cell.eout(m), at_out(k + s + eo + k * (K is not None) + m)) for m in range(eo)]
    index = {v: i for i, v in enumerate(cell.variables)}
    bodies = tuple(sp.Add(*(cell.derivatives[c][index[v]].xreplace(point) * d for v, d in moves))
                   for c in range(s))
    tc = Cell(f"{cell.name}_tangent", k, s, bodies, cell.gate_names,
              tuple(f"{nm}\u0307" for nm in cell.state_names), tc_in, tc_out)
    return scan(tc, XP if xdot is None else xdot, U, None, T, reverse_in=node.reverse_in,
                reverse_out=node.reverse_out, extras_in=concat(*ins), extras_out=concat(*outs),
                where=f"the tangent of {cell.name}_scan")


@VJP.rule(Shifted)
def _vjp_shifted(node, G):
    x, T, rev = node.args
    return [(x, Shifted(G, T, 1 - rev))]


JVP.rule(Shifted)(linear_in_first_operand)
LOWER.rule(Shifted)(lower_expansion)


@LOWER.rule(Scan)
def _lower_scan(lw, node):
    cell = node.cell
    XP, U = node.args[:2]  # the kernel reads Uᵀ (k·u, u): each gate's column of U is a contiguous row
    ops = tuple(Operand(lw.buffer_of(m)) for m in (XP, Transpose(U)) + tuple(node.mats[2:]))
    lw.emit(ir.Scan(lw.name(node), ops, tuple(cell.bodies), cell.gates, cell.states, (sp.Integer(node.steps),),
                    node.reverse_in, node.reverse_out, cell.extras_in, cell.extras_out), node.shape)


@LOWER.rule(ScanGrad)
def _lower_scan_grad(lw, node):
    cell = node.cell
    ops = tuple(Operand(lw.buffer_of(m)) for m in node.mats)
    lw.emit(ir.ScanGrad(lw.name(node), ops, tuple(cell.bodies), cell.gates, cell.states, (sp.Integer(node.steps),),
                        node.reverse_in, node.reverse_out, cell.extras_in, cell.extras_out), node.shape)


# --------------------------------------------------------------------------- BPTT in textbook form

_SUB = str.maketrans("0123456789+-", "₀₁₂₃₄₅₆₇₈₉₊₋")


def _display(cell: Cell) -> tuple:
    """``(rename, states)``: a function showing a cell formula with its gates named (``i``, ``f``,
    ``g``, ``o``; ``z``, ``r``, ``ĥ``) and the previous states as ``h'``, ``c'``; the states' own
    formulas as displayed (the LSTM's ``c`` is then named ``c`` inside ``h``'s derivatives)."""
    k, s = cell.gates, cell.states
    shown = {"lstm": ("i", "f", "g", "o"), "gru": ("z", "r", "ĥ"), "simple_rnn": ("h",)}.get(
        cell.name, cell.gate_names or tuple(f"a{g}" for g in range(k)))
    gates = [sp.Symbol(nm, real=True) for nm in shown]
    prev = {cell.p(c): sp.Symbol(f"{cell.state_names[c]}'", real=True) for c in range(s)}
    prev.update({cell.x(g): sp.Symbol(f"x_{shown[g]}", real=True) for g in range(k)})
    prev.update({cell.u(g): sp.Symbol(f"u_{shown[g]}", real=True) for g in range(k)})
    xs = {cell.x(g): g for g in range(k)}
    definitions = {}

    def rename(e):
        e = sp.sympify(e)
        while True:
            hits = {}
            for f in e.atoms(sp.Function):
                own = f.free_symbols & set(xs)
                if len(own) == 1:
                    hits[f] = gates[xs[next(iter(own))]]
            if not hits:
                break
            for f, g in hits.items():
                definitions.setdefault(g, f.xreplace(prev))
            e = e.xreplace(hits)
        return e.xreplace(prev)

    states = [rename(b) for b in cell.bodies]
    return rename, states, definitions


def bptt_text(cell: Cell) -> str:
    """The recurrence a cell's ``bptt`` node computes, in textbook form: each state's δ at step ``t``
    (its own ``G`` plus what step ``t+1`` sends back, the local derivatives ``sp.diff`` of the cell),
    the gates' δ, and each weight's gradient as a sum over the steps."""
    rename, states, definitions = _display(cell)
    names = cell.state_names
    k, s = cell.gates, cell.states
    named = {}
    for c in range(s):
        if c > 0 and states[c].free_symbols:  # the LSTM's c inside h's formula reads as c
            named[states[c]] = sp.Symbol(names[c], real=True)
    show = lambda e: sp.sstr(sp.factor_terms(rename(e).xreplace(named)))  # noqa: E731
    t, t1 = "ₜ", "ₜ₊₁"
    lines = []
    for c in range(s):
        terms = [f"G_{names[c]},{t}"]
        for c2 in range(s):
            d = cell.derivatives[c2][2 * k + c]
            if d != 0:
                terms.append(f"δ{names[c2]}{t1} ⊙ [{show(d)}]{t1}")
        if c == 0:
            terms.append(f"δUP{t1} Uᵀ")
        lines.append(f"δ{names[c]}{t} = " + " + ".join(terms))
    gate_names = cell.gate_names or tuple(str(g) for g in range(k))
    for g in range(k):
        for kind, v in (("XP", g), ("UP", k + g)):
            terms = [f"δ{names[c]}{t} ⊙ [{show(cell.derivatives[c][v])}]{t}" for c in range(s)
                     if cell.derivatives[c][v] != 0]
            lines.append(f"δ{kind}_{gate_names[g]},{t} = " + (" + ".join(terms) or "0"))
    lines.append("∂L/∂kernel = Σₜ xₜᵀ δXPₜ,  ∂L/∂recurrent_kernel = Σₜ hₜ₋₁ᵀ δUPₜ,  ∂L/∂bias = Σₜ 1ᵀ δXPₜ"
                 + (" (its recurrent row: Σₜ 1ᵀ δUPₜ)" if cell.name == "gru" else ""))
    where = ", ".join(f"{nm}' = {nm}ₜ₋₁" for nm in names)
    defs = [f"{g} = {sp.sstr(f)}" for g, f in definitions.items()]
    defs += [f"{names[c]} = {sp.sstr(st)}" for c, st in enumerate(states) if st != sp.Symbol(names[c], real=True)]
    return "; ".join(lines) + f" (steps from the last back; {where}; x = XP + b, u = UP; " + ", ".join(defs) + ")"


@functools.lru_cache(maxsize=64)
def _grad_class(cell: Cell):
    """``ScanGrad`` for one cell, its ``notation`` (what ``explain`` prints under Notation) the cell's
    BPTT recurrence (``bptt_text``)."""
    if cell.extras_in or cell.extras_out:  # a tangent cell: its formulas are second derivatives
        text = (f"{cell.name}_bptt(G; XP, UP, S, U; EI, EO): backpropagation through time of a cell with per-step "
                "extra inputs, [δXP | δUP | δS | δEI | δEO] of every step (local derivatives: sp.diff of the cell)")
    else:
        text = (f"{cell.name}_bptt(G; XP, UP, S, U): backpropagation through time, [δXP | δUP | δS] of every step: "
                + bptt_text(cell))
    return type(f"{cell.name.title().replace('_', '')}BPTT", (ScanGrad,), {"notation": text, "__module__": __name__})


@PRINT_RULES.rule(Scan)
def _print_scan(node, printer, latex=False):
    inner = ", ".join(printer._print(a) for a in node.mats)
    label = f"{node.cell.name}_scan"
    if latex:
        return r"\operatorname{%s}\left(%s\right)" % (label.replace("_", r"\_"), inner)
    return f"{label}({inner})"


@PRINT_RULES.rule(ScanGrad)
def _print_scan_grad(node, printer, latex=False):
    XP, UP, S, G, U = (printer._print(a) for a in node.mats[:5])
    label = f"{node.cell.name}_bptt"
    if latex:
        return r"\operatorname{%s}\left(%s; %s, %s, %s, %s\right)" % (label.replace("_", r"\_"), G, XP, UP, S, U)
    return f"{label}({G}; {XP}, {UP}, {S}, {U})"


@PRINT_RULES.rule(Shifted)
def _print_shifted(node, printer, latex=False):
    inner = printer._print(node.args[0])
    return r"\operatorname{shift}\left(%s\right)" % inner if latex else f"shift({inner})"


__all__ = ["Cell", "bptt_text", "Scan", "ScanGrad", "Shifted", "gru_cell", "last_step", "lstm_cell", "scan",
           "shift", "simple_rnn_cell"]
