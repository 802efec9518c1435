"""L1 and L2 penalties: terms of the loss, or (given a number) a regulariser for ``Model.compile``.

>>> import symdl as sd
>>> W = sd.param("W", (2, 2))
>>> print(1e-4 * sd.l2(W))
0.0001*sum(W**2)
>>> sd.l2(1e-4)
l2(0.0001)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import sympy as sp

from ..graph.nodes import MatrixExpr, SumAll, elementwise


@dataclass(frozen=True)
class Regularizer:
    """``coefficient * penalty(W)`` summed over a model's weight matrices."""

    kind: str
    coefficient: float

    def __post_init__(self):
        c = self.coefficient
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not (math.isfinite(c) and c >= 0):
            raise ValueError(f"{self.kind}: the coefficient must be a finite number >= 0, got {c!r}")

    def __call__(self, *params):
        return self.coefficient * _PENALTIES[self.kind](*params)

    def __repr__(self):
        return f"{self.kind}({self.coefficient})"


def _penalty(fn, params):
    if not params or not all(isinstance(p, MatrixExpr) for p in params):
        raise TypeError("pass parameters (sd.param) to penalise, or one number for a regulariser")
    terms = [SumAll(elementwise(fn, p)) for p in params]
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def l1(*params):
    """``Σ|w|`` over ``params``; subgradient ``sign(w)`` (0 at 0). ``l1(1e-4)`` is a regulariser."""
    if len(params) == 1 and isinstance(params[0], numbers.Real):
        return Regularizer("l1", float(params[0]))
    return _penalty(sp.Abs, params)


def l2(*params):
    """``Σw²`` over ``params`` (no 1/2). ``l2(1e-4)`` is a regulariser for ``Model.compile``."""
    if len(params) == 1 and isinstance(params[0], numbers.Real):
        return Regularizer("l2", float(params[0]))
    return _penalty(lambda w: w**2, params)


_PENALTIES = {"l1": l1, "l2": l2}
