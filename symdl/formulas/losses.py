"""Losses as formulas, with PyTorch's default reductions (so numbers compare one for one).

Every loss returns a (1, 1) expression; ``n`` (the batch size) appears in the divisor.

>>> import symdl as sd
>>> z = sd.input("z", 1); y = sd.input("y", 1)
>>> print(sd.losses.bce_with_logits(z, y))
sum(softplus(z) - z⊙y)/n
"""
from __future__ import annotations

import sympy as sp

from ..graph.nodes import RowLogSumExp, ShapeMismatch, SumAll, SumCols, elementwise, hadamard, mean, name_of, shape_text
from .activations import Softplus
from ..registry import Registry

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
    d = sp.Integer(int(delta)) if float(delta).is_integer() else sp.Float(delta)  # |r| - 1/2, not 1.0*|r| - 0.5

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
def softmax_cross_entropy(logits, target, *, rows_sum_to_one: bool = True):
    """Mean over the batch of ``-Σ_j y_j log softmax(z)_j`` (``torch.nn.CrossEntropyLoss()``).

    By default the targets are distributions: every row of ``target`` sums to one (one-hot
    labels, as the training API feeds them, or class probabilities, label smoothing). The loss
    is then written with that fact, ``Σ_rows (logsumexp(z) - z·y) / n``, and its gradient is the
    textbook ``δ = (softmax(Z) - y)/n``. ``rows_sum_to_one=False`` gives the general form,
    ``Σ y (logsumexp(z) - z) / n``, for targets of any row sum (its gradient carries the row
    sums: ``(sum_cols(y)⊙softmax(Z) - y)/n``); on distributions the two agree. Both are stable
    for any logit (log-sum-exp subtracts the row max).

    >>> import symdl as sd
    >>> z = sd.input("z", 3); y = sd.input("y", 3); W = sd.param("W", (3, 3))
    >>> print(sd.losses.softmax_cross_entropy(z @ W, y))
    sum(logsumexp(z*W) - sum_cols((z*W)⊙y))/n
    >>> e = str(sd.explain(sd.losses.softmax_cross_entropy(z @ W, y), [W]))
    >>> print(next(line for line in e.splitlines() if line.startswith("  δ1")))
      δ1 = (softmax(Z1) - y)/n
    """
    _same_shape(logits, target, "softmax_cross_entropy")
    rows = logits.shape[0]
    if rows_sum_to_one:
        per_row = elementwise(lambda l, s: l - s, RowLogSumExp(logits), SumCols(hadamard(logits, target)))
        return elementwise(lambda s: s / rows, SumAll(per_row))
    per_entry = elementwise(lambda z, y, l: y * (l - z), logits, target, RowLogSumExp(logits))
    return elementwise(lambda s: s / rows, SumAll(per_entry))


def get(name: str):
    """A loss by name: ``get("mse")``."""
    return LOSSES.get(name)
