"""How symdl nodes read: text, pretty and LaTeX.

Conventions (the ones a textbook uses):

* ``X*W`` is the matrix product (SymPy's own notation), ``X.T`` the transpose;
* ``⊙`` (``\\odot``) is the elementwise product; other elementwise formulas read as
  scalar formulas applied to every entry: ``tanh(X*W + b)``, ``1 - A**2``;
* a bias broadcast over the batch is written as the bias itself (``X*W + b``);
* ``sum_rows(δ)`` (``1ᵀδ``) sums over the batch, ``sum(...)`` over everything.

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 3))
>>> print(sd.sigmoid(x @ W) * 2)
2*sigmoid(x*W)
>>> sd.latex(sd.tanh(x @ W))
'\\\\tanh{\\\\left(x W \\\\right)}'
"""
from __future__ import annotations

import re

import sympy as sp

from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from .nodes import INDEX_SYMBOLS, PRINT_RULES, Broadcast, Map, RowLogSumExp, SumAll, SumCols, SumRows, is_atomic

_LATEX_NUMBER_ODOT = re.compile(r"(\d) \\odot ")
_OPEN, _CLOSE = "\x01", "\x02"  # bracket a matrix factor of a product while it prints


def _positive_first(terms):
    """A sum reads as a textbook writes it: ``softmax(Z) - y``, not ``-y + softmax(Z)``."""
    return sorted(terms, key=lambda t: t.could_extract_minus_sign())


class BodyText(StrPrinter):
    """The text of a scalar formula applied elementwise to matrices (the symbols in ``matrices``).

    ``⊙`` joins two matrix factors of a product; a number or scalar symbol is joined with
    ``*`` (``2*Z``, ``lr*G``); ``|x|`` is ``Abs``, ``{a if c; b otherwise}`` a ``Piecewise``,
    and a sum puts its positive terms first.
    """

    def __init__(self, matrices=frozenset(), **settings):
        super().__init__(settings)
        self.matrices = frozenset(matrices)
        self._mark = False

    def _as_ordered_terms(self, expr, order=None):
        return _positive_first(super()._as_ordered_terms(expr, order=order))

    def parenthesize(self, item, level, strict=False):
        mark, self._mark = self._mark, False  # only the direct factors of a product are marked
        try:
            s = super().parenthesize(item, level, strict)
        finally:
            self._mark = mark
        if mark and getattr(item, "free_symbols", set()) & self.matrices:
            return _OPEN + s + _CLOSE
        return s

    def _print_Mul(self, expr):
        mark, self._mark = self._mark, True
        try:
            s = super()._print_Mul(expr)
        finally:
            self._mark = mark
        return s.replace(_CLOSE + "*" + _OPEN, "⊙").replace(_OPEN, "").replace(_CLOSE, "")

    def _print_Abs(self, expr):
        return "|" + self._print(expr.args[0]) + "|"

    def _print_Piecewise(self, expr):
        cases = []
        for e, c in expr.args:
            cond = "otherwise" if c == sp.true else "if " + self._print(c)
            cases.append(f"{self._print(e)} {cond}")
        return "{" + "; ".join(cases) + "}"


class BodyLatex(LatexPrinter):
    """LaTeX of a scalar formula: ``\\odot`` for products (scalar factors are fixed up by
    ``body_latex``), sums positive terms first, ``\\begin{cases}`` with "if" and "otherwise"."""

    def _as_ordered_terms(self, expr, order=None):
        return _positive_first(super()._as_ordered_terms(expr, order=order))

    def _print_Piecewise(self, expr):
        rows = []
        for e, c in expr.args:
            cond = r"\text{otherwise}" if c == sp.true else r"\text{if } " + self._print(c)
            rows.append(f"{self._print(e)} & {cond}")
        return r"\begin{cases} " + r" \\ ".join(rows) + r" \end{cases}"


def _with_indices(body, matrices) -> frozenset:
    """A factor that reads the loop indices (dropout's draw) varies per entry: a matrix."""
    return frozenset(matrices) | (sp.sympify(body).free_symbols & INDEX_SYMBOLS)


def body_text(body, matrices=frozenset()) -> str:
    """``body`` (a scalar formula over the symbols ``matrices``) as text, see ``BodyText``.

    Scalar symbols (``n``, hyper-parameters) print as tokens that sort first, so a product
    reads ``lr*G``, then get their names back.
    """
    matrices = _with_indices(body, matrices)
    scalars = sorted(body.free_symbols - set(matrices), key=str)
    tokens = {sym: sp.Symbol("QA" + _placeholder(i).name[2:-2]) for i, sym in enumerate(scalars)}
    s = BodyText(matrices).doprint(body.xreplace(tokens))
    for sym, tok in sorted(tokens.items(), key=lambda kv: -len(kv[1].name)):
        s = s.replace(tok.name, sp.sstr(sym))
    return s


def _scalar_tokens(body, matrices):
    """Stand-in symbols for the scalar factors of every product in ``body``.

    A product's factors that mention no matrix symbol (a hyper-parameter, ``n``, ``√2``,
    ``π``) are scalars: they get a token, printed next to their neighbour with a space, never
    ``\\odot``. Returns ``(body with tokens, {token: its LaTeX})``.
    """
    tokens = {}

    def token(value):
        for t, v in tokens.items():
            if v == value:
                return t
        t = sp.Symbol("QA" + _placeholder(len(tokens)).name[2:-2])  # sorts first: scalars lead
        tokens[t] = value
        return t

    def scalar(a):
        return not (a.free_symbols & matrices) and not a.is_Rational and not a.is_Float

    def split(m):
        args = []
        for a in m.args:
            if not scalar(a):
                args.append(a)
            elif a.is_Pow and a.exp.could_extract_minus_sign():  # keep 1/√π a fraction
                args.append(sp.Pow(token(a.base ** -a.exp), -1))
            else:
                args.append(token(a))
        return sp.Mul(*args)

    body = body.replace(lambda e: e.is_Mul and any(scalar(a) for a in e.args), split)
    body = body.xreplace({s: token(s) for s in body.free_symbols - set(matrices) - set(tokens)})
    out = {}
    for t, v in tokens.items():  # made inner first: a token's value may hold earlier tokens
        s = BodyLatex().doprint(v)
        for inner, name in sorted(out.items(), key=lambda kv: -len(kv[0].name)):
            s = s.replace(inner.name, name)
        out[t] = s
    return body, out


def body_latex(body, matrices=frozenset()) -> str:
    """LaTeX of ``body`` (over the symbols ``matrices``): ``\\odot`` only between matrix factors."""
    matrices = _with_indices(body, matrices)
    if not matrices:  # a scalar formula (a derivative's definition): no elementwise products
        return BodyLatex().doprint(body)
    body, tokens = _scalar_tokens(body, frozenset(matrices))
    s = _LATEX_NUMBER_ODOT.sub(r"\1 ", BodyLatex(dict(mul_symbol=r" \odot ")).doprint(body))
    for tok, name in sorted(tokens.items(), key=lambda kv: -len(kv[0].name)):
        s = s.replace(f"{tok.name} \\odot ", f"{name} ").replace(f" \\odot {tok.name}", f" {name}")
        s = s.replace(tok.name, name)
    return s


class Indicator(sp.Function):
    """``1[x > 0]``: how a step (``Heaviside(x, 0)``, relu′) reads in a formula.

    >>> import sympy as sp
    >>> t = sp.Symbol("t", real=True)
    >>> print(Indicator(t))
    1[t > 0]
    >>> sp.latex(Indicator(t))
    '\\\\mathbb{1}\\\\left[t > 0\\\\right]'
    """

    nargs = 1

    def _sympystr(self, printer):
        return f"1[{printer._print(self.args[0])} > 0]"

    def _latex(self, printer):
        return r"\mathbb{1}\left[%s > 0\right]" % printer._print(self.args[0])


class Softmax(sp.Function):
    """``softmax(z)``: how ``exp(z - logsumexp(z))`` (row-wise, stable) reads in a formula."""

    nargs = 1

    def _sympystr(self, printer):
        return f"softmax({printer._print(self.args[0])})"

    def _latex(self, printer):
        return r"\operatorname{softmax}\left(%s\right)" % printer._print(self.args[0])


def _softmax_of(body, ph, operands):
    """``exp(z - l)`` where the operand behind ``l`` is ``logsumexp(z)`` (broadcast) reads ``softmax(z)``."""
    pairs = {}
    for j, a in enumerate(operands):
        lse = a.args[0] if isinstance(a, Broadcast) else a
        if isinstance(lse, RowLogSumExp) and lse.args[0] in operands:
            pairs[ph[j]] = ph[operands.index(lse.args[0])]
    if not pairs:
        return body
    return body.replace(
        lambda e: isinstance(e, sp.exp) and any(e.args[0] == z - l for l, z in pairs.items()),
        lambda e: Softmax(next(z for l, z in pairs.items() if e.args[0] == z - l)))


def _readable(body):
    """``Heaviside(x, 0)`` (H(0) = 0, as backends evaluate it) reads as the indicator ``1[x > 0]``."""
    return body.replace(lambda e: isinstance(e, sp.Heaviside) and len(e.args) == 2 and e.args[1] == 0,
                        lambda e: Indicator(e.args[0]))


def _placeholder(i: int) -> sp.Symbol:
    letters = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters = chr(97 + r) + letters
    return sp.Symbol(f"QQ{letters}QQ")


def _in_product(body, var) -> bool:
    """Whether ``var`` stands as a factor or a power base somewhere in ``body``."""
    for sub in sp.preorder_traversal(body):
        if isinstance(sub, (sp.Mul, sp.Pow)) and var in sub.args:
            return True
    return False


def map_text(node, printer, latex: bool = False) -> str:
    """Print a ``Map`` by substituting its printed operands into its scalar body."""
    body = sp.factor_terms(_readable(node.lam.expr))  # a/n - b/n reads (a - b)/n
    ph = [_placeholder(i) for i in range(len(node.operands))]
    body = _softmax_of(body.xreplace(dict(zip(node.lam.variables, ph))), ph, list(node.operands))
    texts = []
    for p, a in zip(ph, node.operands):
        t = printer._print(a)
        if not is_atomic(a) and _in_product(body, p):
            t = r"\left(" + t + r"\right)" if latex else "(" + t + ")"
        texts.append(t)
    s = body_latex(body, set(ph)) if latex else body_text(body, set(ph))
    for p, t in zip(ph, texts):
        s = s.replace(p.name, t)
    return s


PRINT_RULES.rule(Map)(map_text)


@PRINT_RULES.rule(Broadcast)
def broadcast_text(node, printer, latex: bool = False) -> str:
    """A bias broadcast over the batch reads as the bias itself: ``X*W + b``."""
    return printer._print(node.args[0])


def _reduction_rule(label: str, latex_form):
    def rule(node, printer, latex: bool = False) -> str:
        inner = printer._print(node.args[0])
        if not latex:
            return f"{label}({inner})"
        wrap = inner if is_atomic(node.args[0]) else r"\left(" + inner + r"\right)"
        return latex_form(inner, wrap)

    return rule


PRINT_RULES[SumRows] = _reduction_rule("sum_rows", lambda inner, wrap: r"\mathbf{1}^{\top} " + wrap)
PRINT_RULES[SumCols] = _reduction_rule("sum_cols", lambda inner, wrap: wrap + r" \mathbf{1}")
PRINT_RULES[SumAll] = _reduction_rule("sum", lambda inner, wrap: r"\mathbf{1}^{\top} " + wrap + r" \mathbf{1}")
PRINT_RULES[RowLogSumExp] = _reduction_rule(
    "logsumexp", lambda inner, wrap: r"\operatorname{logsumexp}\left(" + inner + r"\right)")


def latex(expr) -> str:
    """LaTeX for any symdl expression (``\\odot`` marks elementwise products).

    >>> import symdl as sd
    >>> W = sd.param("W", (2, 2)); sd.latex(W.T)
    'W^{T}'
    """
    return sp.latex(expr)


def text(expr) -> str:
    """The one-line text form (what ``print`` shows)."""
    return sp.sstr(expr)
