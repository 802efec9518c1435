"""Layers: a layer builds its parameters and its output expression, and keeps no graph itself.

``Dense.build(index, h)`` returns ``(params, output)``, so one layer object can serve
several models (each model holds the parameters it built). Called on a symbolic tensor
(``Dense(8)(x)``, Keras 3's functional API) a layer records the call for ``Model``
(``symdl.nn.functional``); called twice within one model it shares its weights.

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
import zlib

import numpy as np

from typing import NamedTuple

from ..formulas import activations as functions, normalization, dropout as stochastic
from ..ops.conv import Reshape as Rows, avg_pool2d, conv2d, flatten, image_shape, max_pool2d
from ..ops.padding import zero_pad2d
from ..ops.embedding import embedding, position_rows
from ..graph.nodes import State, param
from ..run.pipeline import glorot_uniform
from ..registry import Registry
from .functional import call_layer

_HE = {"relu", "leaky_relu", "elu", "gelu", "silu"}

#: Kernel initializers by name: ``(rng, shape) -> array``.
INITIALIZERS = Registry("kernel_initializer")
INITIALIZERS.update({
    "glorot_uniform": glorot_uniform,  # the one rule sd.compile uses too
    "he_normal": lambda rng, s: rng.normal(size=s) * math.sqrt(2.0 / math.prod(s[:-1])),  # fan_in
    "zeros": lambda rng, s: np.zeros(s),
})


class Built(NamedTuple):
    """What a layer adds to a model: its parameters, its output in the training graph and in the
    inference graph, graph writes of the training step (``{State: expr}``), and starting values
    (``{parameter or state name: array}``) other than the defaults (matrices drawn, vectors zero)."""

    params: list
    train: object
    infer: object
    writes: dict = {}
    initial: dict = {}


#: Layer classes by name (what a checkpoint's ``"class"`` names).
LAYERS = Registry("layer")


def _layer(cls):
    LAYERS[cls.__name__] = cls
    return cls


class Layer:
    """Base of the layers without a weight matrix. ``apply(params, h)`` is the output where it is
    the same in training and inference (layers that differ, dropout and batch norm, override
    ``build_both``); ``make_params(index, features)`` the parameters (none by default)."""

    kind = "layer"  # the default name's stem: ``batch_normalization_2``
    name = None
    merges = False  # whether it is called on a list of tensors (``Add()([a, b])``)
    shareable = True  # whether one object may be called twice, sharing its weights

    def __call__(self, inputs):
        """The functional API: ``Dense(8)(x)`` is a symbolic tensor (``symdl.nn.functional``)."""
        return call_layer(self, inputs)

    def make_params(self, index: int, features: int) -> list:
        return []

    def build_both(self, index: int, h, h_infer) -> Built:
        params = self.make_params(index, int(h.shape[1]))
        return Built(params, self.apply(params, h), self.apply(params, h_infer))

    def build(self, index: int, h) -> tuple:
        """``(params, training output)``, as ``Dense.build``."""
        built = self.build_both(index, h, h)
        return built.params, built.train

    def describe(self) -> str:
        return ""


@_layer
class Activation(Layer):
    """An activation on its own, ``Activation("relu")``: a norm can sit between a Dense and it."""

    kind = "activation"

    def __init__(self, activation, name=None):
        self.activation = functions.get(activation)
        if self.activation is None:
            raise ValueError("Activation: name an activation (e.g. 'relu'), got None")
        self.activation_name, self.name = self.activation.__name__, name

    def apply(self, params, h):
        return self.activation(h)

    def describe(self) -> str:
        return self.activation_name

    def config(self, name=None) -> dict:
        return {"activation": self.activation_name, "name": name or self.name}


@_layer
class Dropout(Layer):
    """Inverted dropout while training (``sd.dropout``, the mask a hash of the model's seed, the
    step count, the layer's index and the entry); the identity in ``predict`` and ``evaluate``."""

    kind = "dropout"
    shareable = False  # one mask per layer

    def __init__(self, rate: float, name=None):
        self.rate, self.name = stochastic.check_rate(rate, "Dropout"), name

    def build_both(self, index, h, h_infer) -> Built:
        return Built([], stochastic.dropout(h, self.rate, key=_mask_key(index)), h_infer)

    def describe(self) -> str:
        return f"rate {self.rate:g}"

    def config(self, name=None) -> dict:
        return {"rate": self.rate, "name": name or self.name}


def _mask_key(index) -> int:
    """A dropout's mask key from its layer index: ``3``, or ``"3_2"`` (layer 2 of a model that is
    layer 3) -> 3 + 2·2^16, distinct for models up to 65,535 layers wide."""
    if isinstance(index, int):
        return index
    key = 0
    for depth, part in enumerate(str(index).split("_")):
        key += int(part) << (16 * depth)
    return key


class _Normalization(Layer):
    def __init__(self, epsilon=1e-3, name=None):
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
            raise ValueError(f"{type(self).__name__}: epsilon must be a number > 0, got {epsilon!r}")
        self.epsilon, self.name = float(epsilon), name

    def make_params(self, index, features):
        return [param(f"gamma{index}", features), param(f"beta{index}", features)]

    def ones(self, params) -> dict:
        return {str(params[0].name): np.ones(params[0].value_shape)}  # γ starts at 1, β at 0


@_layer
class LayerNormalization(_Normalization):
    """``sd.layer_norm`` over each row's features (same in training and inference)."""

    kind = "layer_normalization"

    def apply(self, params, h):
        return normalization.layer_norm(h, *params, eps=self.epsilon)

    def build_both(self, index, h, h_infer) -> Built:
        built = super().build_both(index, h, h_infer)
        return built._replace(initial=self.ones(built.params))

    def config(self, name=None) -> dict:
        return {"epsilon": self.epsilon, "name": name or self.name}


@_layer
class BatchNormalization(_Normalization):
    """``sd.batch_norm`` while training; in ``predict``/``evaluate`` the running statistics.

    The compiled training step also writes ``moving_mean{k}`` and ``moving_var{k}`` (the
    unbiased batch variance): ``new = momentum * old + (1 - momentum) * batch``, as Keras
    (PyTorch's ``BatchNorm1d`` with ``momentum = 1 - momentum``). They start at 0 and 1.
    """

    kind = "batch_normalization"
    shareable = False  # one set of running statistics per layer

    def __init__(self, momentum=0.99, epsilon=1e-3, name=None):
        super().__init__(epsilon, name)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"BatchNormalization: momentum must be a number in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def build_both(self, index, h, h_infer) -> Built:
        m = int(h.shape[1])
        params = self.make_params(index, m)
        parts = normalization.batch_norm_parts(h, *params, eps=self.epsilon)
        mean, var = State(f"moving_mean{index}", 1, m), State(f"moving_var{index}", 1, m)
        writes = normalization.running_writes(parts, mean, var, self.momentum)
        infer = normalization.batch_norm_inference(h_infer, *params, mean, var, eps=self.epsilon)
        return Built(params, parts.out, infer, writes, {**self.ones(params), str(var.name): np.ones(m)})

    def describe(self) -> str:
        return f"momentum {self.momentum:g}"

    def config(self, name=None) -> dict:
        return {"momentum": self.momentum, "epsilon": self.epsilon, "name": name or self.name}


@_layer
class Dense(Layer):
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

    kind = "dense"

    def build(self, index: int, h) -> tuple:
        """``([W, b], output)``: this layer's parameters (``W{index}``, ``b{index}``) and output."""
        if image_shape(h) is not None:
            raise ValueError(f"Dense layer {index} gets images {image_shape(h)}: put sd.nn.Flatten() before it")
        W = param(f"W{index}", (int(h.shape[1]), self.units))
        b = param(f"b{index}", self.units) if self.use_bias else None
        params = [W] + ([b] if self.use_bias else [])
        return params, self.apply(params, h)

    def apply(self, params, h):
        z = h @ params[0] + params[1] if self.use_bias else h @ params[0]
        return self.activation(z) if self.activation else z

    def build_both(self, index: int, h, h_infer) -> Built:
        params, out = self.build(index, h)
        return Built(params, out, out if h_infer == h else self.apply(params, h_infer))

    def describe(self) -> str:
        return self.activation_name or "linear"

    def init_kernel(self, rng, shape):
        init = self.kernel_initializer
        return init(rng, shape) if callable(init) else INITIALIZERS.get(init)(rng, shape)

    def config(self, name=None) -> dict:
        init = self.kernel_initializer if isinstance(self.kernel_initializer, str) else "glorot_uniform"
        return {"units": self.units, "activation": self.activation_name, "use_bias": self.use_bias,
                "kernel_initializer": init, "name": name or self.name}


@_layer
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
        params = [K] + ([b] if self.use_bias else [])
        return params, self.apply(params, h)

    def apply(self, params, h):
        z = conv2d(h, params[0], stride=self.strides, padding=self.padding)
        z = z + params[1] if self.use_bias else z
        return self.activation(z) if self.activation else z

    def config(self, name=None) -> dict:
        cfg = super().config(name)
        del cfg["units"]
        as_json = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        return {"filters": self.filters, "kernel_size": list(self.kernel_size), "strides": as_json(self.strides),
                "padding": as_json(self.padding), **cfg}


class _Pool(Layer):
    """A pooling layer (no parameters): ``pool_size`` and ``strides`` (default: ``pool_size``)."""

    def __init__(self, pool_size=2, strides=None, name=None):
        self.pool_size = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        self.strides = strides if strides is None or isinstance(strides, int) else tuple(strides)
        self.name = name

    def apply(self, params, h):
        return self.pool(h, self.pool_size, self.strides)

    def config(self, name=None) -> dict:
        strides = list(self.strides) if isinstance(self.strides, tuple) else self.strides
        return {"pool_size": list(self.pool_size), "strides": strides, "name": name or self.name}


@_layer
class MaxPooling2D(_Pool):
    """The maximum over each window (Keras's ``MaxPooling2D``, padding ``"valid"``)."""

    kind = "max_pooling2d"
    pool = staticmethod(max_pool2d)


@_layer
class AveragePooling2D(_Pool):
    """The mean over each window (Keras's ``AveragePooling2D``, padding ``"valid"``)."""

    kind = "average_pooling2d"
    pool = staticmethod(avg_pool2d)


@_layer
class Flatten(Layer):
    """Images ``(n, h, w, c)`` as rows ``(n, h·w·c)``, row-major over ``(h, w, c)`` (Keras's ``Flatten``)."""

    kind = "flatten"

    def __init__(self, name=None):
        self.name = name

    def apply(self, params, h):
        return flatten(h)

    def config(self, name=None) -> dict:
        return {"name": name or self.name}


@_layer
class Reshape(Layer):
    """Each sample's values in another shape, row-major as Keras's ``Reshape(target_shape)``:
    ``(features,)`` or images ``(h, w, c)``; one entry may be ``-1`` (inferred). Images are rows
    ``(n·h·w, c)`` and features ``(n, f)``, so a reshape reads the same memory with other rows.

    >>> import symdl as sd
    >>> x = sd.nn.Input(shape=(12,))
    >>> sd.nn.Reshape((2, -1, 3))(x)
    <SymbolicTensor shape=(None, 2, 2, 3) from Reshape>
    """

    kind = "reshape"

    def __init__(self, target_shape, name=None):
        try:
            shape = tuple(int(d) for d in target_shape)
        except (TypeError, ValueError):
            raise ValueError(f"Reshape: target_shape must be a tuple of ints, got {target_shape!r}") from None
        if len(shape) not in (1, 3) or any(d == 0 or d < -1 for d in shape) or shape.count(-1) > 1:
            raise ValueError(f"Reshape: target_shape must be (features,) or (h, w, c) of positive ints (one may be "
                             f"-1), got {target_shape!r}")
        self.target_shape, self.name = shape, name

    def apply(self, params, h):
        image = image_shape(h)
        source = image or (int(h.shape[1]),)
        size = math.prod(source)
        known = math.prod(d for d in self.target_shape if d != -1)
        target = tuple(size // known if d == -1 else d for d in self.target_shape)
        if math.prod(target) != size:
            raise ValueError(f"{type(self).__name__} layer: cannot reshape (None, {', '.join(map(str, source))}) into "
                             f"(None, {', '.join(map(str, self.target_shape))}): {size} values per sample")
        if target == source:
            return h
        samples = h.shape[0] / (image[0] * image[1]) if image else h.shape[0]
        if len(target) == 1:
            return flatten(h) if len(source) == 3 else h
        return Rows(h, samples * target[0] * target[1], target[2], target)

    def config(self, name=None) -> dict:
        return {"target_shape": list(self.target_shape), "name": name or self.name}


@_layer
class ZeroPadding2D(Layer):
    """Keras's ``ZeroPadding2D(padding)``: zeros around images ``(n, h, w, c)``. ``padding``: an int
    (all sides), ``(rows, cols)`` (top and bottom, left and right) or ``((top, bottom), (left, right))``.

    >>> import symdl as sd
    >>> sd.nn.ZeroPadding2D(((1, 0), (2, 1)))(sd.nn.Input(shape=(4, 4, 3)))
    <SymbolicTensor shape=(None, 5, 7, 3) from ZeroPadding2D>
    """

    kind = "zero_padding2d"

    def __init__(self, padding=(1, 1), name=None):
        self.padding, self.name = _pads(padding), name

    def apply(self, params, h):
        if image_shape(h) is None:
            raise ValueError(f"{type(self).__name__} layer: needs images (None, h, w, c), got (None, {h.shape[1]})")
        (top, bottom), (left, right) = self.padding
        return zero_pad2d(h, (top, bottom, left, right))

    def config(self, name=None) -> dict:
        return {"padding": [list(p) for p in self.padding], "name": name or self.name}


def _pads(padding):
    """Keras's padding forms as ``((top, bottom), (left, right))``."""
    def ok(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if ok(padding):
        return ((padding, padding), (padding, padding))
    if isinstance(padding, (tuple, list)) and len(padding) == 2:
        if all(ok(v) for v in padding):
            return ((padding[0], padding[0]), (padding[1], padding[1]))
        if all(isinstance(v, (tuple, list)) and len(v) == 2 and all(ok(u) for u in v) for v in padding):
            return tuple(tuple(v) for v in padding)
    raise ValueError(f"ZeroPadding2D: padding must be an int >= 0, (rows, cols) or ((top, bottom), (left, right)), "
                     f"got {padding!r}")


# --------------------------------------------------------------------------- embeddings

#: Embedding initializers by name (Keras 3's defaults): ``(rng, shape) -> array``.
EMBEDDING_INITIALIZERS = Registry("embeddings_initializer")
EMBEDDING_INITIALIZERS.update({
    "uniform": lambda rng, s: rng.uniform(-0.05, 0.05, size=s),  # keras.initializers.RandomUniform()
    "glorot_uniform": glorot_uniform,
    "normal": lambda rng, s: rng.normal(scale=0.05, size=s),  # keras.initializers.RandomNormal()
    "zeros": lambda rng, s: np.zeros(s),
})


def _positive(value, what, where) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{where}: {what} must be a positive integer, got {value!r}")
    return int(value)


def _initializer(init, where):
    if isinstance(init, str):
        EMBEDDING_INITIALIZERS.get(init)  # raises on unknown names
    elif not callable(init):
        raise ValueError(f"{where}: an initializer is a name or a callable (rng, shape) -> array, got {init!r}")
    return init


def _draw(init, index, shape):
    """A table's first values: the initializer on a generator seeded by the layer's index."""
    rng = np.random.default_rng(zlib.crc32(str(index).encode()))
    return np.asarray(init(rng, shape) if callable(init) else EMBEDDING_INITIALIZERS.get(init)(rng, shape))


def _tokens(h, where):
    from ..graph.nodes import TokenInput

    if not isinstance(h, TokenInput):
        raise ValueError(f"{where} takes token ids: sd.nn.Input(shape=(sequence_length,), dtype=\"int32\"), got a "
                         f"tensor of shape {tuple(h.shape)}")


@_layer
class Embedding(Layer):
    """Token ids ``(n, T)`` to vectors ``(n, T, output_dim)`` (Keras 3's ``Embedding``): row ``ids[b, t]``
    of the weight ``embeddings{index}`` ``(input_dim, output_dim)``, a lookup (O(n·T·d) work) whose
    gradient is a scatter-add. A ``Dense`` after it acts on each token.

    >>> import symdl as sd
    >>> x = sd.nn.Input(shape=(5,), dtype="int32")
    >>> sd.nn.Dense(3)(sd.nn.Embedding(10, 4)(x))
    <SymbolicTensor shape=(None, 5, 3) from Dense>
    """

    kind = "embedding"

    def __init__(self, input_dim, output_dim, embeddings_initializer="uniform", name=None):
        self.input_dim = _positive(input_dim, "input_dim", "Embedding")
        self.output_dim = _positive(output_dim, "output_dim", "Embedding")
        self.embeddings_initializer = _initializer(embeddings_initializer, "Embedding")
        self.name = name

    def where(self, index) -> str:
        return f"Embedding layer {index}" + (f" {self.name!r}" if self.name else "")

    def make_params(self, index, features):
        return [param(f"embeddings{index}", (self.input_dim, self.output_dim))]

    def build_both(self, index, h, h_infer) -> Built:
        _tokens(h, self.where(index))
        params = self.make_params(index, 1)
        out = embedding(params[0], h, where=self.where(index))
        infer = out if h_infer == h else embedding(params[0], h_infer, where=self.where(index))
        E = params[0]
        return Built(params, out, infer, {}, {str(E.name): _draw(self.embeddings_initializer, index, E.value_shape)})

    def apply(self, params, h):
        return embedding(params[0], h, where=f"Embedding {self.name!r}" if self.name else "Embedding")

    def describe(self) -> str:
        return f"{self.input_dim} ids -> {self.output_dim}"

    def config(self, name=None) -> dict:
        init = self.embeddings_initializer if isinstance(self.embeddings_initializer, str) else "uniform"
        return {"input_dim": self.input_dim, "output_dim": self.output_dim, "embeddings_initializer": init,
                "name": name or self.name}


@_layer
class TokenAndPositionEmbedding(Layer):
    """keras-hub's ``TokenAndPositionEmbedding``: a token embedding ``embeddings{index}``
    ``(vocabulary_size, embedding_dim)`` plus a learned position embedding
    ``position_embeddings{index}`` ``(sequence_length, embedding_dim)``; token ``t`` of every sequence
    adds row ``t`` (sequences may be shorter than ``sequence_length``, not longer).

    >>> import symdl as sd
    >>> x = sd.nn.Input(shape=(6,), dtype="int32")
    >>> sd.nn.TokenAndPositionEmbedding(50, 8, 4)(x)
    <SymbolicTensor shape=(None, 6, 4) from TokenAndPositionEmbedding>
    """

    kind = "token_and_position_embedding"

    def __init__(self, vocabulary_size, sequence_length, embedding_dim, embeddings_initializer="uniform",
                 position_initializer="glorot_uniform", name=None):
        where = "TokenAndPositionEmbedding"
        self.vocabulary_size = _positive(vocabulary_size, "vocabulary_size", where)
        self.sequence_length = _positive(sequence_length, "sequence_length", where)
        self.embedding_dim = _positive(embedding_dim, "embedding_dim", where)
        self.embeddings_initializer = _initializer(embeddings_initializer, where)
        self.position_initializer = _initializer(position_initializer, where)
        self.name = name

    def where(self, index) -> str:
        return f"TokenAndPositionEmbedding layer {index}" + (f" {self.name!r}" if self.name else "")

    def make_params(self, index, features):
        return [param(f"embeddings{index}", (self.vocabulary_size, self.embedding_dim)),
                param(f"position_embeddings{index}", (self.sequence_length, self.embedding_dim))]

    def _out(self, params, h, where):
        return embedding(params[0], h, where=where) + position_rows(params[1], h, where=where)

    def build_both(self, index, h, h_infer) -> Built:
        where = self.where(index)
        _tokens(h, where)
        params = self.make_params(index, 1)
        out = self._out(params, h, where)
        infer = out if h_infer == h else self._out(params, h_infer, where)
        E, P = params
        initial = {str(E.name): _draw(self.embeddings_initializer, index, E.value_shape),
                   str(P.name): _draw(self.position_initializer, f"{index}_position", P.value_shape)}
        return Built(params, out, infer, {}, initial)

    def apply(self, params, h):
        return self._out(params, h, "TokenAndPositionEmbedding" + (f" {self.name!r}" if self.name else ""))

    def describe(self) -> str:
        return f"{self.vocabulary_size} ids, {self.sequence_length} positions -> {self.embedding_dim}"

    def config(self, name=None) -> dict:
        as_name = lambda v, d: v if isinstance(v, str) else d  # noqa: E731
        return {"vocabulary_size": self.vocabulary_size, "sequence_length": self.sequence_length,
                "embedding_dim": self.embedding_dim,
                "embeddings_initializer": as_name(self.embeddings_initializer, "uniform"),
                "position_initializer": as_name(self.position_initializer, "glorot_uniform"), "name": name or self.name}
