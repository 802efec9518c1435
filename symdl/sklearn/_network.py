"""The network behind the estimators: its graph, scikit-learn's update rules, a pool of steps.

A scikit-learn MLP is ``x → act(x W1 + b1) → … → z = h Wk + bk`` with an output link
(softmax, logistic or identity) and scikit-learn's loss: the batch's sample-weighted mean
of each row's loss (summed over the outputs, halved for squared error) plus
``alpha/2 · Σ W² / Σ w``. Both batch-dependent factors enter as data, so one compiled step
serves every ``alpha`` and every batch:

* ``sw`` (n, 1): the batch's sample weights divided by their sum (``1/n`` each without weights);
* ``reg`` (n, 1): ``alpha / (2 Σw)`` in row 0, zeros below (its sum is the coefficient);
* ``l1c`` (n, 1): ``l1 / Σw`` the same way, only in graphs built with an L1 term.

>>> import symdl as sd
>>> spec = NetworkSpec((2, 3, 1), "tanh", "logistic", "sgd", nesterov=False, l1=False)
>>> loss, params, data = build_graph(spec)
>>> print(loss)
sum(sw⊙(softplus(tanh(x*W1 + b1)*W2 + b2) - (y⊙(tanh(x*W1 + b1)*W2 + b2)))) + sum(reg)⊙sum(W1**2) + sum(reg)⊙sum(W2**2)
>>> for line in ScikitSGD(0.1).formulas(): print(line)
u ← -g*lr + momentum*u
p ← -g*lr + momentum*u + p
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import sympy as sp
from scipy.special import expit

import symdl as sd
from symdl.formulas.optimizers import Optimizer

#: scikit-learn's activation names -> symdl's (None: identity).
SKLEARN_ACTIVATIONS = {"identity": None, "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}


class ScikitAdam(Optimizer):
    """scikit-learn's Adam: ``p ← p − lr·√(1−β2ᵗ)/(1−β1ᵗ) · m/(√v + ε)``.

    Not ``torch.optim.Adam``: scikit-learn adds ε to ``√v`` before the bias correction.
    """

    state = ("m", "v")
    hyper = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}

    def update(self, p, g, s, h, t):
        m = h["beta1"] * s["m"] + (1 - h["beta1"]) * g
        v = h["beta2"] * s["v"] + (1 - h["beta2"]) * g**2
        rate = h["lr"] * sp.sqrt(1 - h["beta2"] ** t) / (1 - h["beta1"] ** t)
        return {"m": m, "v": v}, p - rate * m / (sp.sqrt(v) + h["eps"])


class ScikitSGD(Optimizer):
    """scikit-learn's SGD with momentum: ``u ← μu − lr·g``, ``p ← p + u``.

    ``lr`` may change between epochs (invscaling, adaptive): the velocity ``u`` keeps
    the learning rate it was built with, as in scikit-learn.
    """

    state = ("u",)
    hyper = {"momentum": 0.9}

    def update(self, p, g, s, h, t):
        u = h["momentum"] * s["u"] - h["lr"] * g
        return {"u": u}, p + u


class ScikitNesterov(ScikitSGD):
    """scikit-learn's Nesterov momentum: ``u ← μu − lr·g``, ``p ← p + μu − lr·g``."""

    def update(self, p, g, s, h, t):
        u = h["momentum"] * s["u"] - h["lr"] * g
        return {"u": u}, p + (h["momentum"] * u - h["lr"] * g)


@dataclass(frozen=True)
class NetworkSpec:
    """Everything that changes the compiled step (hyper-parameters that do not are runtime values)."""

    layer_units: tuple  # (n_features, hidden..., n_outputs)
    activation: str  # a symdl activation name, or "identity"
    output: str  # "softmax", "logistic" or "identity"
    solver: str  # "adam" or "sgd"
    nesterov: bool = False
    l1: bool = False
    backend: str = "numpy"
    dtype: str = "float64"


def hidden_activation(name):
    """The symdl function for a hidden activation name (scikit-learn's or symdl's), or None."""
    if callable(name):
        return sd.functions.get(name)
    if name in SKLEARN_ACTIVATIONS:
        name = SKLEARN_ACTIVATIONS[name]
        return None if name is None else sd.functions.get(name)
    if isinstance(name, str):
        return sd.functions.get(name)  # raises ValueError naming the known activations
    raise ValueError(f"activation must be a name or a function from sd.activation, got {name!r}")


def build_graph(spec: NetworkSpec):
    """``(loss, params, data term)`` for ``spec``; the output link is part of the loss."""
    units = spec.layer_units
    x, y = sd.input("x", units[0]), sd.input("y", units[-1])
    sw, reg = sd.input("sw", 1), sd.input("reg", 1)
    act = hidden_activation(spec.activation)
    h, params, kernels = x, [], []
    for i, (fan_in, fan_out) in enumerate(zip(units[:-1], units[1:]), start=1):
        W, b = sd.param(f"W{i}", (fan_in, fan_out)), sd.param(f"b{i}", fan_out)
        params += [W, b]
        kernels.append(W)
        h = h @ W + b
        if i < len(units) - 1 and act is not None:
            h = act(h)
    z = h
    if spec.output == "softmax":  # Σ_j −y_j log softmax(z)_j, per row
        per_row = -sd.hadamard(y, sd.log_softmax(z))
    elif spec.output == "logistic":  # binary log-loss from logits, summed over the outputs
        per_row = sd.softplus(z) - sd.hadamard(y, z)
    elif spec.output == "identity":
        # Half the squared error summed over the outputs: the gradient scikit-learn takes
        # (``delta = p - y``). Its reported loss averages over the outputs instead, which
        # ``reported_loss`` restores from the data term.
        per_row = (z - y) ** 2 * sp.Rational(1, 2)
    else:
        raise ValueError(f"unknown output link {spec.output!r}")
    data = sd.total(sd.hadamard(sw, per_row))
    loss = data
    # One term per layer, so the printed loss reads Σ_k α/2‖W_k‖² / Σw.
    for W in kernels:
        loss = loss + sd.total(reg) * sd.l2(W)
    if spec.l1:
        l1c = sd.input("l1c", 1)
        for W in kernels:
            loss = loss + sd.total(l1c) * sd.l1(W)
    return loss, params, data


def needs_data_term(spec: NetworkSpec) -> bool:
    """Whether the reported loss differs from the trained one (multi-output regression)."""
    return spec.output == "identity" and spec.layer_units[-1] > 1


def reported_loss(spec: NetworkSpec, step, loss: float) -> float:
    """scikit-learn's batch loss: for several regression outputs, the data term's mean over them."""
    if not needs_data_term(spec):
        return loss
    data = float(step.output("data").reshape(-1)[0])
    return loss - data + data / spec.layer_units[-1]


def make_optimizer(spec: NetworkSpec) -> Optimizer:
    if spec.solver == "adam":
        return ScikitAdam(1e-3)
    return ScikitNesterov(0.1) if spec.nesterov else ScikitSGD(0.1)


def build_step(spec: NetworkSpec):
    loss, params, data = build_graph(spec)
    outputs = {"data": data} if needs_data_term(spec) else None
    return sd.compile(loss, params, optimizer=make_optimizer(spec), backend=spec.backend, dtype=spec.dtype,
                      outputs=outputs)


# --------------------------------------------------------------------------- the pool

_POOL: dict = {}
_LOCK = threading.Lock()
_IDLE_PER_SPEC = 2


@contextmanager
def borrowed_step(spec: NetworkSpec):
    """A compiled step for ``spec``, for the caller's exclusive use until the block ends.

    Steps live in this process only (never in an estimator, never pickled): a returned
    step is kept for the next fit of the same architecture, so grid searches and
    cross-validation derive and load each network once. Whoever borrows a step loads
    every parameter and state array it reads (``load_state_dict``).
    """
    with _LOCK:
        idle = _POOL.get(spec)
        step = idle.pop() if idle else None
    if step is None:
        step = build_step(spec)
    try:
        yield step
    finally:
        with _LOCK:
            idle = _POOL.setdefault(spec, [])
            if len(idle) < _IDLE_PER_SPEC:
                idle.append(step)


def clear_pool() -> None:
    """Forget every pooled step (the on-disk compile cache stays)."""
    with _LOCK:
        _POOL.clear()


# --------------------------------------------------------------------------- prediction

_NUMPY_ACTIVATIONS = {
    None: lambda z: z,
    "relu": lambda z: np.maximum(z, 0),
    "tanh": np.tanh,
    "sigmoid": expit,
}


def numpy_activation(name):
    """The hidden activation as a NumPy function (symdl's own formula for custom ones)."""
    act = hidden_activation(name)
    key = None if act is None else act.__name__
    if key in _NUMPY_ACTIVATIONS:
        return _NUMPY_ACTIVATIONS[key]
    t = sp.Symbol("t", real=True)
    body = sd.functions.expand_activations(act.function(t), use_impl=True)
    return sp.lambdify(t, body, modules=["scipy", "numpy"])


def forward(X, coefs, intercepts, activation, output) -> np.ndarray:
    """The network's output (probabilities for classifiers) in float64, from NumPy arrays."""
    act = numpy_activation(activation)
    h = X
    last = len(coefs) - 1
    for i, (W, b) in enumerate(zip(coefs, intercepts)):
        h = h @ W.astype(np.float64, copy=False) + b.astype(np.float64, copy=False)
        h = np.asarray(h)
        if i < last:
            h = act(h)
    if output == "softmax":
        h = np.exp(h - h.max(axis=1, keepdims=True))
        h /= h.sum(axis=1, keepdims=True)
    elif output == "logistic":
        h = expit(h)
    return h
