"""Merge layers (Keras 3's ``Add``, ``Subtract``, ``Multiply``, ``Average``, ``Maximum``, ``Minimum``,
``Concatenate``) and global pooling (``GlobalAveragePooling2D``, ``GlobalMaxPooling2D``).

A merge layer is called on a list of tensors of one shape and has no parameters; its output is
an elementwise formula of its inputs, so a residual block's ``Add`` is a node whose operands'
adjoints are the incoming δ, one per branch.

>>> import symdl as sd
>>> x = sd.nn.Input(shape=(4,))
>>> sd.nn.Add()([sd.nn.Dense(4)(x), x])
<SymbolicTensor shape=(None, 4) from Add>
>>> sd.nn.Maximum()([x, sd.nn.Dense(3)(x)])
Traceback (most recent call last):
...
ValueError: Maximum: its inputs have shapes (None, 4) and (None, 3); Maximum takes tensors of one shape
"""
from __future__ import annotations

import sympy as sp

from ..graph.nodes import elementwise
from ..ops.concat import concat
from ..ops.conv import avg_pool2d, flatten, image_shape, max_pool2d
from . import functional
from .functional import label, shape_text
from .layers import Built, Layer, _layer


def _shape(h):
    return image_shape(h) or (int(h.shape[1]),)


class _Merge(Layer):
    """A parameter-free layer over a list of tensors of one shape: ``formula(*scalars)`` entry by entry."""

    merges = True
    arity = None  # how many inputs it takes (None: two or more)

    def __init__(self, name=None):
        self.name = name

    def check(self, hs):
        what = type(self).__name__
        if self.arity is not None and len(hs) != self.arity:
            raise ValueError(f"{label(self)}: {what} takes exactly {self.arity} inputs, got {len(hs)}")
        if len(hs) < 2:
            raise ValueError(f"{label(self)}: {what} takes a list of at least 2 inputs, got {len(hs)}")

    def apply(self, params, hs):
        self.check(hs)
        shapes = [_shape(h) for h in hs]
        if len(set(shapes)) > 1:
            raise ValueError(f"{label(self)}: its inputs have shapes {' and '.join(map(shape_text, shapes))}; "
                             f"{type(self).__name__} takes tensors of one shape")
        return elementwise(self.formula, *hs, op=self.kind)

    def build_both(self, index, hs, hs_infer) -> Built:
        return Built([], self.apply([], hs), self.apply([], hs_infer))

    def config(self, name=None) -> dict:
        return {"name": name or self.name}


@_layer
class Add(_Merge):
    """The sum of its inputs (a skip connection: ``Add()([x, f(x)])``, or ``f(x) + x``)."""

    kind = "add"
    formula = staticmethod(lambda *v: sp.Add(*v))


@_layer
class Subtract(_Merge):
    """``a - b`` of exactly two inputs ``[a, b]``."""

    kind, arity = "subtract", 2
    formula = staticmethod(lambda a, b: a - b)


@_layer
class Multiply(_Merge):
    """The elementwise product of its inputs (a gate: ``Multiply()([h, sigmoid_gate])``)."""

    kind = "multiply"
    formula = staticmethod(lambda *v: sp.Mul(*v))


@_layer
class Average(_Merge):
    """The mean of its inputs."""

    kind = "average"
    formula = staticmethod(lambda *v: sp.Add(*v) / len(v))


@_layer
class Maximum(_Merge):
    """The elementwise maximum of its inputs (at a tie the gradient is shared evenly, as PyTorch's)."""

    kind = "maximum"
    formula = staticmethod(lambda *v: sp.Max(*v))


@_layer
class Minimum(_Merge):
    """The elementwise minimum of its inputs (at a tie the gradient is shared evenly, as PyTorch's)."""

    kind = "minimum"
    formula = staticmethod(lambda *v: sp.Min(*v))


@_layer
class Concatenate(_Merge):
    """Its inputs side by side along the last axis (features, or channels of images of one size):
    ``axis=-1`` only (the batch axis and image rows are not concatenated)."""

    kind = "concatenate"

    def __init__(self, axis=-1, name=None):
        super().__init__(name)
        if axis not in (-1,):
            raise ValueError(f"Concatenate: only axis=-1 (the last axis) is supported, got {axis!r}")
        self.axis = axis

    def apply(self, params, hs):
        self.check(hs)
        shapes = [_shape(h) for h in hs]
        if len({s[:-1] for s in shapes}) > 1 or len({len(s) for s in shapes}) > 1:
            raise ValueError(f"{label(self)}: its inputs have shapes {' and '.join(map(shape_text, shapes))}; "
                             "Concatenate joins tensors that differ only in the last axis")
        return concat(*hs)

    def config(self, name=None) -> dict:
        return {"axis": self.axis, "name": name or self.name}


class _GlobalPool(Layer):
    """The mean / maximum over each image's pixels, per channel: images ``(n, h, w, c)`` -> ``(n, c)``."""

    def __init__(self, name=None):
        self.name = name

    def apply(self, params, h):
        image = image_shape(h)
        if image is None:
            raise ValueError(f"{label(self)}: needs images (None, h, w, c), got {shape_text(_shape(h))}")
        return flatten(self.pool(h, image[:2]))

    def config(self, name=None) -> dict:
        return {"name": name or self.name}


@_layer
class GlobalAveragePooling2D(_GlobalPool):
    """Keras's ``GlobalAveragePooling2D``: each channel's mean over the image."""

    kind = "global_average_pooling2d"
    pool = staticmethod(avg_pool2d)


@_layer
class GlobalMaxPooling2D(_GlobalPool):
    """Keras's ``GlobalMaxPooling2D``: each channel's maximum over the image."""

    kind = "global_max_pooling2d"
    pool = staticmethod(max_pool2d)


functional.OPERATORS.update({"+": Add, "-": Subtract, "*": Multiply})

__all__ = ["Add", "Average", "Concatenate", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Maximum", "Minimum",
           "Multiply", "Subtract"]
