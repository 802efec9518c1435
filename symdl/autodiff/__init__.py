"""Stage 3, derivatives: reverse mode, forward mode and their explanations.

* ``vjp``      one vector-Jacobian rule per node type (the ``VJP`` table), ``grad``, ``adjoints``;
* ``jvp``      one Jacobian-vector rule per node type (the ``JVP`` table), for Hessian-vector products;
* ``explain``  textbook backpropagation: named δ terms, ``explain`` and ``explain_hvp``.

The package re-exports ``vjp``: ``from symdl.autodiff import VJP, grad`` works.
"""
from . import vjp  # noqa: F401
from .vjp import *  # noqa: F401,F403
from .vjp import VJP, adjoints, grad  # noqa: F401
