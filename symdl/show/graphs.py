"""``plot_model`` (a model's layer graph) and ``draw`` (an expression graph), as SVG ``Drawing``s.

No graphviz: the layout is symdl's own (``symdl.show.layout``), left to right.

>>> import symdl as sd
>>> x = sd.nn.Input(shape=(4,))
>>> h = sd.nn.Dense(4, activation="tanh")(x)
>>> model = sd.nn.Model(x, sd.nn.Dense(2)(h + x))
>>> d = plot_model(model)
>>> d.node_count, d.edge_count
(4, 4)
>>> W = sd.param("W", (2, 3)); xx = sd.input("x", 2)
>>> draw(sd.tanh(xx @ W)).node_count
4
"""
from __future__ import annotations

import numpy as np
import sympy as sp
from sympy.matrices.expressions import MatAdd, MatMul, MatrixSymbol, Transpose

from ..graph.nodes import Input, Map, Param, children, walk
from ..nn.functional import shape_text
from .svg import render


def layer_counts(model) -> list:
    """``[(trainable, non-trainable), ...]`` per layer, as ``Model.summary`` counts them: the
    parameters, and the running statistics a layer writes (a batch norm's moving mean and variance)."""
    per_layer = getattr(model, "layer_writes", None)
    if per_layer is None:  # models that keep one table of writes, named by the layer's place
        stats = {str(s.name): int(np.prod(s.shape)) for s in getattr(model, "writes", {})}
        fixed = [sum(stats.get(f"{k}{i}", 0) for k in ("moving_mean", "moving_var"))
                 for i in range(1, len(model.layer_params) + 1)]
    else:
        fixed = [sum(int(np.prod(s.shape)) for s in writes) for writes in per_layer]
    return [(sum(int(np.prod(p.value_shape)) for p in params), f) for params, f in zip(model.layer_params, fixed)]


def model_graph(model, show_shapes=True, show_layer_names=True, show_layer_activations=False,
                show_param_counts=True):
    """``(labels, edges, kinds, names)`` of a model: one node per layer call (and the input)."""
    if not hasattr(model, "calls") or not hasattr(model, "layer_names"):
        raise TypeError(f"plot_model draws an sd.nn.Model or Sequential, got {type(model).__name__}")
    place = {id(layer): k for k, layer in enumerate(model.layers)}
    counts = [a + b for a, b in layer_counts(model)]
    index = {id(t): i for i, t in enumerate(model.calls)}
    labels, kinds, names, edges, seen = [], [], [], [], set()
    outputs = {id(t) for t in model.outputs}
    for i, t in enumerate(model.calls):
        if t.layer is None:
            name, cls, kind = t.name, "InputLayer", "input"
            lines = [f"{name} ({cls})" if show_layer_names else cls]
        else:
            k = place[id(t.layer)]
            name, cls = model.layer_names[k], type(t.layer).__name__
            kind = "merge" if getattr(t.layer, "merges", False) else "layer"
            if getattr(t, "index", None):  # output k of a call with several outputs (return_state=True)
                name = f"{name}[{t.index}]"
            lines = [f"{name} ({cls})" if show_layer_names else cls]
            if show_layer_activations:
                described = getattr(t.layer, "describe", lambda: "")()
                if described:
                    lines.append(described)
        if show_shapes:
            lines.append(f"out {shape_text(t.shape)}")
        if show_param_counts and t.layer is not None and not getattr(t, "index", None):
            k = place[id(t.layer)]
            lines.append(f"params {counts[k]:,}" + (" (shared)" if k in seen else ""))
            seen.add(k)
        if id(t) in outputs:
            kind = "output" if kind == "layer" else kind
        labels.append(lines)
        kinds.append(kind)
        names.append(name)
        edges += [(index[id(p)], i) for p in t.inputs]
    return labels, edges, kinds, names


def plot_model(model, path=None, show_shapes: bool = True, show_layer_names: bool = True,
               show_layer_activations: bool = False, show_param_counts: bool = True):
    """The layer graph of a ``Model`` or ``Sequential``, left to right: each box is one layer call
    with its name, class, output shape (Keras's ``(None, ...)``) and parameter count.

    Returns a ``Drawing`` (shown in a notebook; ``.save(path)``); ``path`` (an ``.svg`` file)
    saves it too. Keras's ``plot_model`` needs the graphviz binary; this needs nothing.
    """
    labels, edges, kinds, names = model_graph(model, show_shapes, show_layer_names, show_layer_activations,
                                              show_param_counts)
    title = f"{type(model).__name__} {model.name!r}" if getattr(model, "name", None) else type(model).__name__
    drawing = render(labels, edges, kinds, names, title=title)
    if path is not None:
        drawing.save(path)
    return drawing


def _short(text: str, limit: int = 36) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dims(node) -> str:
    return "(" + " × ".join(sp.sstr(d) for d in node.shape) + ")"


def node_label(node, operands=()) -> tuple:
    """``(lines, kind)`` for one expression node: what it is, its formula when it has one, its shape."""
    if isinstance(node, MatrixSymbol):
        kind = "input" if isinstance(node, Input) else "param" if isinstance(node, Param) else "op"
        what = "input" if kind == "input" else "param" if kind == "param" else type(node).__name__
        return [str(node.name), what, _dims(node)], kind
    if isinstance(node, Map):
        letters = [sp.Symbol(chr(97 + i)) for i in range(len(node.operands))]
        body = node.lam.expr.xreplace(dict(zip(node.lam.variables, letters)))
        return ["elementwise", _short(sp.sstr(body)), _dims(node)], "op"
    if isinstance(node, MatMul):
        return ["matmul", _dims(node)], "op"
    if isinstance(node, MatAdd):
        return ["add", _dims(node)], "op"
    if isinstance(node, Transpose):
        return ["transpose", _dims(node)], "op"
    return [type(node).__name__, _dims(node)], "op"


def expression_graph(roots):
    """``(labels, edges, kinds, names)`` of the graph under ``roots``: one node per distinct subexpression."""
    order = walk(roots).order
    index = {node: i for i, node in enumerate(order)}
    labels, kinds, names, edges = [], [], [], []
    outputs = set(roots)
    for i, node in enumerate(order):
        ops = children(node)
        lines, kind = node_label(node, ops)
        if node in outputs and kind == "op":
            kind = "output"
        labels.append(lines)
        kinds.append(kind)
        names.append(str(node.name) if isinstance(node, MatrixSymbol) else f"{lines[0]} {i}")  # never the
        # whole subexpression's text: printed without sharing, a deep graph's would grow exponentially
        for c in dict.fromkeys(ops):  # a node used twice by one user is one edge
            edges.append((index[c], i))
    return labels, edges, kinds, names


def draw(expression, path=None):
    """The expression graph of a loss, a gradient or any symdl matrix expression (or a list or
    dict of them), left to right from the inputs and parameters: one box per distinct
    subexpression (shared ones drawn once), each with its operation, formula and shape.

    Returns a ``Drawing``; ``path`` (an ``.svg`` file) saves it too.
    """
    if isinstance(expression, dict):
        roots = list(expression.values())
    elif isinstance(expression, (list, tuple)):
        roots = list(expression)
    else:
        roots = [expression]
    for r in roots:
        if not isinstance(r, sp.MatrixExpr):
            raise TypeError(f"draw takes symdl matrix expressions (a loss, sd.grad's values), got "
                            f"{type(r).__name__}: {r!r}")
    labels, edges, kinds, names = expression_graph(roots)
    drawing = render(labels, edges, kinds, names, title="expression graph")
    if path is not None:
        drawing.save(path)
    return drawing


__all__ = ["draw", "expression_graph", "layer_counts", "model_graph", "node_label", "plot_model"]
