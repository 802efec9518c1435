"""ONNX export: a model's forward pass, or its loss and every gradient, as ordinary ONNX operators.

The exported graph is symdl's lowered program printed by the ONNX backend
(``symdl.backends.onnx``): the forward pass ``predict`` runs (batch norm with its running
statistics, dropout the identity), or, with ``gradients=True``, the loss and the gradients
symdl derived (not ONNX's own autodiff), so a stock ONNX Runtime computes symdl's gradients.

Interface: the model's input by its name (``input_layer``) with a dynamic batch axis
(``batch``), NHWC images as the model reads them; the output by the last layer's name
(``dense_2``); the weights are initializers under their Keras-style names (``dense_1/kernel``,
``symdl.nn.weights``) with the shapes ``get_weights`` gives. ``gradients=True`` adds the input
``target`` (what the loss compares with: one-hot rows for ``softmax_cross_entropy``, a column for
binary and regression losses) and outputs ``loss`` (a scalar) and ``grad/<weight name>``.

>>> import os, tempfile, numpy as np, onnxruntime as ort, symdl as sd
>>> model = sd.nn.Sequential([sd.nn.Dense(4, activation="tanh"), sd.nn.Dense(2)], input_dim=3)
>>> model.compile(backend="numpy")
>>> folder = tempfile.TemporaryDirectory(); path = os.path.join(folder.name, "m.onnx")
>>> _ = export_model(model, path)
>>> X = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
>>> out, = ort.InferenceSession(path).run(None, {"input_layer": X})
>>> bool(np.allclose(out, model.predict(X), atol=1e-5))
True
>>> folder.cleanup()
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import sympy as sp
from onnx import TensorProto

from ..autodiff.vjp import grad
from ..backends import cache
from ..backends.base import as_dtype
from ..backends.onnx import DEFAULT_OPSET, Graph, check_opset, emit_program, make_model
from ..backends.onnx.graph import onnx_dtype
from ..backends.onnx.model import value_info
from ..graph.nodes import TokenInput, n as N
from ..ir.lowering import lower
from ..nn import layers
from ..nn.weights import weight_names
from ..ops.conv import image_shape
from ..ops.embedding import sequence_length
from ..version import __version__

BATCH = "batch"  # the name of the dynamic batch axis


def _depends_on_n(d) -> bool:
    return N in sp.sympify(d).free_symbols


class Interface:
    """An exported graph's inputs, weights and outputs around a printed program."""

    def __init__(self, dtype, opset: int):
        self.dtype = as_dtype(dtype)
        self.g = Graph(self.dtype, check_opset(opset))
        self.elem = onnx_dtype(self.dtype)
        self.inputs, self.outputs, self.values = [], [], {}

    def data(self, leaf, name: str) -> None:
        """An ``Input`` leaf as the graph input ``name``: ``(batch, features)``, NHWC images
        ``(batch, H, W, C)``, token ids ``(batch, T)`` (int64, cast to the graph's dtype: the kernels read
        ids as exact integers in it) or per-token sequences ``(batch, T, d)``; the first one with a
        batch axis gives ``n`` (the number of samples or sequences)."""
        rows, cols = leaf.shape
        tokens = isinstance(leaf, TokenInput)
        shape = (leaf.sequence_length,) if tokens else \
            getattr(leaf, "image_shape", None) or getattr(leaf, "sequence_shape", None)
        if not _depends_on_n(rows):
            dims = [int(rows), int(cols)]
        else:
            dims = [BATCH, *(int(d) for d in shape)] if shape else [BATCH, int(cols)]
            if self.g.n is None:
                self.g.n = self.g.node("Shape", [name], start=0, end=1)
        self.inputs.append(value_info(name, TensorProto.INT64 if tokens else self.elem, dims))
        value = self.g.node("Cast", [name], to=self.elem) if tokens else name
        self.values[str(leaf.name)] = self.g.node("Reshape", [value, self.g.const([-1, int(cols)], np.int64)]) \
            if shape and _depends_on_n(rows) else value

    def weight(self, leaf, name: str, array=None) -> None:
        """A parameter (or running statistic) as the initializer ``name`` holding ``array``, or, with
        no array, as a graph input; both in the shape users see (``(k,)``, ``(kh, kw, c_in, c_out)``)."""
        graph_shape = tuple(int(d) for d in leaf.shape)
        if array is None:
            outer = tuple(getattr(leaf, "value_shape", graph_shape))
            self.inputs.append(value_info(name, self.elem, list(outer)))
        else:
            outer = tuple(np.shape(array))
            self.g.initializer(name, array)
        value = name if outer == graph_shape else self.g.node("Reshape", [name, self.g.const(graph_shape, np.int64)])
        self.values[str(leaf.name)] = value

    def output(self, value: str, name: str, dims) -> None:
        """``value`` as the graph output ``name`` of shape ``dims`` (ints and ``"batch"``)."""
        shape = [-1 if d == BATCH else int(d) for d in dims]
        self.g.node("Reshape", [value, self.g.const(shape, np.int64)], outputs=[name])
        self.outputs.append(value_info(name, self.elem, list(dims)))

    def emit(self, program) -> dict:
        if program.scalars:
            raise ValueError(f"ONNX export: the graph reads runtime scalars {[str(s) for s in program.scalars]} "
                             "(dropout's seed and step count while training, or an optimizer's hyper-parameters), "
                             "which an exported graph does not have")
        return emit_program(self.g, program, self.values)

    def save(self, path, doc: str) -> object:
        model = make_model(self.g, self.inputs, self.outputs, doc=doc)
        model.metadata_props.add(key="producer", value=f"symdl {__version__}")
        write_atomically(path, model.SerializeToString())
        return model


def outer_dims(expr) -> list:
    """How an output reads outside: a ``(1, 1)`` value a scalar, images ``(batch, H, W, C)``, rows
    ``(batch, features)``."""
    rows, cols = expr.shape
    if rows == 1 and cols == 1:
        return []
    image = image_shape(expr)
    if _depends_on_n(rows):
        return [BATCH, *image] if image is not None else [BATCH, int(cols)]
    return [int(rows), int(cols)]


def write_atomically(path, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name, then rename: a failed write leaves the old file."""
    cache.save_file(path, lambda f: f.write(data), "ONNX export: cannot write")


def _dropout_layers(model) -> list:
    return [name for layer, name in zip(model.layers, model.layer_names) if isinstance(layer, layers.Dropout)]


def _input_leaves(model) -> list:
    return list(getattr(model, "xs", None) or [model.x])


def _input_names(model) -> list:
    return list(getattr(model, "input_names", None) or [t.name for t in model.inputs])


def _target_leaves(model) -> list:
    return list(getattr(model, "ys", None) or [model.y])


def _inference_outputs(model) -> list:
    return list(getattr(model, "inference_exprs", None) or [model.inference_output])


def _output_names(model) -> list:
    names = getattr(model, "output_names", None)
    if names:
        return list(names)
    made_by = {id(layer): name for layer, name in zip(model.layers, model.layer_names)}
    return [made_by[id(t.layer)] for t in model.outputs]


def export_model(model, path, opset: int = DEFAULT_OPSET, gradients: bool = False, training: bool = True,
                 dtype=None):
    """Write ``model`` (``Sequential`` or functional, compiled) to ``path`` as ONNX; returns the
    ``ModelProto``.

    Inputs by the model's input names, outputs by its output names (a model may have several).
    ``gradients=False``: the forward pass ``model.predict`` runs. ``gradients=True``: the input
    ``target`` (``target/<output name>`` for each of several outputs) and the outputs ``loss``
    and ``grad/<weight name>`` of the loss ``fit`` minimises (``training=True``: batch norm with
    the batch's statistics, the regulariser included; a model with dropout needs
    ``training=False``, the loss ``evaluate`` reports, whose gradients have no random mask).
    ``dtype``: the model's by default.
    """
    if getattr(model, "train_step", None) is None:
        raise RuntimeError("export: the model has no weights yet (never compiled); call model.compile(...) first")
    check_opset(opset)
    dtype = model.dtype if dtype is None else dtype
    names = weight_names(model)
    live = {**model.train_step.params, **model.train_step.statistics}
    if gradients:
        dropped = _dropout_layers(model)
        if training and dropped:
            raise ValueError(f"export(gradients=True): the training loss of this model draws dropout masks "
                             f"({', '.join(dropped)}), which ONNX cannot reproduce; pass training=False for the "
                             "gradients of the inference loss (dropout the identity, batch norm's running statistics)")
        loss = model.loss if training else model.inference_loss
        derived = grad(loss, model.params)
        outputs = {"loss": loss, **{f"g{i}": derived[p] for i, p in enumerate(model.params)}}
    else:
        outputs = {f"out{j}": h for j, h in enumerate(_inference_outputs(model))}
    program = lower(outputs)
    face = Interface(dtype, opset)
    for leaf, name in zip(_input_leaves(model), _input_names(model)):
        face.data(leaf, name)
    if gradients:
        targets = _target_leaves(model)
        for leaf, name in zip(targets, _output_names(model)):
            face.data(leaf, "target" if len(targets) == 1 else f"target/{name}")
    for leaf in program.params:
        key = str(leaf.name)
        face.weight(leaf, names[key], live[key])
    values = face.emit(program)
    if gradients:
        face.output(values["loss"], "loss", [])
        for i, p in enumerate(model.params):
            face.output(values[f"g{i}"], f"grad/{names[str(p.name)]}", p.value_shape)
    else:
        outs = _inference_outputs(model)
        lengths = getattr(model, "sequence_lengths", None) or [sequence_length(h) for h in outs]
        for j, (name, h, T) in enumerate(zip(_output_names(model), outs, lengths)):
            # a sequence output: (batch, T, units), as predict returns it
            face.output(values[f"out{j}"], name, [BATCH, *((T,) if T else ()), int(h.shape[1])])
    what = "loss and gradients" if gradients else "forward pass"
    return face.save(path, f"{type(model).__name__} {model.name or ''} {what}, exported by symdl".replace("  ", " "))


def export_onnx(outputs, path, inputs=None, params=None, gradients=None, opset: int = DEFAULT_OPSET,
                dtype="float32"):
    """Export graph expressions to ONNX (``sd.export_onnx``); returns the ``ModelProto``.

    ``outputs``: an expression or ``{name: expression}`` (outputs of that name; a ``(1, 1)`` value
    is a scalar, images NHWC). ``inputs``: the ``sd.input`` leaves in the order the graph takes
    them (default: every input the outputs read). ``params``: ``{name: array}`` stored in the file;
    a parameter not given is a graph input. ``gradients``: parameters whose gradients of the output
    ``"loss"`` are added as ``grad/<name>``.

    >>> import os, tempfile, numpy as np, onnxruntime as ort, symdl as sd
    >>> x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1))
    >>> loss = sd.losses.mse(x @ W, y)
    >>> folder = tempfile.TemporaryDirectory(); path = os.path.join(folder.name, "g.onnx")
    >>> _ = export_onnx({"loss": loss}, path, params={"W": np.zeros((2, 1))}, gradients=[W])
    >>> session = ort.InferenceSession(path)
    >>> value, g = session.run(None, {"x": np.eye(2, dtype=np.float32), "y": np.ones((2, 1), np.float32)})
    >>> float(value), g.ravel().tolist()
    (1.0, [-1.0, -1.0])
    >>> folder.cleanup()
    """
    if not isinstance(outputs, dict):
        outputs = {"output": outputs}
    outputs = dict(outputs)
    if gradients:
        if "loss" not in outputs:
            raise ValueError(f"export_onnx(gradients=...): differentiate the output named 'loss'; the outputs are "
                             f"{sorted(outputs)}")
        derived = grad(outputs["loss"], list(gradients))
        outputs.update({f"grad/{p.name}": derived[p] for p in gradients})
    internal = {name: f"o{i}" for i, name in enumerate(outputs)}
    program = lower({internal[k]: v for k, v in outputs.items()})
    face = Interface(dtype, opset)
    used = {str(l.name): l for l in program.inputs}
    order = list(used) if inputs is None else [str(getattr(i, "name", i)) for i in inputs]
    missing, extra = sorted(set(used) - set(order)), sorted(set(order) - set(used))
    if missing or extra:
        raise ValueError(f"export_onnx: inputs {order} do not match the inputs the outputs read {sorted(used)} "
                         f"(missing: {missing}, not read: {extra})")
    for name in order:
        face.data(used[name], name)
    given = {str(getattr(k, "name", k)): v for k, v in (params or {}).items()}
    known = {str(l.name): l for l in program.params}
    extra = sorted(set(given) - set(known))
    outer = {k: tuple(getattr(leaf, "value_shape", tuple(int(d) for d in leaf.shape))) for k, leaf in known.items()}
    shaped = [f"{k}: {np.shape(v)}, expected {outer[k]}" for k, v in given.items()
              if k in known and np.size(v) != int(np.prod(outer[k]))]
    if extra or shaped:
        raise ValueError(f"export_onnx: params the outputs do not read: {extra}; wrong sizes: {shaped}")
    for name, leaf in known.items():
        face.weight(leaf, name, given.get(name))
    values = face.emit(program)
    for name, expr in outputs.items():
        dims = list(_param_shape(gradients, name)) if name.startswith("grad/") else outer_dims(expr)
        face.output(values[internal[name]], name, dims)
    return face.save(path, "graph exported by symdl")


def _param_shape(params, name) -> tuple:
    leaf = {f"grad/{p.name}": p for p in params}[name]
    return tuple(getattr(leaf, "value_shape", tuple(int(d) for d in leaf.shape)))


__all__ = ["export_model", "export_onnx", "Interface", "BATCH"]
