"""Optimizers as update formulas: SymPy expressions fused into the compiled step.

Each optimizer states its update for one parameter entry ``p`` with gradient
``g``: the new state values, then the new parameter, in terms of the hyper-parameters
(runtime scalars: change ``opt.lr`` between steps, nothing recompiles) and the step
count ``t`` (1 on the first step).

>>> import symdl as sd
>>> for eq in sd.optim.Adam(1e-3).formulas(): print(eq)
m ← beta1*m + g*(1 - beta1)
v ← beta2*v + g**2*(1 - beta2)
p ← -lr*m/((1 - beta1**t)*(eps + sqrt(v/(1 - beta2**t)))) + p
"""
from __future__ import annotations

import math
import numbers

import sympy as sp

from ..graph.nodes import STEP, VARS, State, make_map
from ..registry import Registry

p, g = sp.symbols("p g", real=True)
t = STEP  # the step count, as the formulas spell it


def state_name(param_name: str, state: str) -> str:
    """The persistent buffer holding optimizer state ``state`` of parameter ``param_name``."""
    return f"{state}__{param_name}"


class Optimizer:
    """Base class: subclasses set ``state`` (names), ``hyper`` (defaults) and ``update``."""

    state: tuple = ()
    hyper: dict = {}

    def __init__(self, lr=1e-2, **hyper):
        values = dict(self.hyper)
        unknown = set(hyper) - set(values)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown hyper-parameter(s) {sorted(unknown)}; known: {sorted(values)}")
        values.update(hyper)
        values["lr"] = lr
        object.__setattr__(self, "values", {k: self._checked(k, v) for k, v in values.items()})

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def _checked(self, name, value) -> float:
        """``value`` as a float, or a ``ValueError`` naming the setting and its allowed range."""
        low, high, what = RANGES.get(name, (None, None, "a finite number"))
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (low is None or low(value)) and (high is None or high(value))
        if not ok:
            raise ValueError(f"{type(self).__name__}: {name} must be {what}, got {value!r}")
        return float(value)

    def __setattr__(self, name, value):
        if name in self.values:
            self.values[name] = self._checked(name, value)  # read by the next step: no recompilation
        else:
            object.__setattr__(self, name, value)

    @property
    def symbols(self) -> dict:
        """Hyper-parameter name -> SymPy symbol (the runtime scalar the kernels read)."""
        return {k: sp.Symbol(k, real=True) for k in self.values}

    def update(self, p, g, s: dict, h: dict, t) -> tuple:
        """``(new_state: dict, new_p)`` as scalar SymPy expressions."""
        raise NotImplementedError

    def rule(self):
        """The update with named symbols: ``([(state name, expr)], new p expr)``."""
        s = {k: sp.Symbol(k, real=True) for k in self.state}
        new_state, new_p = self.update(p, g, s, self.symbols, t)
        return [(k, new_state[k]) for k in self.state], new_p

    def bodies(self) -> tuple:
        """The update over the loop's variables, the same for every parameter:
        ``([(state name, body)], new p body)``, operands ``(p, g, state...)`` then the new state.
        """
        state_rule, p_rule = self.rule()
        old = [p, g] + [sp.Symbol(k, real=True) for k in self.state]
        env = dict(zip(old, VARS))
        states = [(k, e.xreplace(env)) for k, e in state_rule]
        new_vars = {e: VARS[len(old) + i] for i, (_, e) in enumerate(states)}
        return states, p_rule.xreplace(env).xreplace(new_vars)

    def writes(self, param, grad, bodies=None) -> dict:
        """One step for ``param`` as graph writes ``{param or its state: new value}``
        (``bodies``: ``self.bodies()``, computed once for a model's parameters).

        Right-hand sides read the values before the step; the new parameter reads the
        new state through the same nodes, so the loop computes each once.

        >>> import symdl as sd
        >>> W = sd.param("W", (2, 2))
        >>> for leaf, value in Momentum(0.1).writes(W, 2 * W).items(): print(leaf, "<-", value)
        W <- W - lr*(momentum*b__W + 2*W)
        b__W <- momentum*b__W + 2*W
        """
        state_bodies, p_body = bodies or self.bodies()
        states = {k: State(state_name(str(param.name), k), *param.shape) for k in self.state}
        operands = [param, grad] + [states[k] for k in self.state]
        out = {states[k]: make_map(e, operands) for k, e in state_bodies}
        return {param: make_map(p_body, operands + [out[states[k]] for k, _ in state_bodies]), **out}

    def formulas(self) -> list:
        """The update as readable lines ``state ← expr`` and ``p ← expr``.

        State updates are simultaneous; the ``p`` line reads the new state.
        """
        states, new_p = self._readable()
        return [f"{k} ← {sp.sstr(e)}" for k, e in states] + [f"p ← {sp.sstr(new_p)}"]

    def _readable(self):
        states, new_p = self.rule()
        return states, new_p.xreplace({e: sp.Symbol(k, real=True) for k, e in states})

    def latex(self) -> str:
        states, new_p = self._readable()
        rows = [f"{sp.latex(sp.Symbol(k))} &\\leftarrow {sp.latex(e)}" for k, e in states]
        rows.append(f"p &\\leftarrow {sp.latex(new_p)}")
        return "\\begin{aligned}\n" + " \\\\\n".join(rows) + "\n\\end{aligned}"

    def config(self) -> dict:
        return {"name": type(self).__name__, **self.values}

    def __repr__(self):
        args = ", ".join(f"{k}={v:g}" for k, v in self.values.items())
        return f"{type(self).__name__}({args})"


#: The allowed range of each hyper-parameter: ``(lower test, upper test, description)``. A
#: learning rate of 0 is allowed (PyTorch allows it; schedules such as ``cosine_decay`` reach it).
RANGES = {
    "lr": (lambda v: v >= 0, None, "a finite number >= 0"),
    "momentum": (lambda v: v >= 0, None, "a finite number >= 0"),
    "beta1": (lambda v: v >= 0, lambda v: v < 1, "in [0, 1)"),
    "beta2": (lambda v: v >= 0, lambda v: v < 1, "in [0, 1)"),
    "alpha": (lambda v: v >= 0, lambda v: v < 1, "in [0, 1)"),
    "eps": (lambda v: v > 0, None, "a finite number > 0"),
    "weight_decay": (lambda v: v >= 0, None, "a finite number >= 0"),
}


class SGD(Optimizer):
    """``p ← p − lr·g``."""

    def update(self, p, g, s, h, t):
        return {}, p - h["lr"] * g


class Momentum(Optimizer):
    """Heavy ball, as ``torch.optim.SGD(momentum=μ)``: ``b ← μb + g``, ``p ← p − lr·b``."""

    state = ("b",)
    hyper = {"momentum": 0.9}

    def update(self, p, g, s, h, t):
        b = h["momentum"] * s["b"] + g
        return {"b": b}, p - h["lr"] * b


class Nesterov(Optimizer):
    """As ``torch.optim.SGD(momentum=μ, nesterov=True)``: ``b ← μb + g``, ``p ← p − lr(g + μb)``."""

    state = ("b",)
    hyper = {"momentum": 0.9}

    def update(self, p, g, s, h, t):
        b = h["momentum"] * s["b"] + g
        return {"b": b}, p - h["lr"] * (g + h["momentum"] * b)


class Adam(Optimizer):
    """Adam with bias correction (``torch.optim.Adam``)."""

    state = ("m", "v")
    hyper = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}

    def update(self, p, g, s, h, t):
        m = h["beta1"] * s["m"] + (1 - h["beta1"]) * g
        v = h["beta2"] * s["v"] + (1 - h["beta2"]) * g**2
        m_hat = m / (1 - h["beta1"] ** t)
        v_hat = v / (1 - h["beta2"] ** t)
        return {"m": m, "v": v}, p - h["lr"] * m_hat / (sp.sqrt(v_hat) + h["eps"])


class AdamW(Adam):
    """Adam with decoupled weight decay (``torch.optim.AdamW``): ``p ← p(1 − lr·wd) − lr·m̂/(√v̂ + ε)``."""

    hyper = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}

    def update(self, p, g, s, h, t):
        state, _ = super().update(p, g, s, h, t)
        m_hat = state["m"] / (1 - h["beta1"] ** t)
        v_hat = state["v"] / (1 - h["beta2"] ** t)
        return state, p * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * m_hat / (sp.sqrt(v_hat) + h["eps"])


class RMSProp(Optimizer):
    """``torch.optim.RMSprop``: ``v ← αv + (1−α)g²``, ``p ← p − lr·g/(√v + ε)``."""

    state = ("v",)
    hyper = {"alpha": 0.99, "eps": 1e-8}

    def update(self, p, g, s, h, t):
        v = h["alpha"] * s["v"] + (1 - h["alpha"]) * g**2
        return {"v": v}, p - h["lr"] * g / (sp.sqrt(v) + h["eps"])


class Adagrad(Optimizer):
    """``torch.optim.Adagrad``: ``G ← G + g²``, ``p ← p − lr·g/(√G + ε)``."""

    state = ("G",)
    hyper = {"eps": 1e-10}

    def update(self, p, g, s, h, t):
        G = s["G"] + g**2
        return {"G": G}, p - h["lr"] * g / (sp.sqrt(G) + h["eps"])


OPTIMIZERS = Registry("optimizer")
for _cls in (SGD, Momentum, Nesterov, Adam, AdamW, RMSProp, Adagrad):
    OPTIMIZERS.register()(_cls)


#: Learning rates of optimizers named by a string (``Model.compile(optimizer="adam")``): Keras's
#: defaults. Every other hyper-parameter keeps the class default.
DEFAULT_LR = {"SGD": 1e-2, "Momentum": 1e-2, "Nesterov": 1e-2, "Adam": 1e-3, "AdamW": 1e-3, "RMSProp": 1e-3,
              "Adagrad": 1e-3}


def lookup(name: str) -> type:
    """An optimizer class by name, in any case: ``lookup("adam") is Adam``."""
    if isinstance(name, str):
        for known in OPTIMIZERS:
            if known.lower() == name.lower():
                return OPTIMIZERS[known]
    return OPTIMIZERS.get(name)  # raises, listing the known names


def get(optimizer) -> Optimizer:
    """An optimizer instance, or a name (any case) for one with default hyper-parameters.

    >>> get("adam")
    Adam(beta1=0.9, beta2=0.999, eps=1e-08, lr=0.001)
    """
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        cls = lookup(optimizer)
        return cls(DEFAULT_LR.get(cls.__name__, 1e-2))
    raise TypeError(f"optimizer must be an sd.optim optimizer or a name such as 'adam', got {optimizer!r}")


def from_config(config: dict) -> Optimizer:
    """Rebuild an optimizer from ``Optimizer.config()`` (used by checkpoints)."""
    config = dict(config)
    cls = OPTIMIZERS.get(config.pop("name"))
    return cls(config.pop("lr"), **config)
