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

from .graph import PRINT_RULES, Broadcast, Map, RowLogSumExp, SumAll, SumCols, SumRows, is_atomic

# a "*" between two matrix factors is elementwise; next to a number literal it is a scalar product
# (an indicator ``1[Z > 0]`` is a matrix factor, not the number 1)
_ELEMENTWISE_MUL = re.compile(r"(?<![\d*])\*(?!\*)(?!\d(?!\[))")
_LATEX_NUMBER_ODOT = re.compile(r"(\d) \\odot ")


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
    body = _readable(node.lam.expr)
    ph = [_placeholder(i) for i in range(len(node.operands))]
    body = body.xreplace(dict(zip(node.lam.variables, ph)))
    texts = []
    for p, a in zip(ph, node.operands):
        t = printer._print(a)
        if not is_atomic(a) and _in_product(body, p):
            t = r"\left(" + t + r"\right)" if latex else "(" + t + ")"
        texts.append(t)
    if latex:
        # a product with a scalar symbol (n, a hyper-parameter) is not elementwise: no ⊙ next to it
        scalars = sorted(body.free_symbols - set(ph), key=str)
        tokens = {sym: sp.Symbol(f"QS{_placeholder(i).name}") for i, sym in enumerate(scalars)}
        s = _LATEX_NUMBER_ODOT.sub(r"\1 ", sp.latex(body.xreplace(tokens), mul_symbol=r" \odot "))
        for sym, tok in tokens.items():
            name = sp.latex(sym)
            s = s.replace(f"{tok.name} \\odot ", f"{name} ").replace(f" \\odot {tok.name}", f" {name}")
            s = s.replace(tok.name, name)
    else:
        # scalar symbols (hyper-parameters, n) print as digit-edged tokens first, so a product
        # with them stays '*' (the '⊙' rule skips a '*' next to a digit), then get their names back
        scalars = sorted(body.free_symbols - set(ph), key=str)
        tokens = {sym: sp.Symbol(f"0{i}ZZ{i}0") for i, sym in enumerate(scalars)}
        s = _ELEMENTWISE_MUL.sub("⊙", sp.sstr(body.xreplace(tokens)))
        for sym, tok in tokens.items():
            s = s.replace(tok.name, sym.name)
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
