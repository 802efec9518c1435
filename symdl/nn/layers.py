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
from ..conv import avg_pool2d, conv2d, flatten, image_shape, max_pool2d
from ..graph import param
from ..pipeline import glorot_uniform
from ..registry import Registry

_HE = {"relu", "leaky_relu", "elu", "gelu", "silu"}

#: Kernel initializers by name: ``(rng, shape) -> array``.
INITIALIZERS = Registry("kernel_initializer")
INITIALIZERS.update({
    "glorot_uniform": glorot_uniform,  # the one rule sd.compile uses too
    "he_normal": lambda rng, s: rng.normal(size=s) * math.sqrt(2.0 / math.prod(s[:-1])),  # fan_in
    "zeros": lambda rng, s: np.zeros(s),
})


class Dense:
    """A fully connected layer ``activation(h @ W + b)``.

    (Every layer has ``build(index, h) -> (params, output)``, ``config(name)`` and a ``kind``
    that names it in summaries, ``dense_1``, ``conv2d_2``, ...)

    ``kernel_initializer``: ``"glorot_uniform"``, ``"he_normal"``, ``"zeros"`` or a
    callable ``(rng, shape) -> array``; by default He for the ReLU family, Glorot otherwise.
    """

    kind = "dense"

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
        if image_shape(h) is not None:
            raise ValueError(f"Dense layer {index} gets images {image_shape(h)}: put sd.nn.Flatten() before it")
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


class Conv2D(Dense):
    """A 2-D convolution layer ``activation(conv2d(h, K) + c)`` over NHWC images (Keras's ``Conv2D``).

    ``kernel_size`` and ``strides``: an int or a pair; ``padding``: ``"valid"``, ``"same"`` (Keras)
    or an int / pair. The kernel ``K{index}`` has shape ``(kh, kw, c_in, filters)``, the bias
    ``b{index}`` ``(filters,)``.
    """

    kind = "conv2d"

    def __init__(self, filters: int, kernel_size, strides=1, padding="valid", activation=None, use_bias: bool = True,
                 kernel_initializer=None, name=None):
        if not (isinstance(filters, int) and filters > 0):
            raise ValueError(f"Conv2D: filters must be a positive integer, got {filters!r}")
        super().__init__(filters, activation=activation, use_bias=use_bias, kernel_initializer=kernel_initializer,
                         name=name)
        self.filters = filters
        self.kernel_size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.strides = strides if isinstance(strides, int) else tuple(strides)
        self.padding = padding if isinstance(padding, (int, str)) else tuple(padding)

    def build(self, index: int, h) -> tuple:
        image = image_shape(h)
        if image is None:
            raise ValueError(f"Conv2D layer {index} needs images (n, h, w, c), got {h.shape}: give the model "
                             "input_shape=(h, w, c)")
        K = param(f"K{index}", (*self.kernel_size, image[2], self.filters))
        b = param(f"b{index}", self.filters) if self.use_bias else None
        z = conv2d(h, K, stride=self.strides, padding=self.padding)
        z = z + b if self.use_bias else z
        return [K] + ([b] if self.use_bias else []), (self.activation(z) if self.activation else z)

    def config(self, name=None) -> dict:
        cfg = super().config(name)
        del cfg["units"]
        as_json = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        return {"type": "Conv2D", "filters": self.filters, "kernel_size": list(self.kernel_size),
                "strides": as_json(self.strides), "padding": as_json(self.padding), **cfg}


class _Pool:
    """A pooling layer (no parameters): ``pool_size`` and ``strides`` (default: ``pool_size``)."""

    units = None
    activation_name = None

    def __init__(self, pool_size=2, strides=None, name=None):
        self.pool_size = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        self.strides = strides if strides is None or isinstance(strides, int) else tuple(strides)
        self.name = name

    def build(self, index: int, h) -> tuple:
        return [], self.pool(h, self.pool_size, self.strides)

    def config(self, name=None) -> dict:
        strides = list(self.strides) if isinstance(self.strides, tuple) else self.strides
        return {"type": type(self).__name__, "pool_size": list(self.pool_size), "strides": strides,
                "name": name or self.name}


class MaxPooling2D(_Pool):
    """The maximum over each window (Keras's ``MaxPooling2D``, padding ``"valid"``)."""

    kind = "max_pooling2d"
    pool = staticmethod(max_pool2d)


class AveragePooling2D(_Pool):
    """The mean over each window (Keras's ``AveragePooling2D``, padding ``"valid"``)."""

    kind = "average_pooling2d"
    pool = staticmethod(avg_pool2d)


class Flatten:
    """Images ``(n, h, w, c)`` as rows ``(n, h·w·c)``, row-major over ``(h, w, c)`` (Keras's ``Flatten``)."""

    kind = "flatten"
    units = None
    activation_name = None

    def __init__(self, name=None):
        self.name = name

    def build(self, index: int, h) -> tuple:
        return [], flatten(h)

    def config(self, name=None) -> dict:
        return {"type": "Flatten", "name": name or self.name}


def from_config(cfg: dict):
    """A layer from ``config()`` (a file without ``type`` holds a ``Dense`` layer)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "Dense")
    layers = {"Dense": Dense, "Conv2D": Conv2D, "MaxPooling2D": MaxPooling2D, "AveragePooling2D": AveragePooling2D,
              "Flatten": Flatten}
    if kind not in layers:
        raise ValueError(f"unknown layer type {kind!r}; known: {', '.join(layers)}")
    return layers[kind](**cfg)
