"""The fit loop: ``fit`` runs epochs with callbacks and a ``History``; a trainer runs the steps.

One loop serves every way of training. Here are the setup (argument checks, the data checked
once, the validation split, the seed, callbacks, ``terminate_on_nan``), each epoch's progress
and the end of each epoch (validation, history, callbacks, early stop). A *trainer* supplies
only how an epoch's batches are trained: ``LocalTrainer`` runs the model's compiled step in
this process; ``symdl.distributed`` registers one that runs the steps on a Dask cluster.

Batches come from a seeded order, so a resumed run sees the same batches:

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

from ..registry import Registry, rich_display

#: Trainers for ``fit(cluster=...)``: ``symdl.distributed`` registers ``"dask"`` when imported
#: (a later stage than this one, so this module never imports it). A factory
#: ``(model, X, Y, *, cluster, sync, every, timeout) -> Trainer``.
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

    def plot(self, path=None, **kwargs):
        """Loss and metric curves against the epoch, train and validation (matplotlib, the ``plot``
        extra): ``nn.curves.plot_history``. Returns the figure; ``path`` saves it too."""
        from . import curves

        return curves.plot_history(self, path=path, **kwargs)

    def _repr_mimebundle_(self, include=None, exclude=None):  # a notebook's display (symdl.show)
        return rich_display(self, include, exclude)


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True):
    """Index arrays of one epoch's mini-batches; the last may be short.

    The order depends only on (seed, epoch), so a run resumed at epoch k sees the
    same batches as one that never stopped.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class Columns:
    """The arrays of a model with several inputs or outputs, by leaf name, taken rows together:
    ``columns[idx]`` indexes every array's rows, ``len`` is their number of rows.

    >>> import numpy as np
    >>> c = Columns({"x1": np.arange(6).reshape(3, 2), "x2": np.arange(3)})
    >>> len(c), c[1:].arrays["x2"].tolist()
    (3, [1, 2])
    """

    def __init__(self, arrays: dict):
        self.arrays = dict(arrays)

    def __len__(self):
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, rows):
        return Columns({k: v[rows] for k, v in self.arrays.items()})


class Trainer:
    """How an epoch's batches are trained; ``fit`` does everything else.

    ``n`` is the number of training rows (``fit`` draws the batches of ``range(n)``).
    """

    n = 0

    def will_compile(self, batch_size: int) -> bool:
        """Whether the first step compiles code (``fit`` says so before a long wait)."""
        return False

    def steps(self, groups, epoch: int):
        """Train on one epoch's batches ``groups`` (row index arrays), starting from the model's
        parameters. Yields, per synchronisation, ``(steps, rows, loss_sum, correct)``: the steps
        taken, the rows they used, the sum of their loss times their rows, and the rows predicted
        right (``correct_predictions``)."""
        raise NotImplementedError

    def epoch_logs(self) -> dict:
        """Logs of the epoch just trained besides ``loss`` and ``accuracy`` (a model with several
        outputs: each one's loss and accuracy); none by default."""
        return {}

    def commit(self) -> None:
        """Write the parameters of the last completed step into the model (after an error too)."""

    def finish(self) -> None:
        """After the last epoch, when training went through."""

    def close(self) -> None:
        """Release what the trainer holds (after an error too)."""


class LocalTrainer(Trainer):
    """The model's compiled step, batch after batch, in this process (it updates the model itself)."""

    def __init__(self, model, X, Y):
        self.model, self.X, self.Y, self.n = model, X, Y, len(X)
        self.sums, self.rows = {}, 0  # an epoch's per-output logs (a model with several outputs)

    def will_compile(self, batch_size: int) -> bool:
        return self.model.train_step.runner.will_compile(batch_size)

    def steps(self, groups, epoch: int):
        model, step = self.model, self.model.train_step
        several = len(model.outputs) > 1
        self.sums, self.rows = {}, 0
        for idx in groups:
            xb, yb = self.X[idx], self.Y[idx]
            loss = step.step(check_finite=False, **model.feed(xb, yb))  # the whole set was checked once
            out = model.step_outputs()
            if several:  # each output's loss and accuracy, as Keras logs them
                rows = len(idx)
                self.rows += rows
                for k, v in {**model.step_losses(), **model.metrics(out, yb)}.items():
                    self.sums[k] = self.sums.get(k, 0.0) + v * rows
            yield 1, len(idx), loss * len(idx), correct_predictions(model, out, yb)

    def epoch_logs(self) -> dict:
        return {k: v / self.rows for k, v in self.sums.items()} if self.rows else {}


def correct_predictions(model, out, Y) -> float:
    """The rows of a batch ``model`` predicts right from its outputs ``out``: its accuracy times the
    rows (0 for a regression). Every trainer counts with this, so the logs agree."""
    return model.metrics(out, Y).get("accuracy", 0.0) * len(Y)


class _NonFiniteLoss(Exception):
    def __init__(self, step: int, steps: int, loss: float):
        super().__init__(step, steps, loss)
        self.step, self.steps, self.loss = step, steps, loss


def fit(model, X, y, epochs: int = 1, batch_size: int = 32, validation_data=None, validation_split: float = 0.0,
        shuffle: bool = True, callbacks=None, verbose: int = 1, seed: int | None = None,
        terminate_on_nan: bool = True, cluster=None, sync: str = "grads", every: int = 1,
        timeout: float | None = None) -> History:
    """Train ``model`` for ``epochs`` more epochs (``Model.fit`` documents the arguments; ``cluster``,
    ``sync``, ``every`` and ``timeout`` go to the distributed trainer, see ``symdl.distributed``)."""
    if not (isinstance(epochs, numbers.Integral) and not isinstance(epochs, bool) and epochs >= 0):
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if not (isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    model.require_compiled()
    if cluster is not None and (len(model.inputs) > 1 or len(model.outputs) > 1):
        raise ValueError(f"fit(cluster=...) trains models with one input and one output; this one has "
                         f"{len(model.inputs)} inputs and {len(model.outputs)} outputs")
    # a Dask array given to a cluster stays there: its workers check their chunks
    lazy = cluster is not None and hasattr(X, "to_delayed") and hasattr(X, "chunks")
    X, Y, Xv, Yv = _split_validation(model, X, y, validation_data, validation_split, lazy)
    if cluster is None:
        trainer = LocalTrainer(model, X, Y)
    else:
        trainer = DISTRIBUTED.get("dask")(model, X, Y, cluster=cluster, sync=sync, every=every, timeout=timeout)
    try:
        _run_epochs(model, trainer, epochs, batch_size, Xv, Yv, shuffle, callbacks, verbose,
                    model.seed if seed is None else seed, terminate_on_nan)
        trainer.finish()
    finally:
        trainer.close()
    return model.history


def _split_validation(model, X, y, validation_data, validation_split, lazy):
    """``(X, Y, Xv, Yv)``, checked: the training rows (left as they are when ``lazy``) and the
    validation rows (the last ``validation_split`` of them, or ``validation_data``; None when
    neither is given)."""
    if not lazy:
        X, y = model.prepare(X, y, "training data")
    if validation_data is None and validation_split:
        if not 0 < validation_split < 1:
            raise ValueError(f"validation_split must be between 0 and 1, got {validation_split}")
        k = int(len(X) * (1 - validation_split))
        X, y, validation_data = X[:k], y[:k], (X[k:], y[k:])
        if not lazy:
            return X, y, *validation_data
    if validation_data is None:
        return X, y, None, None
    return X, y, *model.prepare(*validation_data, "validation data")


def _run_epochs(model, trainer, epochs, batch_size, Xv, Yv, shuffle, callbacks, verbose, seed, terminate_on_nan):
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
        groups = batches(trainer.n, batch_size, seed, epoch, shuffle)
        try:
            logs = _train_epoch(model, trainer, groups, epoch, last, verbose, terminate_on_nan)
        except _NonFiniteLoss as bad:
            _stop_on_non_finite(model, bad, epoch, snapshot, previous)
            break
        previous = snapshot
        if _end_epoch(model, epoch, logs, Xv, Yv, callbacks, verbose):
            break
    for cb in callbacks:
        cb.on_train_end()


def _train_epoch(model, trainer, groups, epoch, last, verbose, terminate_on_nan):
    """One epoch's steps (by ``trainer``), with a progress bar; returns the training logs."""
    from tqdm.auto import tqdm

    # A bar only on a terminal: redirected to a file or a pipe, fit prints one line per epoch instead.
    bar = tqdm(total=len(groups), desc=f"epoch {epoch + 1}/{last}", disable=not verbose or not _interactive(),
               leave=False, unit="batch", mininterval=0.2)
    if verbose and groups and trainer.will_compile(len(groups[0])):
        print("compiling the training step… (once per formula: later models and runs load it from the cache)",
              file=sys.stderr if _interactive() else sys.stdout, flush=True)
    classes = model.kind in ("classes", "binary")  # several outputs: the loss only (evaluate has each's)
    total, correct, seen, done = 0.0, 0.0, 0, 0
    started = time.perf_counter()
    try:
        for steps, rows, loss, right in trainer.steps(groups, epoch):
            if terminate_on_nan and not math.isfinite(loss):
                raise _NonFiniteLoss(done, len(groups), loss / rows)
            total, correct, seen, done = total + loss, correct + right, seen + rows, done + steps
            bar.update(steps)
            if verbose:
                bar.set_postfix(loss=f"{total / seen:.4f}", **({"acc": f"{correct / seen:.3f}"} if classes else {}))
    finally:
        bar.close()
        trainer.commit()  # a non-finite loss is then rolled back by fit; any other error keeps these
    model.last_epoch_seconds = time.perf_counter() - started
    logs = {"loss": total / seen}
    if classes:
        logs["accuracy"] = correct / seen
    logs.update(trainer.epoch_logs())
    return logs


def _end_epoch(model, epoch, logs, Xv, Yv, callbacks, verbose) -> bool:
    """An epoch's bookkeeping after its steps: validation, history, callbacks, the epoch line.

    Returns whether a callback asked training to stop.
    """
    if Xv is not None:
        logs.update({f"val_{k}": v for k, v in model.evaluate(Xv, Yv, _prepared=True).items()})
    logs["lr"] = model.optimizer.lr
    model.epoch = epoch + 1
    model.history.append(epoch, logs)
    for cb in callbacks:
        cb.on_epoch_end(epoch, logs)
    if verbose:
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()), flush=True)
    return model.stop_training


def _interactive() -> bool:
    from .curves import in_notebook

    if in_notebook():  # a Jupyter kernel (not merely ipykernel imported): tqdm.auto draws a widget
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
        RuntimeWarning, stacklevel=5)  # the caller of Model.fit (or of distributed.fit)
