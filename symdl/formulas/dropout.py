"""Randomness inside the compiled step: a counter-based uniform and inverted dropout.

A dropout mask is not an array that Python draws each step: it is part of the formula.
``UniformHash(seed, t, key, i, j)`` is a uniform number in ``[0, 1)`` computed from a hash
(murmur3's 32-bit finaliser, chained over the arguments) of the run's seed, the step count
``t``, a per-layer ``key`` and the entry's loop indices ``(i, j)``. The forward and the
backward pass evaluate the same formula at the same entry, so they see the same mask;
every backend computes the same 32 bits (``formulas.scalars`` declares its code), so NumPy,
CPU and CUDA draw identical masks; and a resumed run (same seed, same ``t``) draws the
masks the uninterrupted run drew. ``seed`` and ``t`` are runtime scalars: nothing
recompiles between steps.

>>> import symdl as sd
>>> h = sd.dropout(sd.input("x", 3), 0.5, key=1)
>>> print(h)
2*x⊙Heaviside(u1[i, j] - 1/2, 1)
>>> sd.dropout(sd.input("x", 3), 0.0) == sd.input("x", 3)     # rate 0: exactly the identity
True
"""
from __future__ import annotations

import itertools
import numbers

import sympy as sp

from ..graph.nodes import COL_INDEX, ROW_INDEX, STEP, elementwise, name_of, shape_text

#: The run's random seed: a runtime scalar of the compiled step (``compile(seed=...)``,
#: ``Model.compile(seed=...)``, ``value_and_grad(seed=...)``).
SEED = sp.Symbol("seed", real=True)

_keys = itertools.count(1)


class UniformHash(sp.Function):
    """``U(seed, t, key, i, j)``: a uniform in ``[0, 1)``, a pure function of its arguments.

    Its value is ``fmix32`` chained over the five arguments (each taken modulo 2³²), times
    2⁻³²; ``formulas.scalars.UNIFORM_HASH`` (and its NumPy twin) is the one definition the
    backends print.
    """

    nargs = 5
    is_real = True
    is_nonnegative = True

    def fdiff(self, argindex=1):
        return sp.Integer(0)  # piecewise constant in every argument

    def _sympystr(self, printer):
        return f"u{printer._print(self.args[2])}[{printer._print(self.args[3])}, {printer._print(self.args[4])}]"

    def _latex(self, printer):
        return r"u^{(%s)}_{%s %s}" % tuple(printer._print(a) for a in self.args[2:])


def uniform(key: int):
    """The uniform ``U(seed, t, key, i, j)`` at the entry a formula computes (a scalar expression)."""
    return UniformHash(SEED, STEP, sp.Integer(key), ROW_INDEX, COL_INDEX)


def check_rate(rate, what="dropout") -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise ValueError(f"{what}: rate must be a number in [0, 1) (the fraction of entries dropped), got {rate!r}")
    return float(rate)


def dropout(h, rate, *, key: int | None = None):
    """Inverted dropout: each entry kept with probability ``1 - rate`` and scaled by ``1/(1 - rate)``.

    The mask is drawn inside the compiled step from ``(seed, t, key, i, j)`` (see the module
    docstring); ``key`` tells two dropouts apart (default: a new one per call). Rate 0 is
    exactly the identity. For inference, leave the dropout out: it is the identity there.

    >>> import symdl as sd
    >>> sd.dropout(sd.input("x", 2), 1.0)
    Traceback (most recent call last):
    ...
    ValueError: dropout: rate must be a number in [0, 1) (the fraction of entries dropped), got 1.0
    """
    rate = check_rate(rate)
    if not isinstance(h, sp.MatrixExpr):
        raise TypeError(f"dropout applies to a matrix expression, got {h!r}")
    if rate == 0:
        return h
    if key is None:
        key = next(_keys)
    if not (isinstance(key, numbers.Integral) and key >= 0):
        raise ValueError(f"dropout of {name_of(h)} {shape_text(h)}: key must be an integer >= 0, got {key!r}")
    # the rate as the exact decimal it was written as: 1/(1 - 2/5) prints as 5/3, which every
    # backend evaluates to the correctly rounded double (a 15-digit Float would not be)
    r = sp.Rational(repr(rate))
    keep = sp.Heaviside(uniform(int(key)) - r, 1)  # U >= rate: kept with probability 1 - rate
    return elementwise(lambda a: a * keep / (1 - r), h, op="dropout")


__all__ = ["SEED", "STEP", "UniformHash", "uniform", "dropout", "check_rate"]
