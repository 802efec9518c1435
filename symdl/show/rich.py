"""Rich notebook displays: mimebundles ``{text/plain, text/latex, text/html}`` for what symdl returns.

* ``explanation_bundle(e, source=...)``: ``sd.explain`` / ``sd.explain_hvp`` (and
  ``model.formulas()``): the whole derivation, then per parameter the forward equation, the
  δ recurrence, the gradient in matrix form with the shape of each factor
  (``(3 × n)(n × 1) → 3 × 1``) and, given the generated ``source``, the kernel it compiled to;
* ``proof_bundle``, ``gradcheck_bundle``, ``summary_bundle`` (a model), ``history_bundle``.

The HTML needs nothing from the network: formulas are presentation MathML, which browsers
render natively, pictures are inline SVG or PNG ``data:`` URIs, and there is no script. Each
line's SymPy expression rides along in ``data-sympy`` (``sympy_source``), and each parameter's
whole gradient (what symdl compiles, nothing named), so a test can evaluate what the page shows.

>>> import symdl as sd
>>> x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1))
>>> b = explanation_bundle(sd.explain(sd.losses.mse(x @ W, y), [W]))
>>> sorted(b), "<math" in b["text/html"], "(2 × n)(n × 1) → 2 × 1" in b["text/html"]
(['text/html', 'text/latex', 'text/plain'], True, True)
"""
from __future__ import annotations

import base64
import html
import re

import sympy as sp
from sympy.matrices.expressions import MatMul, MatrixExpr

from ..graph.nodes import Input, Param, State, VectorParam, children, topological
from ..ops.conv import image_shape
from .mathml import equation

STYLE = """<style>
.symdl{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;font-size:14px;line-height:1.4;max-width:100%}
.symdl h3{font-size:15px;margin:6px 0}.symdl h4{font-size:14px;margin:10px 0 4px}
.symdl table{border-collapse:collapse;margin:4px 0}
.symdl td,.symdl th{padding:3px 8px;text-align:left;vertical-align:middle;border-bottom:1px solid #e3e3e3}
.symdl th{font-weight:600;color:#444;white-space:nowrap}
.symdl .shapes{font-family:monospace;color:#555}
.symdl .param{border-left:3px solid #3d8b3d;padding-left:8px;margin:8px 0}
.symdl pre{background:#f7f7f7;padding:6px;overflow:auto;max-height:24em;font-size:12px}
.symdl .ok{color:#1d7a1d;font-weight:600}.symdl .bad{color:#b02a2a;font-weight:600}
.symdl math{font-size:1.1em}
</style>"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _dims(shape) -> str:
    return " × ".join(sp.sstr(d) for d in shape)


def _tuple(shape) -> str:
    """``(3,)``, ``(2, 3)``: a shape as Python writes it."""
    return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


def _name(lhs) -> str:
    """The text name of an explanation line's left side: ``Z1``, ``δ2``, ``L``, ``∂L/∂W``, ``(Hv)_W``,
    ``uses of A1``."""
    if isinstance(lhs, tuple):
        return f"{lhs[0]}{_name(lhs[1])}"
    name = getattr(lhs, "name", None)
    return str(name) if name is not None else sp.sstr(lhs)


def factor_shapes(expr) -> str:
    """The shapes of a gradient's matrix factors and of the result: ``(2 × n)(n × 3) → 2 × 3``
    for a product, ``(n × 3) → 1 × 3`` for a reduction or any other node (its operands first)."""
    if not isinstance(expr, MatrixExpr):
        return ""
    if isinstance(expr, MatMul):
        parts = [a for a in expr.args if isinstance(a, MatrixExpr)]
    else:
        parts = list(children(expr))
    inputs = "".join(f"({_dims(a.shape)})" for a in parts)
    return f"{inputs} → {_dims(expr.shape)}" if inputs else _dims(expr.shape)


def kernel_source(source: str | None, label: str) -> str | None:
    """The part of a generated step module that computes the line named ``label`` (``"∂L/∂W1"``).

    The numpy backend writes a comment before each buffer's code; the cpu backend lists each
    buffer with the kernel ``k<i>`` that computes it and then every kernel's module (``# ---- k<i>``).
    """
    if not source:
        return None
    lines = source.splitlines()
    found = []
    for i, line in enumerate(lines):
        if f"{label} = " not in line or not line.lstrip().startswith("#"):
            continue
        kernel = re.search(r"-> (k\d+)\(", line)
        if kernel:
            head = f"# ---- {kernel.group(1)}:"
            start = next((j for j, s in enumerate(lines) if s.startswith(head)), None)
            if start is None:
                found.append(line.strip())
                continue
            end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("# ---- k")), len(lines))
            found.append("\n".join([line.strip(), ""] + lines[start:end]).rstrip())
        else:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("# ")), len(lines))
            found.append("\n".join(s[4:] if s.startswith("    ") else s for s in lines[i:end]).rstrip())
    return "\n\n".join(found) or None


def _eq(lhs, rhs) -> str:
    return equation(lhs, rhs, display="block")  # a tuple ``rhs`` (a fan-out's uses) reads "lhs: a; b"


def sympy_source(expr) -> str:
    """``sympy.srepr`` of ``expr`` with each input and parameter written as a plain
    ``MatrixSymbol`` of its name and shape, so the text evaluates back (with SymPy's and
    ``symdl.graph.nodes``' names) to the same graph over those symbols."""
    if isinstance(expr, tuple):  # a fan-out's uses
        return "(" + "".join(sympy_source(e) + ", " for e in expr) + ")"
    if not isinstance(expr, sp.Basic):
        return repr(expr)
    if isinstance(expr, MatrixExpr):
        plain = {leaf: sp.MatrixSymbol(str(leaf.name), *leaf.shape) for leaf in topological([expr])
                 if isinstance(leaf, (Input, Param, State))}
        expr = expr.xreplace(plain)
    return sp.srepr(expr)


def _groups(lines, params):
    """Per parameter: ``{param line index: (delta line index or None)}``, read off the line order
    (``Explanation.lines`` puts each layer's ∂L/∂W and ∂L/∂b right after its δ). Only the
    backward pass's (and a Hessian-vector product's) lines count: a fan-out's ``∂L/∂A1`` is no
    parameter's."""
    delta, owner, params = None, {}, set(params)
    for i, (section, lhs, _) in enumerate(lines):
        if section not in ("backward", "hvp"):
            continue
        if not isinstance(lhs, tuple):
            delta = i
        elif lhs[1] in params:
            owner[i] = delta
    return owner


def _forward_for(lines, delta_name: str) -> list:
    """The forward lines a δ belongs to: ``δ2`` -> ``Z2`` and ``A2``; ``δx̂1`` -> ``x̂1``."""
    rest = delta_name.lstrip("δ").lstrip("\u0307")
    wanted = {f"Z{rest}", f"A{rest}"} if rest[:1].isdigit() else {rest}
    return [(lhs, rhs) for section, lhs, rhs in lines if section == "forward" and _name(lhs) in wanted]


def explanation_html(e, source: str | None = None) -> str:
    """The derivation as an offline HTML page fragment (see the module's docstring)."""
    lines = e.lines()
    out = [STYLE, '<div class="symdl symdl-derivation">']
    headings = getattr(e, "HEADINGS", {})
    section = None
    out.append("<h3>Derivation</h3>")
    for sec, lhs, rhs in lines:
        if sec != section:
            if section is not None:
                out.append("</table>")
            out.append(f'<h4>{_e(headings.get(sec, sec))}</h4><table class="pass {sec}">')
            section = sec
        attrs = f'data-line="{_e(_name(lhs))}" data-sympy="{_e(sympy_source(rhs))}"'
        out.append(f"<tr {attrs}><td>{_eq(lhs, rhs)}</td></tr>")
    if section is not None:
        out.append("</table>")
    notes = e.notation() if hasattr(e, "notation") else []
    if notes:
        out.append("<h4>Notation</h4><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    out.append("<h3>Per parameter</h3>")
    owner = _groups(lines, e.params)
    for i, delta in owner.items():
        _, lhs, rhs = lines[i]
        p = lhs[1]
        label = _name(lhs)
        full = e.adj.get(p) if lhs[0] == "∂L/∂" else getattr(e, "hvp", {}).get(p)
        shape = p.value_shape if isinstance(p, VectorParam) else tuple(p.shape)
        rows = []
        if delta is not None:
            _, dl, dr = lines[delta]
            for fl, fr in _forward_for(lines, _name(dl)):
                rows.append(("forward", _eq(fl, fr)))
            rows.append(("δ recurrence" if lhs[0] == "∂L/∂" else "δ̇ (directional)", _eq(dl, dr)))
        rows.append(("gradient" if lhs[0] == "∂L/∂" else "Hessian-vector product", _eq(lhs, rhs)))
        shapes = factor_shapes(rhs)
        if isinstance(p, VectorParam):
            shapes += f" (the vector {p.name}: {_tuple(shape)})"
        rows.append(("shapes", f'<span class="shapes">{_e(shapes)}</span>'))
        sympy_attr = f' data-sympy="{_e(sympy_source(full))}"' if full is not None else ""
        out.append(f'<section class="param" data-param="{_e(p.name)}" data-line="{_e(label)}"{sympy_attr}>')
        out.append(f"<h4>{_e(label)}</h4><table>")
        out += [f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows]
        out.append("</table>")
        kernel = kernel_source(source, label)
        if kernel:
            out.append(f"<details><summary>kernel ({_e(label)})</summary>"
                       f"<pre><code>{_e(kernel)}</code></pre></details>")
        out.append("</section>")
    out.append("</div>")
    return "\n".join(out)


def _select(bundle, include=None, exclude=None) -> dict:
    if include is not None:
        bundle = {k: v for k, v in bundle.items() if k in include}
    if exclude is not None:
        bundle = {k: v for k, v in bundle.items() if k not in exclude}
    return bundle


def explanation_bundle(e, include=None, exclude=None, *, source: str | None = None) -> dict:
    """The mimebundle of an ``Explanation`` or ``HvpExplanation``; ``source``: the generated
    step module (``train_step.source``) to show each gradient's kernel."""
    return _select({"text/plain": str(e), "text/latex": "$$" + e.latex + "$$",
                    "text/html": explanation_html(e, source)}, include, exclude)


def formulas_bundle(model, include=None, exclude=None) -> dict:
    """``model.formulas()`` as a rich display: its explanation with the kernels of its compiled step."""
    from ..autodiff.explain import explain

    model.require_compiled()
    return explanation_bundle(explain(model.loss, model.params), include, exclude, source=model.train_step.source)


# ---------------------------------------------------------------- tables


def _latex_text(s) -> str:
    return re.sub(r"([#$%&_{}])", r"\\\1", str(s)).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")


def _latex_table(header, rows) -> str:
    cols = "l" * len(header)
    body = [" & ".join(r"\text{%s}" % _latex_text(h) for h in header)]
    body += [" & ".join(r"\text{%s}" % _latex_text(c) for c in row) for row in rows]
    return "$$\\begin{array}{%s}\n" % cols + " \\\\\n".join(body) + "\n\\end{array}$$"


def _html_table(header, rows, cls="") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def proof_bundle(proof, include=None, exclude=None) -> dict:
    """An ``sd.prove`` result: verdict, method, shapes, and the differences found."""
    ok = bool(proof)
    shapes = [(str(p.name), _tuple(getattr(p, "value_shape", p.shape))) for p in proof.params]
    verdict = "proved" if ok else "NOT proved"
    parts = [STYLE, '<div class="symdl symdl-proof">',
             f'<h3><span class="{"ok" if ok else "bad"}">{"✓" if ok else "✗"} {verdict}</span> '
             f"on shapes n={proof.n_value}</h3>", f"<p>{_e(str(proof))}</p>",
             _html_table(["parameter", "shape"], shapes)]
    rows = [["entries", proof.entries], ["symbolically", proof.symbolic], ["at exact random points", proof.by_points]]
    parts.append(_html_table(["", "count"], rows))
    if proof.differences:
        parts.append("<h4>Differences</h4>" + _html_table(["where", "difference"], proof.differences, "bad"))
    parts.append("</div>")
    latex = _latex_table(["parameter", "shape"], shapes)
    return _select({"text/plain": str(proof), "text/latex": r"$\text{%s}$" % _latex_text(str(proof)) + "\n" + latex,
                    "text/html": "\n".join(parts)}, include, exclude)


def gradcheck_bundle(result, include=None, exclude=None) -> dict:
    """An ``sd.check_grad`` result: each parameter's relative error against the tolerance."""
    rows = [[k, f"{v:.2e}", "ok" if v <= result.tol else "exceeds tol"] for k, v in result.items()]
    ok = result.passed
    head = (f'<h3><span class="{"ok" if ok else "bad"}">gradient check {"passed" if ok else "FAILED"}</span> '
            f"(tol {result.tol:.0e}, max relative error)</h3>")
    html_ = "\n".join([STYLE, '<div class="symdl symdl-gradcheck">', head,
                       _html_table(["parameter", "relative error", ""], rows), "</div>"])
    return _select({"text/plain": str(result), "text/latex": _latex_table(["parameter", "relative error", ""], rows),
                    "text/html": html_}, include, exclude)


def summary_rows(model):
    """``(header, rows, totals)`` of a model's summary table, as ``Model.summary`` prints it."""
    from .graphs import layer_counts

    chain = type(model).__name__ == "Sequential"
    header = ["layer", "type", "output shape", "params", "activation"] + ([] if chain else ["connected to"])
    rows, total, frozen = [], 0, 0
    for layer, name, (count, fixed), out, inbound in zip(
            model.layers, model.layer_names, layer_counts(model), model.layer_outputs, model.layer_inbound):
        total, frozen = total + count, frozen + fixed
        shape = "(n, " + ", ".join(map(str, image_shape(out) or (out.shape[1],))) + ")"
        row = [name, type(layer).__name__, shape, f"{count + fixed:,}", getattr(layer, "describe", lambda: "")()]
        rows.append(row + ([] if chain else [", ".join(inbound)]))
    return header, rows, {"total params": total + frozen, "trainable params": total, "non-trainable params": frozen}


def summary_bundle(model, include=None, exclude=None) -> dict:
    """A model: its summary as an HTML table, and its layer graph (``plot_model``) below it."""
    from .graphs import plot_model

    header, rows, totals = summary_rows(model)
    text = model.summary(print_fn=None)
    title = text.splitlines()[0]  # "Sequential (input_dim=4)", "Model 'name' (inputs ...)"
    foot = "".join(f"<tr><th>{_e(k)}</th><td>{v:,}</td></tr>" for k, v in totals.items())
    parts = [STYLE, '<div class="symdl symdl-model">', f"<h3>{_e(title)}</h3>", _html_table(header, rows, "summary"),
             f"<table>{foot}</table>",
             f"<details><summary>layer graph</summary>{plot_model(model).svg}</details>", "</div>"]
    latex = _latex_table(header, rows + [[k, f"{v:,}"] + [""] * (len(header) - 2) for k, v in totals.items()])
    return _select({"text/plain": text, "text/latex": latex, "text/html": "\n".join(parts)}, include, exclude)


def _curves_png(history) -> str | None:
    try:
        from ..nn.curves import plot_history

        fig = plot_history(history)
    except (ImportError, ValueError):  # no matplotlib, or nothing to plot
        return None
    return base64.b64encode(fig._repr_png_()).decode()


def history_bundle(history, include=None, exclude=None, max_rows: int = 40) -> dict:
    """A ``History``: the per-epoch values as a table (the first and last epochs when there are
    many) and, with matplotlib, the curves as an inline PNG."""
    values = history.history
    keys = list(values)
    epochs = max((len(v) for v in values.values()), default=0)
    index = list(range(epochs))
    if epochs > max_rows:
        index = index[: max_rows // 2] + [None] + index[-max_rows // 2 :]
    rows = []
    for i in index:
        if i is None:
            rows.append(["…"] + ["…"] * len(keys))
            continue
        rows.append([str(i + 1)] + [f"{values[k][i]:.4g}" if i < len(values[k]) else "" for k in keys])
    header = ["epoch"] + keys
    png = _curves_png(history) if epochs else None
    parts = [STYLE, '<div class="symdl symdl-history">', f"<h3>History: {epochs} epoch{'s' * (epochs != 1)}</h3>"]
    if png:
        parts.append(f'<img alt="training curves" src="data:image/png;base64,{png}">')
    parts += [_html_table(header, rows, "history"), "</div>"]
    return _select({"text/plain": repr(history), "text/latex": _latex_table(header, rows),
                    "text/html": "\n".join(parts)}, include, exclude)


def install(table) -> None:
    """Register each display for its class in ``table`` (a ``symdl.registry.RuleTable``):
    ``Explanation`` (and ``HvpExplanation``), ``Proof``, ``GradCheck``, ``Model`` (and
    ``Sequential``), ``History``, ``model.formulas()``'s ``Formulas``. A class's ``_repr_mimebundle_`` then looks itself up there."""
    from ..autodiff.explain import Explanation
    from ..nn.fitting import History
    from ..nn.model import Formulas, Model
    from ..run.proofs import GradCheck, Proof

    table.rule(Explanation)(explanation_bundle)
    table.rule(Proof)(proof_bundle)
    table.rule(GradCheck)(gradcheck_bundle)
    table.rule(Model)(summary_bundle)
    table.rule(History)(history_bundle)
    table.rule(Formulas)(lambda formulas, include=None, exclude=None: formulas_bundle(formulas.model, include, exclude))


__all__ = ["explanation_bundle", "explanation_html", "factor_shapes", "formulas_bundle", "gradcheck_bundle",
           "history_bundle", "install", "kernel_source", "proof_bundle", "summary_bundle", "summary_rows",
           "sympy_source"]
