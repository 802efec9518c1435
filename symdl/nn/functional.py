"""Keras 3's functional API underneath ``Model``: ``Input``, symbolic tensors, and layers called on them.

A symbolic tensor records *how* it was made (the layer, the tensors it was called on) and its
shape without the batch axis; ``Model(inputs, outputs)`` walks that record and builds the
SymPy graph once, naming each layer's parameters by the layer's place in the model
(``W1``, ``K2``, ... as ``Sequential`` always has). A layer called twice shares its weights; a
tensor used twice is a skip connection, and the chain rule sums its two adjoints.

Calling a layer builds it once on placeholder leaves, so a wrong shape is an error at the
call, naming the layer and the shapes, before any model exists:

>>> import symdl as sd
>>> x = sd.nn.Input(shape=(4,))
>>> h = sd.nn.Dense(8, activation="relu")(x)
>>> y = sd.nn.Dense(4)(h) + x
>>> y
<SymbolicTensor shape=(None, 4) from Add>
>>> sd.nn.Dense(3)(sd.nn.Input(shape=(8, 8, 1)))
Traceback (most recent call last):
...
ValueError: Dense layer 1 gets images (8, 8, 1): put sd.nn.Flatten() before it
"""
from __future__ import annotations

import itertools

import numpy as np

from ..graph.nodes import input as sd_input, sequence_input
from ..ops.conv import image_shape
from ..ops.embedding import sequence_length

_serial = itertools.count()


class SymbolicTensor:
    """A layer's output (or an ``Input``) in a functional model, before the model is built.

    ``shape`` has no batch axis (``(features,)`` or ``(h, w, c)``), as Keras's ``KerasTensor``;
    ``layer`` made it from ``inputs`` (a list when the layer was called on a list); an ``Input``
    has no layer and holds its graph ``leaf``. A layer that returns several tensors (a recurrent
    layer with ``return_state=True``: ``[output, state_h, state_c]``) makes its first output as
    any call does; output ``index`` k > 0 is that call's k-th result (``inputs``: the first output).
    """

    def __init__(self, shape, layer=None, inputs=(), many=False, leaf=None, name=None, dtype=None, index=None):
        self.shape, self.layer, self.inputs, self.many = tuple(shape), layer, list(inputs), many
        self.leaf, self.name, self.serial, self.index = leaf, name, next(_serial), index
        self.dtype = dtype  # "int32" / "int64": token ids (sd.nn.Input(shape=(T,), dtype="int32")), else None

    @property
    def features(self):
        """What ``sd.input`` takes: the width, ``(h, w, c)``, or a sequence's ``(T,)`` ids / ``(T, d)``."""
        if self.dtype is not None:
            return self.shape
        return self.shape[0] if len(self.shape) == 1 else self.shape

    def __repr__(self):
        origin = f"input {self.name}" if self.layer is None else label(self.layer)
        origin += f", output {self.index}" if self.index else ""
        return f"<SymbolicTensor shape={shape_text(self.shape)} from {origin}>"

    # arithmetic builds merge layers, as Keras's operators on KerasTensors build operations
    def __add__(self, other):
        return _merge("+", self, other)

    def __sub__(self, other):
        return _merge("-", self, other)

    def __mul__(self, other):
        return _merge("*", self, other)


#: The merge layer class each operator builds (``symdl.nn.merging`` fills it: it imports this module).
OPERATORS = {}


def _merge(op, a, b):
    return OPERATORS[op]()([a, _tensor(b, op)])


def _tensor(other, op):
    if not isinstance(other, SymbolicTensor):
        raise TypeError(f"'{op}' on a symbolic tensor takes another symbolic tensor, got {type(other).__name__}")
    return other


def check_shared(layer, first, again) -> None:
    """A layer's later call in one model (``first``, ``again``: the calls' input tensors) may share its weights."""
    if not getattr(layer, "shareable", True):
        raise ValueError(f"{label(layer)} is called a second time: a {type(layer).__name__} cannot be shared "
                         "(create one layer per call)")
    seen, shapes = [t.shape for t in first], [t.shape for t in again]
    if seen != shapes:
        raise ValueError(f"{label(layer)} is shared: its first call took {', '.join(map(shape_text, seen))}, "
                         f"this one {', '.join(map(shape_text, shapes))}; a shared layer takes the same shapes")


def shape_text(shape) -> str:
    return "(None, " + ", ".join(map(str, shape)) + ")"


def label(layer) -> str:
    """How messages name a layer before a model names it: its name, else its class."""
    return f"{type(layer).__name__} {layer.name!r}" if layer.name else type(layer).__name__


def Input(shape, dtype=None, name=None) -> SymbolicTensor:  # noqa: N802 - Keras's name
    """A model's input: ``shape`` without the batch axis, ``(features,)`` or images ``(h, w, c)``.

    ``dtype``: ``None``, ``"float32"`` or ``"float64"`` (the model's ``compile`` dtype decides the
    arithmetic); ``name`` names it in summaries (default ``"input_layer"``). The arrays passed to
    ``fit``/``predict`` are this input.

    >>> import symdl as sd
    >>> sd.nn.Input(shape=(8, 8, 1))
    <SymbolicTensor shape=(None, 8, 8, 1) from input input_layer>
    """
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape),)
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"Input: shape must be a tuple like (features,) or (h, w, c), got {shape!r}") from None
    tokens = dtype is not None and str(np.dtype(dtype)) in ("int32", "int64")
    if tokens:  # token ids (n, T): an Embedding reads them
        if len(shape) != 1 or shape[0] < 1:
            raise ValueError(f"Input: token ids have shape (sequence_length,), got {shape!r}")
        if name is not None and not (isinstance(name, str) and name):
            raise ValueError(f"Input: name must be a non-empty string, got {name!r}")
        dtype = str(np.dtype(dtype))
        return SymbolicTensor(shape, leaf=sd_input("x", shape, dtype=dtype), name=name or "input_layer", dtype=dtype)
    if len(shape) not in (1, 2, 3) or min(shape) < 1:
        raise ValueError(f"Input: shape must be (features,), sequences (steps, features) or (h, w, c) of positive "
                         f"ints, got {shape!r}")
    if dtype is not None and np.dtype(dtype).kind != "f":
        raise ValueError(f"Input: symdl models read floating-point data or int32/int64 token ids, got dtype {dtype!r}")
    if name is not None and not (isinstance(name, str) and name):
        raise ValueError(f"Input: name must be a non-empty string, got {name!r}")
    if len(shape) == 2:  # sequences (n, T, f), held as rows (n·T, f): recurrent layers read them
        return SymbolicTensor(shape, leaf=sequence_input("x", shape), name=name or "input_layer")
    leaf = sd_input("x", shape[0] if len(shape) == 1 else shape)  # fit / predict pass the data as x
    return SymbolicTensor(shape, leaf=leaf, name=name or "input_layer")


def call_layer(layer, inputs):
    """``layer(inputs)``: check, build on placeholders for the output shape, record the call.

    A layer called twice in one model shares its weights; ``Model`` checks that the calls take
    the same shapes (one layer object may also serve several models, each with its own weights).
    A layer whose build gives several outputs (a tuple: ``return_state=True``) returns a list of
    symbolic tensors, as Keras does.
    """
    many = isinstance(inputs, (list, tuple))
    tensors = list(inputs) if many else [inputs]
    for t in tensors:
        if not isinstance(t, SymbolicTensor):
            raise TypeError(f"{label(layer)}: call a layer on symbolic tensors (sd.nn.Input(...) or another "
                            f"layer's output), got {type(t).__name__}")
    if getattr(layer, "merges", False) != many:
        raise TypeError(f"{label(layer)} takes a list of tensors" if not many else
                        f"{label(layer)} takes one tensor, got a list of {len(tensors)}")
    # placeholders for the inputs; the index only names throw-away parameters (and errors, as Sequential does)
    probes = [_probe(f"probe{i}", t) for i, t in enumerate(tensors)]
    built = layer.build_both(len(upstream_layers(tensors)) + 1, probes if many else probes[0],
                             probes if many else probes[0])
    out = built.train
    if not isinstance(out, tuple):
        return SymbolicTensor(_shape_of(out), layer, tensors, many)
    first = SymbolicTensor(_shape_of(out[0]), layer, tensors, many)
    return [first] + [SymbolicTensor(_shape_of(o), layer, [first], index=k) for k, o in enumerate(out[1:], start=1)]


def _shape_of(out) -> tuple:
    """A graph expression's shape without the batch axis: images, sequences (T, d) or features."""
    T = sequence_length(out)  # token rows (n·T, d): the tensor is (T, d), as Keras's (None, T, d)
    return image_shape(out) or ((T, int(out.shape[1])) if T else (int(out.shape[1]),))


def _probe(name, t: SymbolicTensor):
    """A placeholder leaf for tensor ``t``: features, images, token ids ``(T,)`` or sequences ``(T, d)``."""
    if t.dtype is None and len(t.shape) == 2:
        return sequence_input(name, t.shape)
    return sd_input(name, t.features, dtype=t.dtype)


def upstream_layers(tensors) -> list:
    """The distinct layers the tensors were made by, directly or not."""
    layers = {}
    for t in walk(tensors):
        if t.layer is not None:
            layers.setdefault(id(t.layer), t.layer)
    return list(layers.values())


def walk(outputs) -> list:
    """The tensors ``outputs`` come from, parents first (depth-first, post-order; a tensor once).

    A cycle (only possible if a tensor's record was changed by hand) is an error naming a tensor
    on it.
    """
    order, state = [], {}
    for root in outputs:
        if root in state:
            continue
        state[root] = "open"
        stack = [(root, iter(root.inputs))]
        while stack:
            t, parents = stack[-1]
            p = next(parents, None)
            if p is None:
                state[t] = "done"
                order.append(t)
                stack.pop()
            elif state.get(p) == "open":
                raise ValueError(f"the layer graph has a cycle through {p!r}")
            elif p not in state:
                state[p] = "open"
                stack.append((p, iter(p.inputs)))
    return order


def structure(tensors, what):
    """``(keys, tensors)`` of a model's ``inputs`` / ``outputs``: one symbolic tensor, a list of them
    or a dict ``{name: tensor}`` (``keys`` its names; None otherwise)."""
    keys = None
    if isinstance(tensors, dict):
        keys = list(tensors)
        for k in keys:
            if not (isinstance(k, str) and k):
                raise TypeError(f"Model: the names of a dict of {what} must be non-empty strings, got {k!r}")
        tensors = list(tensors.values())
    elif isinstance(tensors, (list, tuple)):
        tensors = list(tensors)
    else:
        tensors = [tensors]
    if not tensors:
        raise ValueError(f"Model: {what} is empty: give at least one symbolic tensor")
    for t in tensors:
        if not isinstance(t, SymbolicTensor):
            raise TypeError(f"Model: {what} must be symbolic tensors (sd.nn.Input(...) or a layer's output), "
                            f"got {type(t).__name__}")
    if what == "inputs":
        for t in tensors:
            if t.layer is not None:
                raise ValueError(f"Model: inputs must be sd.nn.Input tensors, got {t!r}")
        if len({id(t) for t in tensors}) != len(tensors):
            raise ValueError("Model: an Input is given twice in inputs")
    return keys, tensors


def unique_names(names) -> list:
    """Keras's way with repeated names: the second ``input_layer`` is ``input_layer_1``.

    >>> unique_names(["input_layer", "input_layer", "a"])
    ['input_layer', 'input_layer_1', 'a']
    """
    out, seen = [], set()
    for name in names:
        candidate, k = name, 0
        while candidate in seen:
            k += 1
            candidate = f"{name}_{k}"
        seen.add(candidate)
        out.append(candidate)
    return out


def check_graph(inputs, outputs, order) -> None:
    """Every path from an output ends at one of ``inputs``, and every input feeds some output."""
    given = {id(t) for t in inputs}
    for t in order:
        if t.layer is None and id(t) not in given:
            out = next(o for o in outputs if t in walk([o]))
            names = ", ".join(repr(i.name) for i in inputs)
            which = f"the model's input {names}" if len(inputs) == 1 else f"one of the model's inputs {names}"
            raise ValueError(f"Model: the output {out!r} depends on the Input {t.name!r} {shape_text(t.shape)}, "
                             f"which is not {which}")
    used = {id(t) for t in order}
    for t in inputs:
        if id(t) not in used:
            raise ValueError(f"Model: the input {t.name!r} {shape_text(t.shape)} is not used by any output")


class Replayed:
    """What ``replay`` built: per layer its parameters, first output, inbound names and running
    statistics; all graph writes and starting values; ``values[id(tensor)] = (train, infer)``."""

    def __init__(self, count):
        self.params, self.outputs = [None] * count, [None] * count
        self.inbound, self.layer_writes = [None] * count, [[] for _ in range(count)]
        self.writes, self.initial, self.values = {}, {}, {}


def replay(calls, layers, values, index_of, names=None, layer_names=None, given=None) -> Replayed:
    """Build the graph of ``calls`` (``walk``'s order) from ``values`` (``{id(input): (train, infer)}``).

    Each layer's first call builds its parameters (``index_of(place)`` names them: ``W{index}``),
    later calls share them; with ``given`` (parameters per layer) every call applies those.
    ``names`` (``{id(input): name}``) and ``layer_names`` give each layer's inbound names.
    """
    place = {id(layer): i for i, layer in enumerate(layers)}
    out = Replayed(len(layers))
    out.values.update(values)
    names = dict(names or {})
    first = [None] * len(layers)
    results = {}  # id(first output) -> (train, infer) tuples of a call with several outputs
    for t in calls:
        if t.layer is None:
            continue
        k, layer = place[id(t.layer)], t.layer
        if t.index:  # output k of a call with several: picked from the call's results
            train, infer = results[id(t.inputs[0])]
            out.values[id(t)] = (train[t.index], infer[t.index])
            if layer_names is not None:
                names[id(t)] = f"{layer_names[k]}[{t.index}]"
            continue
        parts = [out.values[id(p)] for p in t.inputs]
        h = [a for a, _ in parts] if t.many else parts[0][0]
        h_infer = [b for _, b in parts] if t.many else parts[0][1]
        if given is not None:
            out.values[id(t)] = (layer.apply(given[k], h), layer.apply(given[k], h_infer))
        elif out.params[k] is None:
            built = layer.build_both(index_of(k), h, h_infer)
            out.params[k], out.outputs[k] = built.params, built.train
            out.inbound[k] = [names.get(id(p), "?") for p in t.inputs]
            out.layer_writes[k] = list(built.writes)
            first[k] = t
            out.writes.update(built.writes)
            out.initial.update(built.initial)
            out.values[id(t)] = (built.train, built.infer)
        else:  # a shared layer's later call: the same parameters on another input
            check_shared(layer, first[k].inputs, t.inputs)
            out.values[id(t)] = (layer.apply(out.params[k], h), layer.apply(out.params[k], h_infer))
        train, infer = out.values[id(t)]
        if isinstance(train, tuple):  # several outputs: the first is this tensor's value
            results[id(t)] = (train, infer)
            out.values[id(t)] = (train[0], infer[0])
            if out.outputs[k] is train:
                out.outputs[k] = train[0]
        if layer_names is not None:
            names[id(t)] = layer_names[k]
    return out


__all__ = ["Input", "SymbolicTensor", "call_layer", "check_graph", "replay", "structure", "unique_names", "walk"]
