"""Layers: a layer builds its parameters and its output expression, and keeps no graph itself.

``Dense.build(index, h)`` returns ``(params, output)``, so one layer object can serve
several models (each model holds the parameters it built).

>>> import symdl as sd
>>> layer = sd.nn.Dense(3, activation="tanh")
>>> params, out = layer.build(1, sd.input("x", 2))
>>> print(*(p.name for p in params))
W1 b1
>>> print(out)
tanh(x*W1 + b1)
"""
from __future__ import annotations

import math

import numpy as np

from .. import functions
from ..graph import param
from ..pipeline import glorot_uniform
from ..registry import Registry

_HE = {"relu", "leaky_relu", "elu", "gelu", "silu"}

#: Kernel initializers by name: ``(rng, shape) -> array``.
INITIALIZERS = Registry("kernel_initializer")
INITIALIZERS.update({
    "glorot_uniform": glorot_uniform,  # the one rule sd.compile uses too
    "he_normal": lambda rng, s: rng.normal(size=s) * math.sqrt(2.0 / s[0]),
    "zeros": lambda rng, s: np.zeros(s),
})


class Dense:
    """A fully connected layer ``activation(h @ W + b)``.

    ``kernel_initializer``: ``"glorot_uniform"``, ``"he_normal"``, ``"zeros"`` or a
    callable ``(rng, shape) -> array``; by default He for the ReLU family, Glorot otherwise.
    """

    def __init__(self, units: int, activation=None, use_bias: bool = True, kernel_initializer=None, name=None):
        if not (isinstance(units, int) and units > 0):
            raise ValueError(f"Dense: units must be a positive integer, got {units!r}")
        self.units, self.use_bias, self.name = units, use_bias, name
        self.activation = functions.get(activation)  # raises on unknown names
        self.activation_name = None if self.activation is None else self.activation.__name__
        if kernel_initializer is None:
            kernel_initializer = "he_normal" if self.activation_name in _HE else "glorot_uniform"
        if isinstance(kernel_initializer, str):
            INITIALIZERS.get(kernel_initializer)  # raises on unknown names
        self.kernel_initializer = kernel_initializer

    def build(self, index: int, h) -> tuple:
        """``([W, b], output)``: this layer's parameters (``W{index}``, ``b{index}``) and output."""
        W = param(f"W{index}", (int(h.shape[1]), self.units))
        b = param(f"b{index}", self.units) if self.use_bias else None
        z = h @ W + b if self.use_bias else h @ W
        return [W] + ([b] if self.use_bias else []), (self.activation(z) if self.activation else z)

    def init_kernel(self, rng, shape):
        init = self.kernel_initializer
        return init(rng, shape) if callable(init) else INITIALIZERS.get(init)(rng, shape)

    def config(self, name=None) -> dict:
        init = self.kernel_initializer if isinstance(self.kernel_initializer, str) else "glorot_uniform"
        return {"units": self.units, "activation": self.activation_name, "use_bias": self.use_bias,
                "kernel_initializer": init, "name": name or self.name}
