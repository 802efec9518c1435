"""Stage 1, the graph: SymPy matrix expressions and the few nodes symdl adds to them.

* ``nodes``     symbols, leaves (``input``, ``param``), elementwise maps, broadcasts, sums, traversal;
* ``printing``  text, pretty and LaTeX printing rules for every node;
* ``simplify``  fusion of nested maps and the few rewrites derivation needs.

The package re-exports ``nodes``: ``from symdl.graph import Input, n`` works.
"""
from . import nodes, printing, simplify  # noqa: F401 - printing fills the print rules
from .nodes import *  # noqa: F401,F403
from .nodes import __all__  # noqa: F401
