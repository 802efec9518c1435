"""Stage 7, running a graph: derive, lower, compile, call.

* ``pipeline``  ``compile`` (a training step) and ``value_and_grad``;
* ``higher``    ``hessian``, ``hvp``, ``jacobian``;
* ``proofs``    ``prove`` (SymPy scalar oracle) and ``check_grad`` (finite differences);
* ``validate``  the arrays a user passes, checked against the graph before anything runs.
"""
from . import higher, pipeline, proofs, validate  # noqa: F401
