"""Training curves with matplotlib (the ``plot`` extra): ``plot_history`` and the live ``PlotLosses``.

One panel per quantity (``loss``, ``accuracy``, ...) against the epoch, the training curve and,
when there is one, the validation curve (``val_loss``) on the same axes. The figure is a
plain ``matplotlib.figure.Figure`` (no pyplot state, nothing shown twice) that renders itself
in a notebook as a PNG.

>>> import matplotlib; matplotlib.use("Agg")
>>> from symdl.nn.fitting import History
>>> h = History({"loss": [1.0, 0.5, 0.25], "val_loss": [1.1, 0.7, 0.5], "lr": [0.1] * 3})
>>> fig = plot_history(h)
>>> [ax.get_title() for ax in fig.axes], [line.get_label() for line in fig.axes[0].lines]
(['loss'], ['loss', 'val_loss'])
"""
from __future__ import annotations

import io
import sys
import warnings

from .callbacks import Callback


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting training curves needs matplotlib: pip install 'symdl[plot]'") from exc

    class CurvesFigure(Figure):
        """A ``Figure`` that a notebook shows as a PNG, whatever matplotlib backend is active."""

        def _repr_png_(self):
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            buffer = io.BytesIO()
            FigureCanvasAgg(self).print_png(buffer)
            return buffer.getvalue()

    return CurvesFigure


def panels(history, metrics=None) -> list:
    """The quantities ``plot_history`` draws, in order: ``loss`` first, then the others; never
    ``lr`` unless asked for, each once whether it was logged for training, validation or both."""
    keys = list(history.history if hasattr(history, "history") else history)
    if metrics is None:
        names = []
        for k in keys:
            base = k[4:] if k.startswith("val_") else k
            if base != "lr" and base not in names:
                names.append(base)
        return sorted(names, key=lambda m: (m != "loss", names.index(m)))
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for m in metrics:
        if m not in keys and f"val_{m}" not in keys:
            raise KeyError(f"plot_history: no {m!r} in the history; it has {sorted(keys)}")
    return metrics


def plot_history(history, metrics=None, path=None, figsize=None, title=None):
    """Plot a ``History`` (or its ``history`` dict): one panel per quantity, train and validation
    curves against the epoch (1-based). Returns the ``Figure``; ``path`` also saves it (the
    format from the extension: .png, .svg, .pdf).

    ``metrics``: the quantities to draw (``"loss"``, ``["loss", "accuracy"]``; default: every
    one logged but the learning rate). A positive loss spanning more than a factor of 100 is
    drawn on a log scale.
    """
    values = history.history if hasattr(history, "history") else dict(history)
    names = panels(values, metrics)
    if not names:
        raise ValueError("plot_history: the history is empty (train with model.fit first)")
    fig = _figure_class()(figsize=figsize or (4.5 * len(names), 3.4), layout="constrained")
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        for key, style in ((name, "-"), (f"val_{name}", "--")):
            if key in values and len(values[key]):
                ys = values[key]
                ax.plot(range(1, len(ys) + 1), ys, style, marker="o" if len(ys) < 30 else None, markersize=3,
                        label=key)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        if name == "loss" and all(v > 0 for k in (name, f"val_{name}") for v in values.get(k, [])):
            span = [v for k in (name, f"val_{name}") for v in values.get(k, [])]
            if span and max(span) / min(span) > 100:
                ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path)
    return fig


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where ``IPython.display`` draws in the page)."""
    if "ipykernel" not in sys.modules or "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class PlotLosses(Callback):
    """Redraw the training curves in the notebook at the end of every ``every``-th epoch, as
    livelossplot does: the cell's previous figure is cleared (``clear_output(wait=True)``) and
    the new one displayed, so the plot grows in place while ``fit`` runs.

    Outside a notebook it draws nothing and warns once (``RuntimeWarning``); ``figure`` is the
    last figure drawn (``None`` until then).
    """

    def __init__(self, metrics=None, every: int = 1, figsize=None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"PlotLosses: every must be an integer >= 1, got {every!r}")
        self.metrics, self.every, self.figsize = metrics, every, figsize
        self.figure = None
        self._warned = False

    def on_train_begin(self, logs=None):
        _figure_class()  # matplotlib missing: say so before training, not after the first epoch
        if not in_notebook() and not self._warned:
            self._warned = True
            warnings.warn("PlotLosses draws in a Jupyter notebook only; outside one it does nothing "
                          "(plot afterwards with model.history.plot(path=...))", RuntimeWarning, stacklevel=2)

    def on_epoch_end(self, epoch, logs=None):
        if not in_notebook() or (epoch + 1) % self.every:
            return
        self.draw()

    def on_train_end(self, logs=None):
        if in_notebook() and self.model is not None and self.model.history.history and self.figure is None:
            self.draw()

    def draw(self):
        """Show the model's history so far in place of the previous drawing."""
        from IPython.display import Image, clear_output, display

        self.figure = plot_history(self.model.history, self.metrics, figsize=self.figsize)
        clear_output(wait=True)
        display(Image(data=self.figure._repr_png_()))


__all__ = ["PlotLosses", "in_notebook", "panels", "plot_history"]
