"""Callbacks ``Model.fit`` calls, and learning-rate schedules (Keras names).

>>> sched = cosine_decay(0.1, epochs=10, min_lr=0.0)
>>> tuple(round(sched(e), 4) for e in (0, 5, 9))
(0.1, 0.05, 0.0024)
"""
from __future__ import annotations

import math

class Callback:
    """Hooks called by ``Model.fit``; ``self.model`` is set before training starts."""

    model = None

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


def _better(mode, monitor):
    if mode == "auto":
        mode = "max" if "acc" in monitor else "min"
    return (lambda a, b, d: a > b + d) if mode == "max" else (lambda a, b, d: a < b - d)


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs; optionally restore the best weights."""

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto", restore_best_weights=True):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.better = _better(mode, monitor)
        self.restore_best_weights = restore_best_weights

    def on_train_begin(self, logs=None):
        self.best, self.wait, self.best_weights, self.stopped_epoch = None, 0, None, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, but the logs have {sorted(logs or {})}")
        if self.best is None or self.better(value, self.best, self.min_delta):
            self.best, self.wait = value, 0
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.restore_best_weights and self.best_weights is not None:
                self.model.set_weights(self.best_weights)


class ModelCheckpoint(Callback):
    """Save the model after each epoch (or only when ``monitor`` improves); ``{epoch}`` in the path is filled in."""

    def __init__(self, filepath, monitor="val_loss", save_best_only=False, mode="auto"):
        self.filepath, self.monitor, self.save_best_only = str(filepath), monitor, save_best_only
        self.better = _better(mode, monitor)
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        if self.save_best_only:
            value = (logs or {}).get(self.monitor)
            if value is None or (self.best is not None and not self.better(value, self.best, 0.0)):
                return
            self.best = value
        self.model.save(self.filepath.format(epoch=epoch + 1, **(logs or {})))


class LearningRateScheduler(Callback):
    """Set the optimizer's learning rate from ``schedule(epoch)`` at the start of each epoch."""

    def __init__(self, schedule):
        self.schedule = schedule

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.lr = float(self.schedule(epoch))


def step_decay(lr, step_size=10, gamma=0.5):
    """``lr * gamma ** (epoch // step_size)``."""
    return lambda epoch: lr * gamma ** (epoch // step_size)


def exponential_decay(lr, gamma=0.95):
    """``lr * gamma ** epoch``."""
    return lambda epoch: lr * gamma**epoch


def cosine_decay(lr, epochs, min_lr=0.0):
    """Half a cosine from ``lr`` at epoch 0 down to ``min_lr`` at ``epochs``."""
    return lambda epoch: min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))
