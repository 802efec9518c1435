"""Backpropagation as a textbook writes it: named forward values, δ terms, ∂L/∂W and ∂L/∂b.

Forward nodes are named by role: ``Zk`` is a layer's pre-activation (a matrix
product, plus a bias), ``Ak`` its activation, ``L`` the loss. The backward pass
is read off symdl's own adjoints: ``δk = ∂L/∂Zk``, written in terms of
``δ(k+1)`` and the forward names, so every line is one step of the chain rule.

>>> import symdl as sd
>>> x = sd.input("x", 2); y = sd.input("y", 1)
>>> W = sd.param("W", (2, 1)); b = sd.param("b", 1)
>>> print(sd.explain(sd.losses.mse(x @ W + b, y), [W, b]))
Forward pass
  Z1 = x*W + b
  L = sum((Z1 - y)**2)/n
<BLANKLINE>
Backward pass (δk = ∂L/∂Zk)
  δ1 = 2*(Z1 - y)/n
  ∂L/∂W = x.T*δ1
  ∂L/∂b = sum_rows(δ1)
"""
from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions import MatMul, MatrixSymbol

from .graph import Broadcast, Input, Map, Param, topological
from .autodiff import adjoints
from .simplify import fuse_maps


def _is_linear(node) -> bool:
    """``X*W`` or ``X*W + b``: a layer's pre-activation."""
    if isinstance(node, MatMul):
        return True
    if isinstance(node, Map) and node.lam.expr.is_Add and all(a.is_Symbol for a in node.lam.expr.args):
        return any(isinstance(o, MatMul) for o in node.operands) and all(
            isinstance(o, (MatMul, Broadcast)) for o in node.operands
        )
    return False


def _is_activation_of(node, named) -> bool:
    return (
        isinstance(node, Map)
        and len(node.operands) == 1
        and node.operands[0] in named
        and isinstance(node.lam.expr, sp.Function)
    )


class Explanation:
    """The forward and backward pass of a loss, one named line per intermediate.

    ``str(e)`` is text; ``e.latex`` an ``aligned`` block; in a notebook it renders itself.
    """

    def __init__(self, loss, params):
        params = list(params)
        order = topological([loss])
        self.zs, self.names = [], {}
        layer = 0
        for node in order:
            if isinstance(node, (Input, Param)) or node == loss:
                continue
            if _is_linear(node) and not any(node in p.operands and _is_linear(p) for p in order if isinstance(p, Map)):
                layer += 1
                self.zs.append(node)
                self.names[node] = ("Z", layer)
            elif _is_activation_of(node, self.names) and self.names[node.operands[0]][0] == "Z":
                self.names[node] = ("A", self.names[node.operands[0]][1])
        self.loss, self.params = loss, params
        self.adj = adjoints(loss, params)

    def _symbols(self, latex: bool) -> dict:
        def sym(kind, k, node):
            name = f"{kind}_{{{k}}}" if latex else f"{kind}{k}"
            return MatrixSymbol(name, *node.shape)

        table = {node: sym(kind, k, node) for node, (kind, k) in self.names.items()}
        return table

    def _deltas(self, latex: bool) -> dict:
        return {
            self.adj[z]: MatrixSymbol(
                ("\\delta_{%d}" if latex else "δ%d") % self.names[z][1], *z.shape
            )
            for z in self.zs
            if z in self.adj
        }

    def lines(self, latex: bool = False) -> list:
        """``[(section, left-hand side, right-hand side expression), ...]``."""
        fwd, deltas = self._symbols(latex), self._deltas(latex)
        out = []
        for node in topological([self.loss]):
            if node in self.names:
                own = {k: v for k, v in fwd.items() if k != node}
                out.append(("forward", fwd[node], self._named(node.func(*[a.xreplace(own) for a in node.args]))))
        out.append(("forward", sp.Symbol("L"), self._named(self.loss.xreplace(fwd))))
        names = {**fwd, **deltas}
        for z in reversed(self.zs):
            if z not in self.adj:
                continue
            d = self.adj[z]
            subs = {k: v for k, v in names.items() if k != d}
            out.append(("backward", deltas[d], self._named(d.xreplace(subs))))
            for p in self.params:
                if self._layer_param(p, z):
                    out.append(("backward", ("∂L/∂", p), self._named(self.adj[p].xreplace(names))))
        done = {p for p in self.params if any(self._layer_param(p, z) for z in self.zs)}
        for p in self.params:
            if p not in done and p in self.adj:
                out.append(("backward", ("∂L/∂", p), self._named(self.adj[p].xreplace(names))))
        return out

    def _layer_param(self, p, z) -> bool:
        """Whether ``p`` is the weight or bias read directly by pre-activation ``z``."""
        direct = z.args if isinstance(z, MatMul) else z.operands
        for a in direct:
            if a == p or (isinstance(a, Broadcast) and a.args[0] == p) or (isinstance(a, MatMul) and p in a.args):
                return True
        return False

    @staticmethod
    def _named(expr):
        return fuse_maps([expr])[0]

    def notation(self) -> list:
        """What the symbols of special nodes mean (a node class's ``notation`` text), in first-use order."""
        seen = []
        for node in topological([self.loss, *self.adj.values()]):
            note = getattr(type(node), "notation", None)
            if note and note not in seen:
                seen.append(note)
        return seen

    def __str__(self):
        text = ["Forward pass"]
        section = "forward"
        for sec, lhs, rhs in self.lines():
            if sec != section:
                text += ["", "Backward pass (δk = ∂L/∂Zk)"]
                section = sec
            left = f"∂L/∂{lhs[1].name}" if isinstance(lhs, tuple) else str(lhs)
            text.append(f"  {left} = {sp.sstr(rhs)}")
        notes = self.notation()
        if notes:
            text += ["", "Notation"] + [f"  {note}" for note in notes]
        return "\n".join(text)

    __repr__ = __str__

    @property
    def latex(self) -> str:
        rows = []
        for _, lhs, rhs in self.lines(latex=True):
            left = (
                r"\frac{\partial L}{\partial %s}" % sp.latex(lhs[1]) if isinstance(lhs, tuple) else sp.latex(lhs)
            )
            rows.append(f"{left} &= {sp.latex(rhs)}")
        return "\\begin{aligned}\n" + " \\\\\n".join(rows) + "\n\\end{aligned}"

    def _repr_latex_(self):
        return "$$" + self.latex + "$$"

    def _repr_markdown_(self):
        return "```text\n" + str(self) + "\n```\n\n$$" + self.latex + "$$"


def explain(loss, params) -> Explanation:
    """The backward pass of ``loss`` in textbook notation (text, LaTeX, notebook display)."""
    return Explanation(loss, params)
