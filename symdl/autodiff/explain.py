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

import unicodedata

import sympy as sp
from sympy.matrices.expressions import MatMul, MatrixSymbol

from ..graph.nodes import (
    Broadcast, Input, Map, Param, RowLogSumExp, SumAll, SumCols, SumRows, children, elementwise, topological,
)
from .vjp import VJP, Derivation
from ..formulas.activations import NamedDerivative
from ..formulas.normalization import ROLES, SOURCES
from ..graph.printing import body_latex, body_text
from ..graph.simplify import fuse_maps
from ..registry import rich_display
from .jvp import check_directions, tangents

#: How a normalisation's named intermediates read in LaTeX (text uses ``ROLES``' own names).
_LATEX_ROLES = {"μ": r"\mu", "σ": r"\sigma", "x̂": r"\hat{x}"}

#: What the textbook form of a normalisation's δ means (``notation``), by the axis of its means.
_MEAN_NOTES = {
    "cols": "mean_cols(X): each row's mean over its columns (layer norm's features); the δ of a layer norm's "
            "input is (δx̂ − mean_cols(δx̂) − x̂ ⊙ mean_cols(δx̂ ⊙ x̂))/σ, with δx̂ = ∂L/∂x̂ = γ ⊙ δy (g in the textbook)",
    "rows": "mean_rows(X): each column's mean over the rows (batch norm's batch); the δ of a batch norm's "
            "input is (δx̂ − mean_rows(δx̂) − x̂ ⊙ mean_rows(δx̂ ⊙ x̂))/σ, with δx̂ = ∂L/∂x̂ = γ ⊙ δy (g in the textbook)",
}


#: What attention's named values mean.
_ATTENTION_NOTE = ("Sk, Pk, Ok: head k's scores, their row softmax and its mix P·V (within each sequence); "
                   "rowsum(X): each row's sum over its columns, so δS = P ⊙ (δP − rowsum(P ⊙ δP)) is the "
                   "softmax's adjoint without its Jacobian")


def _is_linear(node) -> bool:
    """``X*W`` or ``X*W + b``: a layer's pre-activation."""
    if isinstance(node, MatMul):
        return True
    if isinstance(node, Map) and node.lam.expr.is_Add and all(a.is_Symbol for a in node.lam.expr.args):
        return any(isinstance(o, MatMul) for o in node.operands) and all(
            isinstance(o, (MatMul, Broadcast)) for o in node.operands
        )
    return False


def _attention_softmax(node):
    """``S`` when ``node`` is ``P = softmax(S)`` (row by row, ``exp(S − logsumexp(S))``), else None."""
    if not (isinstance(node, Map) and len(node.operands) == 2 and isinstance(node.operands[1], Broadcast)):
        return None
    S, lse = node.operands[0], node.operands[1].args[0]
    v = node.lam.variables
    if isinstance(lse, RowLogSumExp) and lse.args[0] == S and node.lam.expr == sp.exp(v[0] - v[1]):
        return S
    return None


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
    ``derivation`` (``vjp.Derivation`` of the same loss and params) is one already done: its
    adjoints are read, not derived again.
    """

    def _repr_mimebundle_(self, include=None, exclude=None):  # a notebook's display (symdl.show)
        return rich_display(self, include, exclude)

    def __init__(self, loss, params, derivation: Derivation | None = None):
        params = list(params)
        if derivation is None:
            derivation = Derivation(loss, params)
        elif derivation.loss is not loss or derivation.params != params:
            raise ValueError("explain: the derivation given is of another loss or other parameters")
        self.order = order = derivation.order
        self.zs, self.names = [], {}
        layer = norms = heads = 0
        counts = {}
        self.attention = {}  # {S: P}: attention's scores and their softmax, δS printed in textbook form
        inside_linear = {o for p in order if isinstance(p, Map) and _is_linear(p) for o in p.operands}
        for node in order:
            if isinstance(node, (Input, Param)) or node == loss:
                continue
            if _is_linear(node) and node not in inside_linear:
                layer += 1
                self.zs.append(node)
                self.names[node] = ("Z", layer)
            elif _is_activation_of(node, self.names) and self.names[node.operands[0]][0] == "Z":
                self.names[node] = ("A", self.names[node.operands[0]][1])
            elif node in ROLES:  # a normalisation's μ, σ, x̂, numbered by normalisation
                norms += ROLES[node] == "μ"
                self.names[node] = (ROLES[node], max(norms, 1))
            elif getattr(type(node), "explain_role", None):  # a node family's named value (a scan's states: H)
                role = type(node).explain_role
                counts[role] = counts.get(role, 0) + 1
                self.names[node] = (role, counts[role])
            elif getattr(type(node), "is_sequence_product", False) and _attention_softmax(node.args[0]) is not None:
                # attention's mix O = P V within each sequence: name S, P and O (numbered by head)
                P = node.args[0]
                S = _attention_softmax(P)
                heads += 1
                for role, value in (("S", S), ("P", P), ("O", node)):
                    if value not in self.names and not isinstance(value, (Input, Param)):
                        self.names[value] = (role, heads)
                self.attention[S] = P
        self.loss, self.params = loss, params
        self.adj = derivation.adjoints
        self.textbook = self._textbook_norms(order)
        # δ lines: each pre-activation, each normalised x̂ (δx̂k = ∂L/∂x̂k) and each normalisation's
        # input (its δ in textbook form), in graph order
        roles = {"x̂", "S", "P", "O", *counts}
        self.deltas = [nd for nd in order if nd in self.zs or self.names.get(nd, ("",))[0] in roles
                       or nd in self.textbook]

    def _textbook_norms(self, order) -> dict:
        """``{normalisation input z: [its x̂, ...]}`` for every normalisation (layer or batch norm) on the
        way to the loss: ``∂L/∂z`` prints as the normalisation's term in textbook form,
        ``(δx̂ − mean(δx̂) − x̂ ⊙ mean(δx̂ ⊙ x̂))/σ``, plus one term per other node that reads ``z`` (a skip
        connection around a pre-norm block); ``other_uses[z]`` lists those nodes. An input with no name
        of its own is named ``hk`` (k: the normalisation's number)."""
        readers = {}
        for node in order:
            for child in dict.fromkeys(children(node)):
                readers.setdefault(child, []).append(node)
        out = {}
        for node in order:
            source = SOURCES.get(node)
            named = self.names.get(node)
            if source is None or named is None or named[0] != "x̂" or source.sigma not in self.names:
                continue
            z = source.z
            if not isinstance(z, MatrixSymbol) and z in self.adj and node in self.adj:
                out.setdefault(z, []).append(node)
        self.other_uses = {}
        for z, xhats in out.items():
            inside = {r for x in xhats for r in SOURCES[x].readers}
            self.other_uses[z] = [u for u in readers.get(z, []) if u not in inside and u in self.adj]
            if z not in self.names:
                self.names[z] = ("h", self.names[xhats[0]][1])
        return out

    def _textbook(self, z, fwd: dict, deltas: dict, latex: bool):
        """``∂L/∂z`` of a normalisation's input ``z`` as a textbook writes it: per normalisation, over
        its named ``δx̂k`` (``g = γ ⊙ δy``), ``x̂k`` and ``σk``, ``(δx̂ − mean(δx̂) − x̂ ⊙ mean(δx̂ ⊙ x̂))/σ``
        (the means over the statistics' axis: ``mean_cols``, each row's features, layer norm;
        ``mean_rows``, the batch, batch norm); then the chain rule's term of each other use of ``z``."""
        terms = []
        for xhat in self.textbook[z]:
            source = SOURCES[xhat]
            g, x, sigma = deltas[self.adj[xhat]], fwd[xhat], fwd[source.sigma]
            rows, cols = z.shape
            shape = (rows, 1) if source.axis == "cols" else (1, cols)

            def mean(e, axis=source.axis, shape=shape):
                name = (r"\operatorname{mean}_{\mathrm{%s}}\left(%s\right)" % (axis, sp.latex(e)) if latex
                        else f"mean_{axis}({sp.sstr(e)})")
                return MatrixSymbol(name, *shape)

            terms.append(elementwise(lambda dx, m, xh, mdx, s: (dx - m - xh * mdx) / s,
                                     g, mean(g), x, mean(elementwise(lambda a, b: a * b, g, x)), sigma))
        names = {**fwd, **deltas}
        for u in self.other_uses[z]:
            terms += [self._named(t.xreplace(names)) for child, t in VJP.lookup(u)(u, self.adj[u]) if child == z]
        return terms[0] if len(terms) == 1 else sp.MatAdd(*terms, evaluate=False)

    def _softmax_textbook(self, S, fwd: dict, deltas: dict, latex: bool):
        """``δS = P ⊙ (δP − rowsum(P ⊙ δP))``: the adjoint of a row softmax's input with the row sum
        (FlashAttention's form), not a Jacobian; ``rowsum`` is each row's sum over its columns."""
        P = self.attention[S]
        p, dp = fwd[P], deltas[self.adj[P]]
        inner = elementwise(lambda a, b: a * b, p, dp)
        name = (r"\operatorname{rowsum}\left(%s\right)" % sp.latex(inner) if latex else f"rowsum({sp.sstr(inner)})")
        rowsum = MatrixSymbol(name, S.shape[0], 1)
        return elementwise(lambda a, b, r: a * (b - r), p, dp, rowsum)

    def _symbols(self, latex: bool) -> dict:
        def sym(kind, k, node):
            name = f"{_LATEX_ROLES.get(kind, kind)}_{{{k}}}" if latex else f"{kind}{k}"
            return MatrixSymbol(name, *node.shape)

        table = {node: sym(kind, k, node) for node, (kind, k) in self.names.items()}
        return table

    def _deltas(self, latex: bool) -> dict:
        def name(z):
            kind, k = self.names[z]
            if kind == "Z":
                return ("\\delta_{%d}" if latex else "δ%d") % k
            return r"\delta^{%s}_{%d}" % (_LATEX_ROLES.get(kind, kind), k) if latex else f"δ{kind}{k}"

        return {self.adj[z]: MatrixSymbol(name(z), *z.shape) for z in self.deltas if z in self.adj}

    def lines(self, latex: bool = False) -> list:
        """``[(section, left-hand side, right-hand side expression), ...]``."""
        fwd, deltas = self._symbols(latex), self._deltas(latex)
        out = []
        for node in self.order:
            if node in self.names:
                own = _without(fwd, node)
                out.append(("forward", fwd[node], self._named(node.func(*[a.xreplace(own) for a in node.args]))))
        out.append(("forward", sp.Symbol("L"), self._named(self.loss.xreplace(fwd))))
        names = {**fwd, **deltas}
        printed = set()
        for z in reversed(self.deltas):
            if z not in self.adj:
                continue
            d = self.adj[z]
            if d in printed:  # one δ for two names (a residual branch's output and the sum it feeds): once
                pass
            elif z in self.textbook:
                out.append(("backward", deltas[d], self._textbook(z, fwd, deltas, latex)))
            elif z in self.attention and self.attention[z] in fwd and self.adj.get(self.attention[z]) in deltas:
                out.append(("backward", deltas[d], self._softmax_textbook(z, fwd, deltas, latex)))
            else:
                out.append(("backward", deltas[d], self._named(d.xreplace(_without(names, d)))))
            printed.add(d)
            for p in self.params:
                if z in self.zs and self._layer_param(p, z):
                    out.append(("backward", ("∂L/∂", p), self._named(self.adj[p].xreplace(names))))
        done = {p for p in self.params if any(self._layer_param(p, z) for z in self.zs)}
        for p in self.params:
            if p not in done and p in self.adj:
                out.append(("backward", ("∂L/∂", p), self._named(self.adj[p].xreplace(names))))
        out += self._fan_out(fwd, names, latex)
        return out + _where(out)

    def fan_outs(self) -> list:
        """``[(node, [(consumer, its term of the node's adjoint), ...])]`` for every named value (or
        parameter) that two or more nodes on the way to a named value read (a skip connection, a
        branch, a shared layer's weights): its adjoint is the sum of one term per use. Reductions
        (a normalisation's statistics) and the loss's own formula read a value without making a
        branch, so they do not count, but their terms do."""
        users = {}
        for node in self.order:
            if node in self.adj:
                for child in dict.fromkeys(children(node)):
                    users.setdefault(child, []).append(node)
        feeds_named = set()  # nodes with a named value downstream: a use inside the loss formula is no branch
        for node in reversed(self.order):
            if any(u in self.names or u in feeds_named for u in users.get(node, [])):
                feeds_named.add(node)
        out = []
        for node in self.order:
            if (node not in self.names and node not in self.params) or node in self.attention:
                continue  # a softmax's scores: its logsumexp and exp are one row softmax, δS printed whole
            uses = [u for u in users.get(node, []) if u in self.adj]
            branches = [u for u in uses if not isinstance(u, (SumRows, SumCols, SumAll))
                        and (u in self.names or u in feeds_named)]
            if len(branches) < 2:
                continue
            terms = []
            for u in uses:
                parts = [c for child, c in VJP.lookup(u)(u, self.adj[u]) if child == node]
                if parts:
                    terms.append((u, parts[0] if len(parts) == 1 else sp.MatAdd(*parts)))
            if len(terms) >= 2:
                out.append((node, terms))
        return out

    def _fan_out(self, fwd, names, latex: bool = False) -> list:
        """The ``fanout`` lines: each fan-out's uses, then its adjoint as one term per use."""
        out = []
        for node, terms in self.fan_outs():
            label = fwd.get(node, node)
            if node in self.textbook:  # a normalisation reads it: its x̂, and its δ in textbook form
                others = [(u, t) for u, t in terms if u in self.other_uses[node]]
                uses = tuple(fwd[x] for x in self.textbook[node]) + tuple(
                    self._named(u.xreplace(_without(fwd, u))) for u, _ in others)
                out.append(("fanout", ("uses of ", label), uses))
                out.append(("fanout", ("∂L/∂", label), self._textbook(node, fwd, names, latex)))
                continue
            uses = tuple(self._named(u.xreplace(_without(fwd, u))) for u, _ in terms)
            out.append(("fanout", ("uses of ", label), uses))
            parts = [self._named(t.xreplace(names)) for _, t in terms]
            out.append(("fanout", ("∂L/∂", label), sp.MatAdd(*parts, evaluate=False)))
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

    #: Section headings of the text form, in order.
    HEADINGS = {"forward": "Forward pass", "backward": "Backward pass (δk = ∂L/∂Zk)",
                "fanout": "Fan-out (a value read by several nodes: its δ is the sum of one term per branch)",
                "where": "where"}

    def notation(self) -> list:
        """What the symbols of special nodes mean (a node class's ``notation`` text), in first-use order,
        and the means of a normalisation's δ in textbook form."""
        axes = dict.fromkeys(SOURCES[x].axis for xs in self.textbook.values() for x in xs)
        notes = _notation([self.loss, *self.adj.values()]) + [_MEAN_NOTES[a] for a in axes]
        if self.attention:
            notes.append(_ATTENTION_NOTE)
        return notes

    def __str__(self):
        text, section = [], None
        for sec, lhs, rhs in self.lines():
            if sec != section:
                text += ([""] if text else []) + [self.HEADINGS[sec]]
                section = sec
            if isinstance(rhs, tuple):  # a fan-out's uses
                text.append(f"  {_left_text(lhs)}: " + "; ".join(map(_text, rhs)))
            else:
                text.append(f"  {_left_text(lhs)} = {_text(rhs)}")
        notes = self.notation()
        if notes:
            text += ["", "Notation"] + [f"  {note}" for note in notes]
        return "\n".join(text)

    __repr__ = __str__

    @property
    def latex(self) -> str:
        rows = [f"{_left_latex(lhs)} &: " + r",\; ".join(map(_latex, rhs)) if isinstance(rhs, tuple) else
                f"{_left_latex(lhs)} &= {_latex(rhs)}" for _, lhs, rhs in self.lines(latex=True)]
        return "\\begin{aligned}\n" + " \\\\\n".join(rows) + "\n\\end{aligned}"

    def _repr_latex_(self):
        return "$$" + self.latex + "$$"

    def _repr_markdown_(self):
        return "```text\n" + str(self) + "\n```\n\n$$" + self.latex + "$$"

    def notes(self) -> dict:
        """``{graph node: "δ2 = ..."}``: the line that names each node, for comments in generated
        code. Keys are the nodes as ``sd.grad`` returns them (elementwise work fused) and as
        they are before fusing, so a lowered program's buffers find their names."""
        fwd, deltas = self._symbols(False), self._deltas(False)
        lines = {}
        for sec, lhs, rhs in self.lines():
            if sec not in ("where", "fanout"):
                lines[_left_text(lhs)] = f"{_left_text(lhs)} = {_text(rhs)}"
        out = {}
        for node, sym in list(fwd.items()) + list(deltas.items()):
            if str(sym.name) in lines:
                out[node] = lines[str(sym.name)]
        out[self.loss] = lines["L"]
        for p in self.params:
            if p in self.adj and f"∂L/∂{p.name}" in lines:
                out[self.adj[p]] = lines[f"∂L/∂{p.name}"]
        fused = fuse_maps(list(out), protect=set(self.order))
        return {**dict(zip(fused, out.values())), **out}


def _notation(roots) -> list:
    """The ``notation`` texts of the node classes under ``roots``, each once, in first-use order."""
    seen = []
    for node in topological(roots):
        note = getattr(type(node), "notation", None)
        if note and note not in seen:
            seen.append(note)
    return seen


def _without(table: dict, key) -> dict:
    """``table`` less ``key`` (a hash lookup: comparing SymPy trees one by one is slow)."""
    out = dict(table)
    out.pop(key, None)
    return out


def _left_text(lhs) -> str:
    if isinstance(lhs, tuple):
        return f"{lhs[0]}{_name(lhs[1])}"
    return _text(lhs)


def _name(e) -> str:
    return str(e.name) if isinstance(e, MatrixSymbol) else _text(e)


def _left_latex(lhs) -> str:
    if isinstance(lhs, tuple):
        if lhs[0] == "∂L/∂":
            return r"\frac{\partial L}{\partial %s}" % sp.latex(lhs[1])
        if lhs[0] == "uses of ":
            return r"\text{uses of } %s" % sp.latex(lhs[1])
        return r"(H v)_{%s}" % sp.latex(lhs[1])
    return _latex(lhs)


def _scalar(e) -> bool:
    return isinstance(e, sp.Expr) and not isinstance(e, sp.MatrixExpr) and not e.is_Symbol


def _text(e) -> str:
    return body_text(e) if _scalar(e) else sp.sstr(e)


def _latex(e) -> str:
    return body_latex(e) if _scalar(e) else sp.latex(e)


_Z = sp.Symbol("z", real=True)


def _where(lines) -> list:
    """``("where", f′(z), formula)`` for every named derivative (``mish′``) the lines use, once."""
    found, queue = [], []
    for _, _, rhs in lines:
        for node in topological([rhs]) if isinstance(rhs, sp.MatrixExpr) else ():
            if isinstance(node, Map):
                queue += [type(f) for f in node.lam.expr.atoms(NamedDerivative)]
    while queue:  # a definition may use another named derivative (mish′′ uses mish′)
        cls = queue.pop(0)
        if cls in found:
            continue
        found.append(cls)
        queue += [type(f) for f in cls.formula_body.atoms(NamedDerivative)]
    out = []
    for cls in found:
        lhs, rhs = cls.definition()
        out.append(("where", lhs.xreplace({lhs.args[0]: _Z}), rhs.xreplace({lhs.args[0]: _Z})))
    return out


def explain(loss, params, derivation: Derivation | None = None) -> Explanation:
    """The backward pass of ``loss`` in textbook notation (text, LaTeX, notebook display).

    ``derivation``: the ``vjp.Derivation`` of ``loss`` and ``params`` already done, if any (the
    pipeline passes the one its gradients came from: nothing is differentiated twice).
    """
    return Explanation(loss, params, derivation)


def _dotted(name: str) -> str:
    """``Ż1``, ``Ȧ1``, ``δ̇2``: a dot over the letter (precomposed where Unicode has one)."""
    return unicodedata.normalize("NFC", name[0] + "\u0307" + name[1:])


def _dot_symbol(kind: str, k: int, shape, latex: bool) -> MatrixSymbol:
    """The symbol of a directional derivative: ``Ż1`` / ``\\dot{Z}_{1}``, ``δ̇2`` / ``\\dot{\\delta}_{2}``."""
    if latex:
        return MatrixSymbol(r"\dot{%s}_{%d}" % ("\\delta" if kind == "δ" else kind, k), *shape)
    return MatrixSymbol(_dotted(f"{kind}{k}"), *shape)


class HvpExplanation(Explanation):
    """A Hessian-vector product as a textbook derives it: forward over reverse.

    Every named quantity of ``explain`` gets its directional derivative along the directions
    ``v`` (one per parameter), ``Ẋ = d/dε X(θ + εv)`` at ``ε = 0``: the forward pass's ``Żk``,
    ``Ȧk``, then the backward pass's ``δ̇k``; ``(Hv)_W`` is the directional derivative of
    ``∂L/∂W`` (Pearlmutter's R-operator). ``hvp`` holds those expressions with nothing named:
    equal to ``sd.hvp``'s (reverse over reverse) at every point.
    """

    def __init__(self, loss, params, vectors):
        super().__init__(loss, params)
        self.vectors = check_directions(self.params, vectors, "explain_hvp")
        along = ", ".join(str(v) for v in self.vectors)
        self.HEADINGS = {**self.HEADINGS,
                         "tangent": f"Directional derivatives along v = ({along}) (Ẋ = dX(θ + εv)/dε at ε = 0)",
                         "hvp": "Hessian-vector product ((Hv)_θ = (∂L/∂θ)˙, δ̇k = (∂L/∂Zk)˙)"}
        roots = [self.adj[p] for p in self.params if p in self.adj]
        self.tangent = tangents(roots, dict(zip(self.params, self.vectors)))
        zero = {p: sp.ZeroMatrix(*p.shape) for p in self.params}
        self.hvp = {p: self.tangent.get(self.adj[p], zero[p]) if p in self.adj else zero[p] for p in self.params}

    def notation(self) -> list:
        return _notation([self.loss, *self.adj.values(), *self.hvp.values()])

    def _dots(self, latex: bool) -> dict:
        """``{Ẋ expression: its symbol}`` for every named forward node and δ with a tangent."""
        out = {}
        for node, (kind, k) in self.names.items():
            if node in self.tangent:
                out[self.tangent[node]] = _dot_symbol(kind, k, node.shape, latex)
        for z in self.zs:
            if z in self.adj and self.adj[z] in self.tangent:
                out[self.tangent[self.adj[z]]] = _dot_symbol("δ", self.names[z][1], z.shape, latex)
        return out

    def lines(self, latex: bool = False) -> list:
        base = [line for line in super().lines(latex) if line[0] != "where"]
        names = {**self._symbols(latex), **self._deltas(latex)}
        dots = self._dots(latex)
        table = {**names, **dots}

        def named(expr, own=None):
            return self._named(expr.xreplace(_without(table, own)))

        out = []
        for node in self.order:  # the forward pass's directional derivatives
            if node in self.names and node in self.tangent:
                t = self.tangent[node]
                out.append(("tangent", dots[t], named(t, t)))
        for z in reversed(self.zs):  # the backward pass's, each layer's (Hv) after its δ̇
            d = self.adj.get(z)
            if d in self.tangent:
                t = self.tangent[d]
                out.append(("hvp", dots[t], named(t, t)))
            elif d is not None:  # constant along v (mae's sign, a piecewise-linear loss)
                out.append(("hvp", _dot_symbol("δ", self.names[z][1], z.shape, latex), sp.ZeroMatrix(*z.shape)))
            for p in self.params:
                if self._layer_param(p, z):
                    out.append(("hvp", ("(Hv)_", p), named(self.hvp[p])))
        done = {p for p in self.params if any(self._layer_param(p, z) for z in self.zs)}
        out += [("hvp", ("(Hv)_", p), named(self.hvp[p])) for p in self.params if p not in done]
        lines = base + out
        return lines + _where(lines)


def explain_hvp(loss, params, vectors) -> HvpExplanation:
    """The Hessian-vector product ``H·v`` of ``loss`` in textbook notation, as ``explain`` prints
    the gradient: the forward and backward passes, then the directional derivative along ``v``
    of every named quantity (``Żk``, ``Ȧk``, ``δ̇k``) and ``(Hv)`` for every parameter.

    ``vectors`` holds one direction per parameter, shaped like it (as for ``sd.hvp``).

    >>> import symdl as sd
    >>> x = sd.input("x", 2); y = sd.input("y", 1)
    >>> W = sd.param("W", (2, 1)); V = sd.param("V", (2, 1))
    >>> print(sd.explain_hvp(sd.losses.mse(x @ W, y), [W], [V]))
    Forward pass
      Z1 = x*W
      L = sum((Z1 - y)**2)/n
    <BLANKLINE>
    Backward pass (δk = ∂L/∂Zk)
      δ1 = 2*(Z1 - y)/n
      ∂L/∂W = x.T*δ1
    <BLANKLINE>
    Directional derivatives along v = (V) (Ẋ = dX(θ + εv)/dε at ε = 0)
      Ż1 = x*V
    <BLANKLINE>
    Hessian-vector product ((Hv)_θ = (∂L/∂θ)˙, δ̇k = (∂L/∂Zk)˙)
      δ̇1 = 2*Ż1/n
      (Hv)_W = x.T*δ̇1
    """
    return HvpExplanation(loss, params, vectors)
