"""Presentation MathML of symdl expressions: what a browser renders natively, offline (no script).

SymPy's ``MathMLPresentationPrinter`` knows SymPy's nodes; this one adds symdl's, with the
notation of ``symdl.graph.printing``: an elementwise formula is its scalar body with the
operands put in (``⊙`` between matrix factors), a broadcast bias reads as the bias,
``sum_rows(δ)`` is ``1ᵀδ``, ``δ1`` is ``δ₁``.

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 3)); b = sd.param("b", 3)
>>> s = math(sd.tanh(x @ W + b))
>>> s.startswith('<math xmlns="http://www.w3.org/1998/Math/MathML"'), "<mi>tanh</mi>" in s, "<mi>W</mi>" in s
(True, True, True)
"""
from __future__ import annotations

import re
from html.entities import html5

import sympy as sp
from sympy.printing.mathml import MathMLPresentationPrinter

from ..graph.nodes import Broadcast, RowLogSumExp, children, is_atomic
from ..graph.printing import Indicator, Softmax

MATHML_NS = "http://www.w3.org/1998/Math/MathML"


class SymdlMathML(MathMLPresentationPrinter):
    """MathML for symdl's graph nodes (``Map``, ``Broadcast``, sums, log-sum-exp) and its notation."""

    def __init__(self, settings=None):
        super().__init__(settings or {})
        self._operands = {}  # placeholder symbol -> the matrix it stands for, while a Map body prints
        self._factors = frozenset()  # placeholders that stand as a factor (their operand gets parentheses)

    # ------------------------------------------------------------------ helpers

    def _el(self, tag, *children, text=None, **attrs):
        e = self.dom.createElement(tag)
        if text is not None:
            e.appendChild(self.dom.createTextNode(text))
        for c in children:
            e.appendChild(c)
        for k, v in attrs.items():
            e.setAttribute(k, v)
        return e

    def _mo(self, text):
        return self._el("mo", text=text)

    def _row(self, *children):
        return self._el("mrow", *children)

    def _fenced(self, inner):
        return self._row(self._mo("("), inner, self._mo(")"))

    def _applied(self, name, inner):
        return self._row(self._el("mi", text=name), self._mo("\u2061"), self._fenced(inner))

    # ------------------------------------------------------------------ symdl nodes

    def _print_Map(self, node):
        body = node.lam.expr.replace(lambda e: isinstance(e, sp.Heaviside) and len(e.args) == 2 and e.args[1] == 0,
                                     lambda e: Indicator(e.args[0]))
        body = sp.factor_terms(body)
        holders = [sp.Dummy(f"m{i}") for i in range(len(node.operands))]
        body = _softmax_of(body.xreplace(dict(zip(node.lam.variables, holders))), holders, list(node.operands))
        saved, saved_factors = self._operands, self._factors
        self._operands = {**saved, **dict(zip(holders, node.operands))}
        self._factors = saved_factors | {h for h in holders if _in_product(body, h)}
        try:
            return self._print(body)
        finally:
            self._operands, self._factors = saved, saved_factors

    def _print_Dummy(self, sym):
        if sym in self._operands:
            operand = self._operands[sym]
            printed = self._print(operand)
            return printed if is_atomic(operand) or sym not in self._factors else self._fenced(printed)
        return self._print_Symbol(sym)

    def _as_ordered_terms(self, expr, order=None):  # ``softmax(Z) - y``, not ``-y + softmax(Z)``
        terms = super()._as_ordered_terms(expr, order=order)
        return sorted(terms, key=lambda t: t.could_extract_minus_sign())

    def _print_Mul(self, expr):
        holders = set(self._operands)
        matrix = [a for a in expr.args if a.free_symbols & holders]
        if not matrix or len(matrix) == len(expr.args):
            if len(matrix) < 2:
                return super()._print_Mul(expr)
        scalar = sp.Mul(*[a for a in expr.args if not (a.free_symbols & holders)])
        parts = []
        for i, factor in enumerate(matrix):
            if i:
                parts.append(self._mo("\u2299"))  # ⊙
            printed = self._print(factor)
            parts.append(self._fenced(printed) if factor.is_Add else printed)
        product = self._row(*parts)
        if scalar == 1:
            return product
        if scalar == -1:
            return self._row(self._mo("-"), product)
        lead = self._print(scalar)
        if scalar.is_Add:
            lead = self._fenced(lead)
        return self._row(lead, self._mo("\u2062"), product)

    def _print_Broadcast(self, node):
        return self._print(node.args[0])

    def _print_SumRows(self, node):
        one = self._el("msup", self._el("mn", text="1", mathvariant="bold"), self._mo("T"))
        inner = self._print(node.args[0])
        return self._row(one, self._mo("\u2062"), inner if is_atomic(node.args[0]) else self._fenced(inner))

    def _print_SumCols(self, node):
        one = self._el("mn", text="1", mathvariant="bold")
        inner = self._print(node.args[0])
        return self._row(inner if is_atomic(node.args[0]) else self._fenced(inner), self._mo("\u2062"), one)

    def _print_SumAll(self, node):
        return self._row(self._mo("\u2211"), self._fenced(self._print(node.args[0])))

    def _print_RowLogSumExp(self, node):
        return self._applied("logsumexp", self._print(node.args[0]))

    def _print_Indicator(self, expr):
        return self._row(self._el("mn", text="\U0001d7d9"), self._mo("["), self._print(expr.args[0]),
                         self._mo(">"), self._el("mn", text="0"), self._mo("]"))

    def _print_Printable(self, node):
        """Any other symdl node (convolution, pooling, ...): ``name(operands)`` when its text reads
        so (``patches(x)``, ``flatten(A1)``), with the operands as MathML; else its text as one token."""
        text, operands = sp.sstr(node), children(node)
        call = re.fullmatch(r"([A-Za-z_]\w*)\((.*)\)", text, flags=re.S)
        if call and operands and ", ".join(sp.sstr(o) for o in operands) == call.group(2):
            inner = [self._print(o) for o in operands]
            args = inner[0] if len(inner) == 1 else self._row(*[x for i, e in enumerate(inner)
                                                                for x in ([self._mo(",")] if i else []) + [e]])
            return self._applied(call.group(1), args)
        return self._el("mtext", text=text)

    def _print_Str(self, s):
        return self._el("mi", text=str(s))


def _in_product(body, holder) -> bool:
    """Whether ``holder`` stands as a factor or a power's base somewhere in ``body``."""
    return any(isinstance(sub, (sp.Mul, sp.Pow)) and holder in sub.args for sub in sp.preorder_traversal(body))


def _softmax_of(body, holders, operands):
    """``exp(z - l)`` where ``l`` stands for ``logsumexp(z)`` (broadcast) reads ``softmax(z)``."""
    pairs = {}
    for j, a in enumerate(operands):
        lse = a.args[0] if isinstance(a, Broadcast) else a
        if isinstance(lse, RowLogSumExp) and lse.args[0] in operands:
            pairs[holders[j]] = holders[operands.index(lse.args[0])]
    if not pairs:
        return body
    return body.replace(lambda e: isinstance(e, sp.exp) and any(e.args[0] == z - l for l, z in pairs.items()),
                        lambda e: Softmax(next(z for l, z in pairs.items() if e.args[0] == z - l)))


def math(expr, display: str = "inline") -> str:
    """``<math>…</math>`` of one expression (``display="block"`` for a displayed formula)."""
    printer = SymdlMathML()
    inner = printer._print(expr)
    return _wrap(printer, inner, display)


def _wrap(printer, inner, display) -> str:
    root = printer.dom.createElement("math")
    root.setAttribute("xmlns", MATHML_NS)
    root.setAttribute("display", display)
    root.appendChild(inner)
    return _numeric_entities(root.toxml())


_XML_ENTITIES = {"amp", "lt", "gt", "quot", "apos"}


def _numeric_entities(text: str) -> str:
    """SymPy writes HTML's named entities (``&InvisibleTimes;``): numeric ones parse as XML too."""
    def one(m):
        name = m.group(1)
        if name in _XML_ENTITIES:
            return m.group(0)
        char = html5.get(name + ";")
        return "".join(f"&#x{ord(c):X};" for c in char) if char else m.group(0)

    return re.sub(r"&([A-Za-z][A-Za-z0-9]*);", one, text)


def left_side(printer, lhs):
    """The left-hand side of an explanation line: a named matrix, ``L``, ``∂L/∂W`` or ``(Hv)_W``."""
    if isinstance(lhs, tuple):
        kind, p = lhs
        if kind == "∂L/∂":
            num = printer._row(printer._el("mo", text="\u2202"), printer._el("mi", text="L"))
            den = printer._row(printer._el("mo", text="\u2202"), printer._print(p))
            return printer._el("mfrac", num, den)
        if kind.strip() == "uses of":
            return printer._row(printer._el("mtext", text="uses of\u00a0"), printer._print(p))
        hv = printer._row(printer._el("mi", text="H"), printer._el("mi", text="v"))
        return printer._el("msub", printer._fenced(hv), printer._print(p))
    return printer._print(lhs)


def equation(lhs, rhs, display: str = "block") -> str:
    """``<math>lhs = rhs</math>`` for one line of an explanation (``lines()``'s left and right
    sides); a tuple ``rhs`` (a fan-out's uses) reads ``lhs: a; b``."""
    printer = SymdlMathML()
    if isinstance(rhs, tuple):
        parts = [left_side(printer, lhs), printer._mo(":")]
        for i, e in enumerate(rhs):
            parts += ([printer._mo(";")] if i else []) + [printer._print(e)]
        return _wrap(printer, printer._row(*parts), display)
    row = printer._row(left_side(printer, lhs), printer._mo("="), printer._print(rhs))
    return _wrap(printer, row, display)


__all__ = ["MATHML_NS", "SymdlMathML", "equation", "left_side", "math"]
