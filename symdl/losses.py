"""Losses as formulas, with PyTorch's default reductions (so numbers compare one for one).

Every loss returns a (1, 1) expression; ``n`` (the batch size) appears in the divisor.

>>> import symdl as sd
>>> z = sd.input("z", 1); y = sd.input("y", 1)
>>> print(sd.losses.bce_with_logits(z, y))
sum(-z⊙y + softplus(z))/n
"""
from __future__ import annotations

import sympy as sp

from .expr import RowLogSumExp, ShapeMismatch, SumAll, _name, _shape_str, elementwise, mean
from .functions import softplus_f


def _same_shape(pred, target, loss):
    if tuple(pred.shape) != tuple(target.shape):
        raise ShapeMismatch(
            f"{loss}: prediction {_name(pred)} {_shape_str(pred)} and target {_name(target)} "
            f"{_shape_str(target)} must have the same shape"
        )


def mse(pred, target):
    """Mean squared error over all elements (``torch.nn.MSELoss()``)."""
    _same_shape(pred, target, "mse")
    return mean(elementwise(lambda p, t: (p - t) ** 2, pred, target))


def mae(pred, target):
    """Mean absolute error over all elements; subgradient ``sign(p - t)``, 0 at 0."""
    _same_shape(pred, target, "mae")
    return mean(elementwise(lambda p, t: sp.Abs(p - t), pred, target))


def huber(pred, target, delta: float = 1.0):
    """Huber loss, mean over all elements (``torch.nn.HuberLoss(delta=1.0)``)."""
    _same_shape(pred, target, "huber")
    d = sp.Float(delta)

    def h(p, t):
        r = p - t
        return sp.Piecewise((r**2 / 2, sp.Abs(r) < d), (d * (sp.Abs(r) - d / 2), True))

    return mean(elementwise(h, pred, target))


def bce_with_logits(logits, target):
    """Binary cross-entropy on logits, ``mean(softplus(z) - y z)``: finite for any logit."""
    _same_shape(logits, target, "bce_with_logits")
    return mean(elementwise(lambda z, y: softplus_f(z) - y * z, logits, target))


def softmax_cross_entropy(logits, target):
    """Mean over the batch of ``-Σ_j y_j log softmax(z)_j`` (``target`` one-hot or probabilities).

    Written as ``Σ_j y_j (logsumexp(z) - z_j)``: stable for any logit.
    """
    _same_shape(logits, target, "softmax_cross_entropy")
    per_entry = elementwise(lambda z, y, l: y * (l - z), logits, target, RowLogSumExp(logits))
    rows = logits.shape[0]
    return elementwise(lambda s: s / rows, SumAll(per_entry))


def get(name: str):
    """A loss by name: ``get("mse")``."""
    table = {f.__name__: f for f in (mse, mae, huber, bce_with_logits, softmax_cross_entropy)}
    if name not in table:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(table)}")
    return table[name]
