"""The two table idioms symdl uses everywhere: names -> things, and node types -> rules.

``Registry`` maps names to objects (activations, losses, optimizers, initializers,
backends); an unknown name is a ``ValueError`` listing the known ones.
``RuleTable`` maps a class to a rule (vector-Jacobian rules, lowering rules,
printing rules); a subclass inherits its base class's rule unless it has its own.

>>> losses = Registry("loss")
>>> @losses.register("half")
... def half(x): return x / 2
>>> losses.get("half")(4)
2.0
>>> losses.get("twice")
Traceback (most recent call last):
...
ValueError: unknown loss 'twice'; known: half
"""
from __future__ import annotations


class Registry(dict):
    """``{name: object}`` with a ``register`` decorator and a ``get`` that explains misses."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str | None = None):
        """Decorator: ``@registry.register("name")`` (the object's ``__name__`` by default)."""

        def add(obj):
            self[name or obj.__name__] = obj
            return obj

        return add

    def get(self, name):  # noqa: D102 - a dict.get that raises
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r}; known: {', '.join(self)}")
        return self[name]


class RuleTable(dict):
    """``{node type: rule}``; ``table.rule(T1, T2)`` registers, ``table.lookup(node)`` finds by MRO."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def rule(self, *types):
        def register(fn):
            for t in types:
                self[t] = fn
            return fn

        return register

    def lookup(self, node):
        for cls in type(node).__mro__:
            if cls in self:
                return self[cls]
        raise NotImplementedError(f"{self.stage}: no rule for {type(node).__name__} (in {node})")

    def has(self, node) -> bool:
        return any(cls in self for cls in type(node).__mro__)


#: ``{class: bundle(obj, include, exclude)}``: how a result shows itself in a notebook. The classes
#: (explanations, proofs, models, histories) live in stages before ``symdl.show``, which fills this
#: table when ``symdl`` is imported; their ``_repr_mimebundle_`` calls ``rich_display``.
DISPLAYS = RuleTable("rich display")


def rich_display(obj, include=None, exclude=None):
    """``obj``'s mimebundle (text/plain, text/latex, text/html) from ``DISPLAYS``, or None (IPython
    then shows its ``repr``)."""
    return DISPLAYS.lookup(obj)(obj, include, exclude) if DISPLAYS.has(obj) else None
