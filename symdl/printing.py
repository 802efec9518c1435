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
from sympy.matrices.expressions import MatrixSymbol, Transpose
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pretty.stringpict import prettyForm

# a "*" between two matrix factors is elementwise; next to a number literal it is a scalar product
_ELEMENTWISE_MUL = re.compile(r"(?<![\d*])\*(?![\d*])")
_LATEX_NUMBER_ODOT = re.compile(r"(\d) \\odot ")


def _placeholder(i: int) -> sp.Symbol:
    letters = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters = chr(97 + r) + letters
    return sp.Symbol(f"QQ{letters}QQ")


def _is_atomic(e) -> bool:
    from .expr import Broadcast, Map, Reduce, RowLogSumExp

    if isinstance(e, MatrixSymbol) or (isinstance(e, Transpose) and isinstance(e.arg, MatrixSymbol)):
        return True
    if isinstance(e, (Reduce, RowLogSumExp)):
        return True
    if isinstance(e, Broadcast):
        return _is_atomic(e.args[0])
    if isinstance(e, Map):
        body = e.lam.expr
        return isinstance(body, sp.Function) or body.is_Symbol
    return False


def _in_product(body, var) -> bool:
    """Whether ``var`` stands as a factor or a power base somewhere in ``body``."""
    for sub in sp.preorder_traversal(body):
        if isinstance(sub, (sp.Mul, sp.Pow)) and var in sub.args:
            return True
    return False


def map_text(node, printer, latex: bool = False) -> str:
    """Print a ``Map`` by substituting its printed operands into its scalar body."""
    body = node.lam.expr
    ph = [_placeholder(i) for i in range(len(node.operands))]
    body = body.xreplace(dict(zip(node.lam.variables, ph)))
    texts = []
    for p, a in zip(ph, node.operands):
        t = printer._print(a)
        if not _is_atomic(a) and _in_product(body, p):
            t = r"\left(" + t + r"\right)" if latex else "(" + t + ")"
        texts.append(t)
    if latex:
        s = _LATEX_NUMBER_ODOT.sub(r"\1 ", sp.latex(body, mul_symbol=r" \odot "))
    else:
        s = _ELEMENTWISE_MUL.sub("⊙", sp.sstr(body))
    for p, t in zip(ph, texts):
        s = s.replace(p.name, t)
    return s


def node_text(node, printer, latex: bool = False) -> str:
    """Text for symdl's own nodes (SymPy prints the rest)."""
    from .expr import Broadcast, Map, RowLogSumExp, SumAll, SumCols, SumRows

    if isinstance(node, Map):
        return map_text(node, printer, latex)
    inner = printer._print(node.args[0])
    if isinstance(node, Broadcast):
        return inner
    if latex:
        wrap = inner if _is_atomic(node.args[0]) else r"\left(" + inner + r"\right)"
        return {
            SumRows: r"\mathbf{1}^{\top} " + wrap,
            SumCols: wrap + r" \mathbf{1}",
            SumAll: r"\mathbf{1}^{\top} " + wrap + r" \mathbf{1}",
            RowLogSumExp: r"\operatorname{logsumexp}\left(" + inner + r"\right)",
        }[type(node)]
    label = {SumRows: "sum_rows", SumCols: "sum_cols", SumAll: "sum", RowLogSumExp: "logsumexp"}[type(node)]
    return f"{label}({inner})"


class Printable:
    """Mixin giving a node SymPy's three print hooks."""

    @property
    def precedence(self):
        # SymPy's MatMul printer reads this to decide on parentheses: a compound
        # elementwise formula binds like a sum, so ``X.T*(δ⊙A)`` keeps its parentheses.
        return PRECEDENCE["Atom"] if _is_atomic(self) else PRECEDENCE["Add"]

    def _sympystr(self, printer):
        return node_text(self, printer)

    def _latex(self, printer):
        return node_text(self, printer, latex=True)

    def _pretty(self, printer):
        return prettyForm(node_text(self, sp.printing.str.StrPrinter()))


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
