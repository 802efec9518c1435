"""Seeing what symdl derives and trains: models and expressions drawn as SVG, derivations as
MathML, results as rich notebook displays. A stage after ``nn``.

* ``layout``   a layered left-to-right layout of a DAG (longest-path layers, crossing reduction,
               edges routed around the boxes through dummy nodes);
* ``svg``      ``Drawing`` (SVG text, ``save``, notebook display) and ``render``;
* ``graphs``   ``plot_model(model)`` and ``draw(expression)``;
* ``mathml``   presentation MathML of symdl expressions (browsers render it natively, offline);
* ``rich``     mimebundles (text/plain, text/latex, text/html) for explanations, proofs,
               gradient checks, model summaries and histories.
"""
from .. import registry as _registry
from . import graphs, layout, mathml, rich, svg
from .graphs import draw, plot_model
from .svg import Drawing

# The classes' ``_repr_mimebundle_`` look their display up in ``symdl.registry.DISPLAYS`` (an
# earlier stage cannot import this one); filled here once that table exists.
if isinstance(getattr(_registry, "DISPLAYS", None), _registry.RuleTable):
    rich.install(_registry.DISPLAYS)

__all__ = ["Drawing", "draw", "graphs", "layout", "mathml", "plot_model", "rich", "svg"]
