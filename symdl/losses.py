"""Losses as formulas, with PyTorch's default reductions (so numbers compare one for one).

Every loss returns a (1, 1) expression; ``n`` (the batch size) appears in the divisor.

>>> import symdl as sd
>>> z = sd.input("z", 1); y = sd.input("y", 1)
>>> print(sd.losses.bce_with_logits(z, y))
sum(-z⊙y + softplus(z))/n
"""
from __future__ import annotations

import sympy as sp

from .graph import RowLogSumExp, ShapeMismatch, SumAll, name_of, shape_text, elementwise, mean
from .functions import Softplus
from .registry import Registry

#: Losses by name, for ``Model.compile(loss=...)``. Each entry's ``targets`` says what the
#: training API feeds it: ``"classes"`` (integer labels, one-hot encoded), ``"binary"`` (0/1)
#: or ``"regression"`` (real targets).
LOSSES = Registry("loss")


def register(name: str, targets: str):
    """Decorator adding a loss to ``LOSSES``; ``targets`` is "classes", "binary" or "regression"."""
    if targets not in ("classes", "binary", "regression"):
        raise ValueError(f"targets must be 'classes', 'binary' or 'regression', got {targets!r}")

    def add(fn):
        fn.targets = targets
        return LOSSES.register(name)(fn)

    return add


def _same_shape(pred, target, loss):
    if tuple(pred.shape) != tuple(target.shape):
        raise ShapeMismatch(
            f"{loss}: prediction {name_of(pred)} {shape_text(pred)} and target {name_of(target)} "
            f"{shape_text(target)} must have the same shape"
        )


@register("mse", targets="regression")
def mse(pred, target):
    """Mean squared error over all elements (``torch.nn.MSELoss()``)."""
    _same_shape(pred, target, "mse")
    return mean(elementwise(lambda p, t: (p - t) ** 2, pred, target))


@register("mae", targets="regression")
def mae(pred, target):
    """Mean absolute error over all elements; subgradient ``sign(p - t)``, 0 at 0."""
    _same_shape(pred, target, "mae")
    return mean(elementwise(lambda p, t: sp.Abs(p - t), pred, target))


@register("huber", targets="regression")
def huber(pred, target, delta: float = 1.0):
    """Huber loss, mean over all elements (``torch.nn.HuberLoss(delta=1.0)``)."""
    _same_shape(pred, target, "huber")
    d = sp.Float(delta)

    def h(p, t):
        r = p - t
        return sp.Piecewise((r**2 / 2, sp.Abs(r) < d), (d * (sp.Abs(r) - d / 2), True))

    return mean(elementwise(h, pred, target))


@register("bce_with_logits", targets="binary")
def bce_with_logits(logits, target):
    """Binary cross-entropy on logits, ``mean(softplus(z) - y z)``: finite for any logit."""
    _same_shape(logits, target, "bce_with_logits")
    return mean(elementwise(lambda z, y: Softplus(z) - y * z, logits, target))


@register("softmax_cross_entropy", targets="classes")
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
    return LOSSES.get(name)
