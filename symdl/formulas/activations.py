"""Elementwise activations: each one a scalar SymPy formula, its derivative from ``sp.diff``.

An activation is a SymPy ``Function`` class whose ``fdiff`` is the derivative
SymPy computes from the formula, rewritten in terms of the activation itself
where that is shorter (σ′ = σ(1−σ), softplus′ = σ). Because the derivative
mentions ``σ(z)``, the backward pass reuses the forward value instead of
recomputing it (see ``grad``: the forward node is substituted for ``σ(z)``).

``impl`` is the form backends evaluate; it may differ from ``formula`` for
numerical stability (softplus as ``max(t, 0) + log1p(exp(-|t|))``).

>>> import symdl as sd, sympy as sp
>>> t = sp.Symbol("t", real=True)
>>> sp.diff(sd.functions.sigmoid(t), t)
(1 - sigmoid(t))*sigmoid(t)
>>> mish = sd.activation("mish", lambda t: t * sp.tanh(sp.log(1 + sp.exp(t))))
>>> print(mish(sd.input("x", 3)))
mish(x)
"""
from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from ..graph.nodes import MatrixExpr, RowLogSumExp, elementwise
from ..registry import Registry
from .scalars import DECOMPOSED, SCALARS, printable

_t = sp.Symbol("t", real=True)


class Activation(sp.Function):
    """Base class of named elementwise functions; subclasses come from ``define``."""

    nargs = 1
    formula_body: sp.Expr = None  # in terms of _t
    impl_body: sp.Expr = None  # what backends evaluate, in terms of _t
    derivative_body: sp.Expr = None  # in terms of _t and the class itself

    def fdiff(self, argindex=1):
        return self.derivative_body.xreplace({_t: self.args[0]})

    def _eval_is_real(self):
        return self.args[0].is_real

    def formula(self) -> sp.Expr:
        """The defining formula with this application's argument."""
        return self.formula_body.xreplace({_t: self.args[0]})

    def impl(self) -> sp.Expr:
        return self.impl_body.xreplace({_t: self.args[0]})

    def _latex(self, printer):
        name = getattr(type(self), "latex_name", r"\operatorname{%s}" % type(self).__name__)
        return r"%s\left(%s\right)" % (name, printer._print(self.args[0]))


def check_printable(expr, what: str) -> None:
    """Raise if ``expr`` uses a function no backend can evaluate (one outside ``scalars.SCALARS``
    and ``scalars.DECOMPOSED``); the message names it."""
    for f in expr.atoms(sp.Function, sp.Derivative):
        if isinstance(f, sp.Derivative):
            raise ValueError(f"{what}: its derivative is not explicit ({f}); use functions SymPy can differentiate")
        if isinstance(f, Activation) or printable(type(f)):
            continue
        name = getattr(f.func, "__name__", str(f.func))
        allowed = ", ".join(sorted(fn.__name__ for fn in [*SCALARS, *DECOMPOSED] if issubclass(fn, sp.Function)))
        raise ValueError(f"{what} uses the function {name!r}, which no symdl backend can evaluate (allowed: {allowed})")


def heaviside_at_zero(expr):
    # SymPy's Heaviside(0) is 1/2; PyTorch's relu'(0) is 0. Pick 0 everywhere.
    # (SymPy >= 1.9 stores its default as a second argument: Heaviside(t) is Heaviside(t, 1/2).)
    return expr.replace(lambda e: isinstance(e, sp.Heaviside) and (len(e.args) == 1 or e.args[1] == sp.S.Half),
                        lambda e: sp.Heaviside(e.args[0], 0))


class NamedDerivative(Activation):
    """The derivative of a custom activation, named once: ``mish′(Z)`` in every layer's δ.

    Its formula is the derivative's formula (what backends evaluate, after inlining), and its
    own derivative (for a Hessian) is taken by ``sp.diff`` when first asked for, itself named
    (``mish′′``) when it is more than a function of the activation's value.
    """

    of = None  # the activation class this is the derivative of

    def fdiff(self, argindex=1):
        cls = type(self)
        if cls.derivative_body is None:
            cls.derivative_body = name_derivative(cls, heaviside_at_zero(sp.diff(cls.formula_body, _t)))
        return super().fdiff(argindex)

    def _eval_evalf(self, prec):
        return expand_activations(self.formula(), use_impl=False)._eval_evalf(prec)

    @classmethod
    def definition(cls) -> tuple:
        """``(f′(t), formula in t)``, for a "where" line of an explanation."""
        return cls(_t), cls.formula_body


def name_derivative(cls, d):
    """``d`` (the derivative of activation ``cls``, in ``t``) as a named ``cls′(t)`` when it is
    more than a function of the activation's own value (σ′ = σ(1 − σ) stays inline: it reuses
    the forward value), else ``d`` itself."""
    if _t not in d.xreplace({cls(_t): sp.Dummy()}).free_symbols:
        return d
    base = getattr(cls, "latex_name", r"\operatorname{%s}" % cls.__name__)
    prime = type(cls.__name__ + "′", (NamedDerivative,), {
        "formula_body": d, "impl_body": d, "derivative_body": None, "of": getattr(cls, "of", None) or cls,
        "latex_name": base + "'"})
    return prime(_t)


REGISTRY = Registry("activation")


def define(name, formula, *, impl=None, derivative=None, latex_name=None, register=True):
    """Create the ``Activation`` class for ``formula`` (a callable of one SymPy symbol).

    ``derivative`` (a callable ``(t, f) -> expr`` where ``f`` is the activation
    class) overrides ``sp.diff`` only where a shorter equal form exists; tests check
    it against ``sp.diff`` of the formula.
    """
    body = sp.sympify(formula(_t))
    cls = type(name, (Activation,), {"formula_body": body, "impl_body": sp.sympify(impl(_t)) if impl else body})
    if latex_name:
        cls.latex_name = latex_name
    if derivative is not None:
        d = sp.sympify(derivative(_t, cls))
    else:
        d = heaviside_at_zero(sp.simplify(sp.diff(body, _t)))
        d = d.xreplace({body: cls(_t)}) if body != _t else d
    cls.derivative_body = d
    if register:
        REGISTRY[name] = cls
    return cls


Sigmoid = define(
    "sigmoid", lambda t: 1 / (1 + sp.exp(-t)), derivative=lambda t, f: f(t) * (1 - f(t)), latex_name=r"\sigma"
)
Softplus = define(
    "softplus",
    lambda t: sp.log(1 + sp.exp(t)),
    impl=lambda t: sp.Max(t, 0) + log1p(sp.exp(-sp.Abs(t))),
    derivative=lambda t, f: Sigmoid(t),
)
ReLU = define("relu", lambda t: sp.Max(t, 0), derivative=lambda t, f: sp.Heaviside(t, 0))
LeakyReLU = define(
    "leaky_relu",
    lambda t: sp.Piecewise((t, t > 0), (sp.Float(0.01) * t, True)),
    derivative=lambda t, f: sp.Piecewise((1, t > 0), (sp.Float(0.01), True)),
)
ELU = define(
    "elu",
    lambda t: sp.Piecewise((t, t > 0), (expm1(t), True)),
    derivative=lambda t, f: sp.Piecewise((1, t > 0), (sp.exp(t), True)),
)
GELU = define(
    "gelu",
    lambda t: t / 2 * (1 + sp.erf(t / sp.sqrt(2))),
    derivative=lambda t, f: (1 + sp.erf(t / sp.sqrt(2))) / 2 + t * sp.exp(-t**2 / 2) / sp.sqrt(2 * sp.pi),
)
SiLU = define("silu", lambda t: t * Sigmoid(t), derivative=lambda t, f: Sigmoid(t) * (1 + t * (1 - Sigmoid(t))))
REGISTRY["tanh"] = sp.tanh  # SymPy's own: tanh′ = 1 − tanh² already


def _applier(fn, name):
    def apply(x):
        if not isinstance(x, MatrixExpr):
            return fn(sp.sympify(x))
        return elementwise(fn, x, op=name)

    apply.__name__ = name
    apply.__qualname__ = name
    apply.function = fn
    apply.__doc__ = f"The elementwise ``{name}`` of a matrix expression (a SymPy scalar works too)."
    return apply


sigmoid = _applier(Sigmoid, "sigmoid")
tanh = _applier(sp.tanh, "tanh")
relu = _applier(ReLU, "relu")
leaky_relu = _applier(LeakyReLU, "leaky_relu")
elu = _applier(ELU, "elu")
softplus = _applier(Softplus, "softplus")
gelu = _applier(GELU, "gelu")
silu = _applier(SiLU, "silu")


def activation(name: str, formula, derivative=None):
    """Register a new activation from a scalar formula; returns a function on matrices.

    The derivative is derived by SymPy unless ``derivative`` (a callable of the same
    symbol) gives it: a cheaper equal form, or on purpose a different one (a
    straight-through estimator). ``sd.prove`` and ``sd.check_grad`` report a derivative
    that differs from the formula's. A formula using a function no backend can
    evaluate is rejected, with that function named.

    >>> import sympy as sp
    >>> sq = activation("square_plus", lambda t: (t + sp.sqrt(t**2 + 4)) / 2)
    >>> sq.function.derivative_body            # named once, used by name in every layer's δ
    square_plus′(t)
    >>> sq.function.derivative_body.formula()
    t/(2*sqrt(t**2 + 4)) + 1/2
    >>> ste = activation("sign_ste", sp.sign, derivative=lambda t: 1)   # straight-through
    >>> ste.function.derivative_body
    1
    """
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"activation name must be an identifier, got {name!r}")
    if name in REGISTRY and name in _BUILTIN:
        raise ValueError(f"activation {name!r} is built in; choose another name")
    try:
        body = sp.sympify(formula(_t))
    except Exception as exc:  # the user's formula failed on a SymPy symbol
        raise ValueError(f"activation {name!r}: the formula must accept a SymPy symbol ({exc})") from exc
    _check_formula(name, body)
    check_printable(body, f"activation {name!r}")
    given = None
    if derivative is not None:
        if not callable(derivative):
            raise TypeError(f"activation {name!r}: derivative must be a callable of t, got {derivative!r}")
        try:
            d_body = sp.sympify(derivative(_t))
        except Exception as exc:
            raise ValueError(f"activation {name!r}: the derivative must accept a SymPy symbol ({exc})") from exc
        given = lambda t, f: d_body.xreplace({_t: t})  # noqa: E731
    cls = define(name, lambda t: body.xreplace({_t: t}), derivative=given)
    check_printable(cls.derivative_body, f"activation {name!r} (derivative)")
    cls.derivative_body = name_derivative(cls, cls.derivative_body)  # mish′(Z): one definition, every layer
    return _applier(cls, name)


def _check_formula(name, body) -> None:
    """An activation is a function of its one argument: not a constant, no other symbols."""
    if not isinstance(body, sp.Expr) or isinstance(body, sp.logic.boolalg.Boolean):
        raise ValueError(f"activation {name!r}: the formula must return a SymPy expression, got {body!r}")
    stray = sorted(str(s) for s in body.free_symbols - {_t})
    if stray:
        raise ValueError(
            f"activation {name!r}: the formula uses the symbol(s) {', '.join(stray)} besides its argument "
            f"(its formula is {body}). An activation has one argument: write constants as numbers "
            "(lambda t: t * sp.tanh(0.5 * t)), or use the argument you are given")
    if _t not in body.free_symbols:
        raise ValueError(f"activation {name!r}: the formula is the constant {body}; an activation must depend "
                         "on its argument (lambda t: ...)")


_BUILTIN = frozenset(REGISTRY)


def get(name_or_fn):
    """An activation by name (``"relu"``), or a function returned by ``activation``; None is identity."""
    if name_or_fn is None or name_or_fn == "linear":
        return None
    if callable(name_or_fn) and hasattr(name_or_fn, "function"):
        return name_or_fn
    return _applier(REGISTRY.get(name_or_fn), name_or_fn)


def softmax(z):
    """Row-wise softmax ``exp(Z - logsumexp(Z))`` (stable: the row max is subtracted)."""
    return elementwise(lambda a, l: sp.exp(a - l), z, RowLogSumExp(z), op="softmax")


def log_softmax(z):
    """Row-wise ``Z - logsumexp(Z)``."""
    return elementwise(lambda a, l: a - l, z, RowLogSumExp(z), op="log_softmax")


def expand_activations(expr, *, use_impl: bool) -> sp.Expr:
    """Replace every activation by its ``impl`` (for backends) or its ``formula`` (for oracles)."""
    def rewrite(e):
        return e.impl() if use_impl else e.formula()

    prev = None
    while prev != expr:  # activations may be defined through other activations (silu -> sigmoid)
        prev = expr
        expr = expr.replace(lambda e: isinstance(e, Activation), rewrite)
    return expr
