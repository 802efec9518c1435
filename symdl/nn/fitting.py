"""The fit loop: ``fit`` runs epochs of compiled steps, with callbacks and a ``History``.

The data is checked once, batches come from a seeded order (so a resumed run sees the
same batches), and each batch is one call into the model's compiled step.

>>> print(" | ".join(" ".join(map(str, b)) for b in batches(5, 2, seed=0, epoch=0, shuffle=False)))
0 1 | 2 3 | 4
"""
from __future__ import annotations

import math
import numbers
import sys
import time
import warnings

import numpy as np

from ..registry import Registry

#: Trainers for ``fit(cluster=...)``: ``symdl.distributed`` registers ``"dask"`` when imported
#: (a later stage than this one, so this module never imports it).
DISTRIBUTED = Registry("distributed trainer")


class History:
    """Per-epoch values: ``history.history["loss"]``, ``["val_accuracy"]``, ``["lr"]``..."""

    def __init__(self, history=None):
        self.history = {k: list(v) for k, v in (history or {}).items()}
        self.epoch = []

    def append(self, epoch: int, logs: dict) -> None:
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))

    def __getitem__(self, key):
        return self.history[key]

    def __repr__(self):
        return f"History({ {k: [round(x, 4) for x in v[-3:]] for k, v in self.history.items()} })"

    def plot(self, path=None):
        """Loss (and accuracy) curves with matplotlib (optional: ``pip install symdl[plot]``)."""
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("History.plot needs matplotlib: pip install 'symdl[plot]'") from exc
        keys = [k for k in self.history if k != "lr"]
        metrics = sorted({k.removeprefix("val_") for k in keys})
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            for k in (m, f"val_{m}"):
                if k in self.history:
                    ax.plot(range(1, len(self.history[k]) + 1), self.history[k], label=k)
            ax.set_xlabel("epoch")
            ax.set_title(m)
            ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True):
    """Index arrays of one epoch's mini-batches; the last may be short.

    The order depends only on (seed, epoch), so a run resumed at epoch k sees the
    same batches as one that never stopped.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class _NonFiniteLoss(Exception):
    def __init__(self, step: int, steps: int, loss: float):
        super().__init__(step, steps, loss)
        self.step, self.steps, self.loss = step, steps, loss


def fit(model, X, y, epochs: int = 1, batch_size: int = 32, validation_data=None, validation_split: float = 0.0,
        shuffle: bool = True, callbacks=None, verbose: int = 1, seed: int | None = None,
        terminate_on_nan: bool = True, cluster=None, sync: str = "grads", every: int = 1) -> History:
    """Train ``model`` for ``epochs`` more epochs (``Model.fit`` documents the arguments)."""
    if not (isinstance(epochs, numbers.Integral) and not isinstance(epochs, bool) and epochs >= 0):
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not (isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if cluster is not None:
        return DISTRIBUTED.get("dask")(model, X, y, cluster=cluster, sync=sync, every=every, epochs=epochs,
                                       batch_size=batch_size, validation_data=validation_data,
                                       validation_split=validation_split, shuffle=shuffle, callbacks=callbacks,
                                       verbose=verbose, seed=seed)
    model.require_compiled()
    X, Y = model.prepare(X, y, "training data")
    if validation_data is None and validation_split:
        if not 0 < validation_split < 1:
            raise ValueError(f"validation_split must be between 0 and 1, got {validation_split}")
        k = int(len(X) * (1 - validation_split))
        X, Y, Xv, Yv = X[:k], Y[:k], X[k:], Y[k:]
    elif validation_data is not None:
        Xv, Yv = model.prepare(*validation_data, "validation data")
    else:
        Xv = Yv = None
    seed = model.seed if seed is None else seed
    callbacks = list(callbacks or [])
    for cb in callbacks:
        cb.model = model
    model.stop_training = False
    for cb in callbacks:
        cb.on_train_begin()
    last = model.epoch + epochs
    previous = None
    for epoch in range(model.epoch, last):
        for cb in callbacks:
            cb.on_epoch_begin(epoch)
        # One copy of the weights per epoch (never per step): what a non-finite loss rolls back to.
        snapshot = model.train_step.state_dict() if terminate_on_nan else None
        try:
            logs = _train_epoch(model, X, Y, batch_size, seed, epoch, shuffle, verbose, last, terminate_on_nan)
        except _NonFiniteLoss as bad:
            _stop_on_non_finite(model, bad, epoch, snapshot, previous)
            break
        previous = snapshot
        if end_epoch(model, epoch, logs, Xv, Yv, callbacks, verbose, prepared=True):
            break
    for cb in callbacks:
        cb.on_train_end()
    return model.history


def end_epoch(model, epoch, logs, Xv, Yv, callbacks, verbose, prepared=False) -> bool:
    """An epoch's bookkeeping after its steps: validation, history, callbacks, the epoch line.

    Returns whether a callback asked training to stop. The single-process and the
    distributed fit loops both end their epochs here.
    """
    if Xv is not None:
        logs.update({f"val_{k}": v for k, v in model.evaluate(Xv, Yv, _prepared=prepared).items()})
    logs["lr"] = model.optimizer.lr
    model.epoch = epoch + 1
    model.history.append(epoch, logs)
    for cb in callbacks:
        cb.on_epoch_end(epoch, logs)
    if verbose:
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()), flush=True)
    return model.stop_training


def _interactive() -> bool:
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget, not lines of text
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _stop_on_non_finite(model, bad, epoch, snapshot, previous):
    """Keras's ``TerminateOnNaN``, on by default, plus a roll-back to the last weights known to give
    a finite loss. The loss a step returns is computed before its update, so the weights at the
    start of this epoch gave a finite loss on its first step; if the first step itself failed,
    those weights came from the previous epoch's last update, and the previous epoch's start is used.
    """
    if bad.step > 0:
        restored, when = snapshot, f"the start of epoch {epoch + 1}"
    elif previous is None:  # nothing earlier in this fit call to go back to
        restored, when = snapshot, f"the start of epoch {epoch + 1}, which already give a non-finite loss"
    else:  # epoch ``epoch`` (1-based) ended on the update that broke the weights: undo it
        restored, when = previous, f"the start of epoch {epoch} (epoch {epoch} is undone)"
        model.epoch = epoch - 1
        for values in [model.history.epoch, *model.history.history.values()]:
            if values:
                values.pop()
    model.train_step.load_state_dict(restored)
    model.stop_training = True
    warnings.warn(
        f"fit stopped: the training loss is {bad.loss} at epoch {epoch + 1}, step {bad.step + 1} of {bad.steps} "
        f"(training diverged: try a smaller learning rate). The weights are restored to {when}.",
        RuntimeWarning, stacklevel=4)


def _train_epoch(model, X, Y, batch_size, seed, epoch, shuffle, verbose, last, terminate_on_nan=True):
    from tqdm.auto import tqdm

    step = model.train_step
    total, correct, seen = 0.0, 0.0, 0
    groups = batches(len(X), batch_size, seed, epoch, shuffle)
    # A bar only on a terminal: redirected to a file or a pipe, fit prints one line per epoch instead.
    bar = tqdm(groups, desc=f"epoch {epoch + 1}/{last}", disable=not verbose or not _interactive(), leave=False,
               unit="batch", mininterval=0.2)
    if verbose and groups and step.runner.will_compile(len(groups[0])):
        print("compiling the training step… (once per formula: later models and runs load it from the cache)",
              file=sys.stderr if _interactive() else sys.stdout, flush=True)
    started = time.perf_counter()
    for k, idx in enumerate(bar):
        xb, yb = X[idx], Y[idx]
        loss = step.step(x=xb, y=yb, check_finite=False)  # the whole set was checked once
        if terminate_on_nan and not math.isfinite(loss):
            bar.close()
            raise _NonFiniteLoss(k, len(groups), loss)
        total += loss * len(idx)
        seen += len(idx)
        m = model.metrics(step.output("out"), yb)
        correct += m.get("accuracy", 0.0) * len(idx)
        if verbose:
            bar.set_postfix(loss=f"{total / seen:.4f}", **({"acc": f"{correct / seen:.3f}"} if m else {}))
    logs = {"loss": total / seen}
    if model.kind != "regression":
        logs["accuracy"] = correct / seen
    model.last_epoch_seconds = time.perf_counter() - started
    return logs
