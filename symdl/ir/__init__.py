"""Stage 4, the kernel program: typed kernels, the checker, and lowering from the graph.

* ``kernels``   the IR: ``Program``, ``Gemm``, ``Elementwise``, ``Reduction``, ``Update``, image kernels, ``check``;
* ``lowering``  graph -> program, one ``LOWER`` rule per node type.

The package re-exports ``kernels``: ``from symdl.ir import Program`` works.
"""
from . import kernels  # noqa: F401
from .kernels import *  # noqa: F401,F403
