"""Recurrent layers with Keras 3's names, arguments, defaults and weight layouts: ``SimpleRNN``,
``LSTM``, ``GRU`` and ``Bidirectional``.

Each layer is ``XP = X W`` (``kernel (features, k·units)``, one product for every step), then one
scan node over the steps (``ops.recurrence``) with ``recurrent_kernel (units, k·units)`` and
``bias``: ``(k·units,)`` (LSTM, SimpleRNN), ``(2, 3·units)`` for the GRU (``reset_after=True``: the
input bias and the recurrent bias, the latter inside the reset gate's product, PyTorch's form).
Gate order as Keras stores them: LSTM ``i, f, c, o``; GRU ``z, r, h``.

>>> import symdl as sd
>>> x = sd.nn.Input(shape=(5, 3))
>>> sd.nn.LSTM(4)(x), sd.nn.GRU(4, return_sequences=True)(x)
(<SymbolicTensor shape=(None, 4) from LSTM>, <SymbolicTensor shape=(None, 5, 4) from GRU>)
>>> sd.nn.Bidirectional(sd.nn.SimpleRNN(2))(x)
<SymbolicTensor shape=(None, 4) from Bidirectional>

``return_state=True`` returns Keras's list: the output, then the final states (``h``; the LSTM's
``h, c``; a ``Bidirectional``'s forward states, then its backward ones):

>>> out, h, c = sd.nn.LSTM(4, return_sequences=True, return_state=True)(x)
>>> out
<SymbolicTensor shape=(None, 5, 4) from LSTM>
>>> c
<SymbolicTensor shape=(None, 4) from LSTM, output 2>
>>> len(sd.nn.Bidirectional(sd.nn.GRU(2, return_state=True))(x))
3
>>> sd.nn.LSTM(4)(sd.nn.Input(shape=(3,)))
Traceback (most recent call last):
...
ValueError: LSTM layer 1 needs sequences (None, steps, features), got (None, 3): give the model sd.nn.Input(shape=(steps, features))
"""
from __future__ import annotations

import zlib

import numpy as np

from ..graph.nodes import param
from ..ops.concat import Cols, concat
from ..ops.embedding import sequence_length
from ..ops.recurrence import gru_cell, last_step, lstm_cell, scan, simple_rnn_cell
from ..run.pipeline import glorot_uniform
from .layers import Built, Layer, _layer


def orthogonal(rng, shape):
    """Keras's ``Orthogonal`` initializer: a random orthogonal matrix (rows or columns orthonormal)."""
    rows, cols = shape
    a = rng.normal(size=(max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    return q if rows >= cols else q.T


class _Recurrent(Layer):
    """The shared part of ``SimpleRNN``, ``LSTM`` and ``GRU``: ``gates`` blocks of ``units`` columns."""

    gates = 1
    merge_bias = False  # GRU: a (2, k·u) bias, its second row inside the cell

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 return_sequences=False, return_state=False, go_backwards=False, name=None):
        kind = type(self).__name__
        if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(f"{kind}: units must be a positive integer, got {units!r}")
        self.units, self.use_bias, self.name = int(units), bool(use_bias), name
        self.return_sequences, self.return_state = bool(return_sequences), bool(return_state)
        self.go_backwards = bool(go_backwards)
        self.activation, self.recurrent_activation = activation, recurrent_activation
        self.cell = self.make_cell()  # raises on unknown activations

    def make_cell(self):
        raise NotImplementedError

    def where(self, index) -> str:
        return f"{type(self).__name__} layer {index}" + (f" {self.name!r}" if self.name else "")

    def _sequences(self, h, where) -> int:
        T = sequence_length(h)
        if T is None:
            raise ValueError(f"{where} needs sequences (None, steps, features), got (None, {h.shape[1]}): give the "
                             "model sd.nn.Input(shape=(steps, features))")
        return T

    def make_params(self, index, features):
        ku = self.gates * self.units
        params = [param(f"kernel{index}", (features, ku)), param(f"recurrent_kernel{index}", (self.units, ku))]
        if self.use_bias:
            params.append(param(f"bias{index}", (2, ku) if self.merge_bias else ku))
        return params

    def initial(self, index, params) -> dict:
        """Keras's initializers: glorot_uniform kernel, orthogonal recurrent kernel, zero bias
        (LSTM's ``unit_forget_bias``: ones for the forget gate)."""
        rng = np.random.default_rng(zlib.crc32(f"{index}_recurrent".encode()))
        W, U = params[:2]
        out = {str(W.name): glorot_uniform(rng, W.value_shape), str(U.name): orthogonal(rng, U.value_shape)}
        if self.use_bias:
            b = params[2]
            out[str(b.name)] = self.initial_bias(np.zeros(b.value_shape))
        return out

    def initial_bias(self, b):
        return b

    def run(self, params, h, where, *, reverse_in=None, reverse_out=False, sequences=None):
        """The layer's output on ``h`` (``Bidirectional`` runs its backward copy with ``reverse_out``);
        with ``return_state`` the tuple ``(output, h_T)`` (LSTM: ``(output, h_T, c_T)``), each final
        state the scan's state block after the last processed step (``last_step`` of its columns)."""
        T = self._sequences(h, where)
        features = int(params[0].shape[0])
        if int(h.shape[1]) != features:
            raise ValueError(f"{where}: its kernel takes {features} features per step, got sequences "
                             f"(None, {T}, {h.shape[1]})")
        W, U = params[:2]
        B = params[2] if self.use_bias else None
        reverse_in = self.go_backwards if reverse_in is None else reverse_in
        S = scan(self.cell, h @ W, U, B, T, reverse_in=reverse_in, reverse_out=reverse_out, where=where)
        u = self.units
        out = Cols(S, 0, u) if self.cell.states > 1 else S
        sequences = self.return_sequences if sequences is None else sequences
        last = last_step(out, T, first=reverse_out)  # the last processed step: row 0 when stored reversed
        result = out if sequences else last
        if not self.return_state:
            return result
        states = [last_step(Cols(S, c * u, (c + 1) * u), T, first=reverse_out) for c in range(1, self.cell.states)]
        return (result, last, *states)

    def build_both(self, index, h, h_infer) -> Built:
        where = self.where(index)
        T = self._sequences(h, where)
        params = self.make_params(index, int(h.shape[1]))
        out = self.run(params, h, where)
        infer = out if h_infer == h else self.run(params, h_infer, where)
        del T
        return Built(params, out, infer, {}, self.initial(index, params))

    def apply(self, params, h):
        return self.run(params, h, type(self).__name__ + (f" {self.name!r}" if self.name else ""))

    def describe(self) -> str:
        seq = ", sequences" if self.return_sequences else ""
        back = ", backwards" if self.go_backwards else ""
        state = ", states" if self.return_state else ""
        return f"{self.units} units{seq}{back}{state}"

    def config(self, name=None) -> dict:
        return {"units": self.units, "activation": self.activation, "recurrent_activation": self.recurrent_activation,
                "use_bias": self.use_bias, "return_sequences": self.return_sequences, "return_state": self.return_state,
                "go_backwards": self.go_backwards, "name": name or self.name}


@_layer
class SimpleRNN(_Recurrent):
    """Keras's ``SimpleRNN``: ``h_t = activation(x_t W + h_{t-1} U + b)``."""

    kind = "simple_rnn"
    gates = 1

    def __init__(self, units, activation="tanh", use_bias=True, return_sequences=False, return_state=False,
                 go_backwards=False, name=None):
        super().__init__(units, activation, None, use_bias, return_sequences, return_state, go_backwards, name)

    def make_cell(self):
        return simple_rnn_cell(self.activation)

    def config(self, name=None) -> dict:
        cfg = super().config(name)
        del cfg["recurrent_activation"]
        return cfg


@_layer
class LSTM(_Recurrent):
    """Keras's ``LSTM`` (gates ``i, f, c, o``; states ``h`` and ``c``)."""

    kind = "lstm"
    gates = 4

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 unit_forget_bias=True, return_sequences=False, return_state=False, go_backwards=False, name=None):
        self.unit_forget_bias = bool(unit_forget_bias)
        super().__init__(units, activation, recurrent_activation, use_bias, return_sequences, return_state,
                         go_backwards, name)

    def make_cell(self):
        return lstm_cell(self.activation, self.recurrent_activation)

    def initial_bias(self, b):
        if self.unit_forget_bias:
            b[self.units: 2 * self.units] = 1.0
        return b

    def config(self, name=None) -> dict:
        return {**super().config(name), "unit_forget_bias": self.unit_forget_bias}


@_layer
class GRU(_Recurrent):
    """Keras's ``GRU`` with ``reset_after=True`` (gates ``z, r, h``; ``bias`` ``(2, 3·units)``: the input
    bias, then the recurrent bias added inside the reset gate's product)."""

    kind = "gru"
    gates = 3
    merge_bias = True

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 return_sequences=False, return_state=False, go_backwards=False, reset_after=True, name=None):
        if not reset_after:
            raise NotImplementedError("GRU: only reset_after=True (Keras 3's default, PyTorch's form) is supported")
        super().__init__(units, activation, recurrent_activation, use_bias, return_sequences, return_state,
                         go_backwards, name)

    def make_cell(self):
        return gru_cell(self.activation, self.recurrent_activation)

    def config(self, name=None) -> dict:
        return {**super().config(name), "reset_after": True}


MERGE_MODES = ("concat", "sum", "mul", "ave")


@_layer
class Bidirectional(Layer):
    """Keras's ``Bidirectional(layer, merge_mode="concat")``: the layer forward and a copy of it over
    the reversed sequence (its own weights, ``forward_*`` and ``backward_*``), the backward outputs
    aligned with the forward ones. ``merge_mode``: ``"concat"``, ``"sum"``, ``"mul"``, ``"ave"``."""

    kind = "bidirectional"

    def __init__(self, layer, merge_mode="concat", name=None):
        if isinstance(layer, dict) and layer.get("class") in ("SimpleRNN", "LSTM", "GRU"):  # a saved config
            layer = {"SimpleRNN": SimpleRNN, "LSTM": LSTM, "GRU": GRU}[layer["class"]](**layer.get("config", {}))
        if not isinstance(layer, _Recurrent):
            raise TypeError(f"Bidirectional wraps a recurrent layer (SimpleRNN, LSTM, GRU), got {layer!r}")
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"Bidirectional: merge_mode must be one of {MERGE_MODES}, got {merge_mode!r}")
        self.layer, self.merge_mode, self.name = layer, merge_mode, name

    def make_params(self, index, features):
        fwd = self.layer.make_params(f"{index}_forward", features)
        bwd = self.layer.make_params(f"{index}_backward", features)
        return fwd + bwd

    def _halves(self, params):
        half = len(params) // 2
        return params[:half], params[half:]

    def sublayer_names(self) -> tuple:
        """Keras's names of the two copies: ``forward_<layer name>`` and ``backward_<layer name>`` (an
        unnamed layer by its kind, as Keras names the first one: ``forward_lstm``)."""
        name = self.layer.name or self.layer.kind
        return tuple(f"{d}_{name.removeprefix(d + '_')}" for d in ("forward", "backward"))

    def weight_roles(self, params) -> dict:
        """``{parameter name: its Keras path within this layer}``: ``forward_lstm/kernel``,
        ``backward_lstm/recurrent_kernel``... (``weights.weight_names`` puts the layer's name first)."""
        roles = ("kernel", "recurrent_kernel", "bias")
        return {str(p.name): f"{sub}/{role}" for sub, half in zip(self.sublayer_names(), self._halves(params))
                for p, role in zip(half, roles)}

    def run(self, params, h, where):
        fwd, bwd = self._halves(params)
        # Keras: the backward copy reads the other way round and its steps are flipped back to align
        gb = self.layer.go_backwards
        a = self.layer.run(fwd, h, where, reverse_in=gb, reverse_out=False)
        b = self.layer.run(bwd, h, where, reverse_in=not gb, reverse_out=True)
        if not self.layer.return_state:
            return self.merge(a, b)
        # Keras: [merged output, the forward layer's final states..., the backward layer's...]
        return (self.merge(a[0], b[0]), *a[1:], *b[1:])

    def merge(self, a, b):
        if self.merge_mode == "concat":
            return concat(a, b)
        if self.merge_mode == "sum":
            return a + b
        if self.merge_mode == "mul":
            from ..graph.nodes import hadamard

            return hadamard(a, b)
        return (a + b) * 0.5

    def build_both(self, index, h, h_infer) -> Built:
        where = f"Bidirectional layer {index}" + (f" {self.name!r}" if self.name else "")
        self.layer._sequences(h, where)
        params = self.make_params(index, int(h.shape[1]))
        out = self.run(params, h, where)
        infer = out if h_infer == h else self.run(params, h_infer, where)
        fwd, bwd = self._halves(params)
        initial = {**self.layer.initial(f"{index}_forward", fwd), **self.layer.initial(f"{index}_backward", bwd)}
        return Built(params, out, infer, {}, initial)

    def apply(self, params, h):
        return self.run(params, h, "Bidirectional")

    def describe(self) -> str:
        return f"{type(self.layer).__name__} {self.layer.describe()}, {self.merge_mode}"

    def config(self, name=None) -> dict:
        return {"layer": {"class": type(self.layer).__name__, "config": self.layer.config()},
                "merge_mode": self.merge_mode, "name": name or self.name}


__all__ = ["GRU", "LSTM", "SimpleRNN", "Bidirectional", "orthogonal"]
