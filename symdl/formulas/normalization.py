"""Batch and layer normalisation, built from the graph's own nodes.

Both are plain graphs of sums and elementwise formulas, so their gradients come from the
chain rule like everything else (no hand-written backward pass), and lower to the kernels
every backend already has. For statistics over axis ``a`` (the batch for batch norm, the
features for layer norm) of ``Z``:

    μ = sum_a(Z)/N      σ = sqrt(sum_a((Z − μ)²)/N + ε)      x̂ = (Z − μ)/σ      out = γ ⊙ x̂ + β

(biased variance, as PyTorch's ``batch_norm(training=True)`` and ``layer_norm``).
``running_writes`` turns the batch statistics into graph writes of running averages
(as optimizer state is written), and ``batch_norm_inference`` reads them.

>>> import symdl as sd
>>> z = sd.input("z", 3); g = sd.param("g", 3); b = sd.param("b", 3)
>>> parts = batch_norm_parts(z, g, b)
>>> print(parts.mean)
sum_rows(z)/n
>>> print(parts.sigma)
sqrt(sum_rows((z - (sum_rows(z)/n))**2)/n + 1.0e-5)
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import sympy as sp

from ..graph.nodes import (
    Param, ShapeMismatch, State, SumCols, SumRows, VectorParam, elementwise, make_map, n as N, name_of, shape_text, VARS,
)


class Normalized(NamedTuple):
    """A normalisation's output and its named intermediates (μ, the biased variance, σ, x̂), and
    ``count``: how many values each statistic is over (``n`` rows of features; ``n·h·w`` pixels of an
    image batch, whose channels are its columns)."""

    out: object
    mean: object
    var: object
    sigma: object
    xhat: object
    count: object = N


#: Names ``sd.explain`` gives the intermediates of each normalisation: ``{node: name}``.
#: Filled as normalisations are built; a node is a SymPy object, so equal graphs share an entry.
ROLES: dict = {}

#: What ``sd.explain`` needs to print a normalisation's input adjoint in textbook form,
#: ``δZ = (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))/σ`` with ``g = ∂L/∂x̂ = γ ⊙ δy``:
#: ``{x̂ node: NormSource}``, filled as normalisations are built.
SOURCES: dict = {}


class NormSource(NamedTuple):
    """A normalisation's input ``z``, its ``σ``, the axis its statistics run over (``"rows"``: the
    batch, batch norm; ``"cols"``: each row's features, layer norm) and the nodes that read ``z``
    (the sum behind μ and the centring ``z − μ``)."""

    z: object
    sigma: object
    axis: str
    readers: tuple


def _check(what, z, gamma, beta, eps):
    if not isinstance(z, sp.MatrixExpr):
        raise TypeError(f"{what} normalises a matrix expression, got {z!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"{what}: eps must be a number > 0, got {eps!r}")
    m = z.shape[1]
    for label, p in (("gamma", gamma), ("beta", beta)):
        ok = isinstance(p, VectorParam) and p.shape[1] == m
        if not ok:
            got = f"{name_of(p)} of shape {_value_shape(p)}" if isinstance(p, sp.MatrixExpr) else repr(p)
            raise ShapeMismatch(f"{what} of {name_of(z)} {shape_text(z)}: {label} must be a vector parameter "
                                f"of its {m} features (sd.param(name, {m})), got {got}")


def _value_shape(p):
    if isinstance(p, Param):
        shape = p.value_shape
        return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")
    return shape_text(p)


def _normalize(z, gamma, beta, eps, axis) -> Normalized:
    total, count = (SumRows, z.shape[0]) if axis == 0 else (SumCols, z.shape[1])
    eps = sp.Float(eps)
    summed = total(z)
    mean = elementwise(lambda s: s / count, summed)
    centred = z - mean
    var = elementwise(lambda s: s / count, total(elementwise(lambda c: c**2, centred)))
    sigma = elementwise(lambda v: sp.sqrt(v + eps), var)
    xhat = elementwise(lambda c, s: c / s, centred, sigma)
    out = elementwise(lambda x, g, b: g * x + b, xhat, gamma, beta, op="normalisation")
    ROLES.update({mean: "μ", sigma: "σ", xhat: "x̂"})
    SOURCES[xhat] = NormSource(z, sigma, "rows" if axis == 0 else "cols", (summed, centred))
    return Normalized(out, mean, var, sigma, xhat, count)


def batch_norm_parts(z, gamma, beta, eps=1e-5) -> Normalized:
    """Batch normalisation in training mode with its intermediates (statistics over the batch: its
    ``n`` rows, or for images ``(n·h·w, c)`` each channel's ``n·h·w`` values, as ``BatchNorm2d``).

    >>> import symdl as sd
    >>> parts = batch_norm_parts(sd.input("x", (4, 4, 3)), sd.param("g", 3), sd.param("b", 3))
    >>> parts.count, parts.mean.shape
    (16*n, (1, 3))
    """
    _check("batch_norm", z, gamma, beta, eps)
    return _normalize(z, gamma, beta, eps, axis=0)


def batch_norm(z, gamma, beta, eps=1e-5):
    """Batch normalisation, training mode: per feature, the batch mean and biased variance.

    ``z`` is ``(n, m)``; ``gamma`` and ``beta`` are vector parameters of size ``m``. As
    ``torch.nn.functional.batch_norm(z, None, None, gamma, beta, training=True, eps=eps)``.

    >>> import symdl as sd
    >>> z = sd.input("z", 4)
    >>> sd.batch_norm(z, sd.param("g", 3), sd.param("b", 4))
    Traceback (most recent call last):
    ...
    symdl.graph.nodes.ShapeMismatch: batch_norm of z (n, 4): gamma must be a vector parameter of its 4 features (sd.param(name, 4)), got g of shape (3,)
    """
    return batch_norm_parts(z, gamma, beta, eps).out


def layer_norm_parts(z, gamma, beta, eps=1e-5) -> Normalized:
    """Layer normalisation with its intermediates (statistics over each row's features)."""
    _check("layer_norm", z, gamma, beta, eps)
    return _normalize(z, gamma, beta, eps, axis=1)


def layer_norm(z, gamma, beta, eps=1e-5):
    """Layer normalisation: each row normalised by its own mean and biased variance.

    As ``torch.nn.functional.layer_norm(z, (m,), gamma, beta, eps)``; the same in
    training and inference.
    """
    return layer_norm_parts(z, gamma, beta, eps).out


def batch_norm_inference(z, gamma, beta, mean, var, eps=1e-5):
    """Batch normalisation with fixed statistics (inference): ``γ ⊙ (z − mean)/sqrt(var + ε) + β``.

    ``mean`` and ``var`` are ``(1, m)`` leaves (the running statistics, ``graph.State``).
    """
    _check("batch_norm", z, gamma, beta, eps)
    for label, s in (("mean", mean), ("var", var)):
        if not isinstance(s, sp.MatrixExpr) or tuple(s.shape) != (1, z.shape[1]):
            raise ShapeMismatch(f"batch_norm of {name_of(z)} {shape_text(z)}: the running {label} must be "
                                f"(1, {z.shape[1]}), got {s!r}")
    eps = sp.Float(eps)
    return elementwise(lambda x, mu, v, g, b: g * (x - mu) / sp.sqrt(v + eps) + b, z, mean, var, gamma, beta,
                       op="batch_norm")


def running_states(prefix: str, features: int) -> tuple:
    """The ``(mean, var)`` ``State`` leaves of a batch norm's running statistics."""
    return State(f"moving_mean__{prefix}", 1, features), State(f"moving_var__{prefix}", 1, features)


def running_writes(parts: Normalized, mean_state, var_state, momentum=0.99) -> dict:
    """Graph writes updating running statistics from a training-mode batch norm's ``parts``.

    ``new = momentum * running + (1 - momentum) * batch``, with the *unbiased* batch variance
    (``N/(N-1)`` times the biased one, ``N`` the values each statistic is over: ``n`` rows, or
    ``n·h·w`` pixels of images), as Keras (``momentum``) and PyTorch's ``BatchNorm1d`` and
    ``BatchNorm2d`` (their ``momentum`` is ``1 - momentum``) do.

    >>> import symdl as sd
    >>> parts = batch_norm_parts(sd.input("x", (4, 4, 3)), sd.param("g", 3), sd.param("b", 3))
    >>> mean, var = State("m", 1, 3), State("v", 1, 3)
    >>> print(running_writes(parts, mean, var, 0.9)[var])  # 0.1 · 16n/(16n - 1) · the biased variance
    1.6*n*(sum_rows((x - (sum_rows(x)/(16*n)))**2)/(16*n))/(16*n - 1) + 0.9*v
    """
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
        raise ValueError(f"batch norm: momentum must be a number in [0, 1), got {momentum!r}")
    m = sp.Float(momentum)
    count = parts.count
    unbiased = count / sp.Max(count - 1, 1)  # one value has no spread: keep the biased 0, not 0/0
    return {
        mean_state: make_map(m * VARS[0] + (1 - m) * VARS[1], [mean_state, parts.mean]),
        var_state: make_map(m * VARS[0] + (1 - m) * unbiased * VARS[1], [var_state, parts.var]),
    }


__all__ = ["batch_norm", "batch_norm_parts", "layer_norm", "layer_norm_parts", "batch_norm_inference",
           "running_states", "running_writes", "Normalized", "NormSource", "ROLES", "SOURCES"]
