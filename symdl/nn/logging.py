"""Logging callbacks with Keras 3's names and arguments: ``CSVLogger`` and ``TensorBoard``.

Both write once per epoch, from the logs ``Model.fit`` passes to ``on_epoch_end`` (``loss``,
``accuracy``, ``val_*``, ``lr``), and leave a valid file behind if training stops part way
(an error, a ``KeyboardInterrupt``): each epoch's row or event is on disk when the epoch ends.

>>> import csv, os, tempfile, symdl as sd
>>> X, y = sd.datasets.xor(64, seed=0)
>>> model = sd.nn.Sequential([sd.nn.Dense(4, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
>>> model.compile(optimizer=sd.optim.Adam(0.05), backend="numpy")
>>> folder = tempfile.TemporaryDirectory(); path = os.path.join(folder.name, "log.csv")
>>> _ = model.fit(X, y, epochs=2, batch_size=32, verbose=0, callbacks=[CSVLogger(path)])
>>> rows = list(csv.DictReader(open(path)))
>>> [r["epoch"] for r in rows], sorted(rows[0])
(['0', '1'], ['accuracy', 'epoch', 'loss', 'lr'])
>>> folder.cleanup()
"""
from __future__ import annotations

import csv
import io
import numbers
import os

import numpy as np

from .callbacks import Callback


class CSVLogger(Callback):
    """Stream each epoch's logs to a CSV file (Keras 3's ``keras.callbacks.CSVLogger``).

    The first column is ``epoch`` (0-based, as Keras writes it), then the log keys in sorted
    order, fixed by the first epoch; a key missing later is written ``NA``. ``append=True``
    continues an existing file (its header is kept; a header is written only to an empty or
    new file). Every row is written and flushed when its epoch ends, so a run stopped by an
    error or an interrupt leaves a complete, valid CSV of the epochs it finished.
    """

    def __init__(self, filename, separator: str = ",", append: bool = False):
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"CSVLogger: separator must be one character, got {separator!r}")
        self.filename, self.sep, self.append = os.fspath(filename), separator, bool(append)
        self.keys = None
        self._file = None

    def on_train_begin(self, logs=None):
        folder = os.path.dirname(self.filename)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.keys = None
        self._header = True
        if self.append and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0:
            self._header = False
            with open(self.filename, newline="") as f:  # continue with the columns already there
                first = next(csv.reader(f, delimiter=self.sep), None)
            if first and first[0] == "epoch":
                self.keys = first[1:]
        self._file = open(self.filename, "a" if self.append else "w", newline="")

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if self._file is None:  # used without on_train_begin (fit always calls it)
            self.on_train_begin()
        if self.keys is None:
            self.keys = sorted(logs)
        row = io.StringIO()  # one write per epoch: a row is on disk whole or not at all
        writer = csv.writer(row, delimiter=self.sep, lineterminator="\n")
        if self._header:
            writer.writerow(["epoch", *self.keys])
            self._header = False
        writer.writerow([epoch, *(_cell(logs.get(k, "NA")) for k in self.keys)])
        self._file.write(row.getvalue())
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):  # an interrupted fit never calls on_train_end
        f = getattr(self, "_file", None)
        if f is not None and not f.closed:
            f.close()


def _cell(value):
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return '"[' + ", ".join(map(str, value.ravel())) + ']"'
    if isinstance(value, (numbers.Number, np.generic)):
        return repr(float(value)) if isinstance(value, (float, np.floating)) else value
    return value


#: Keras 3 arguments symdl's ``TensorBoard`` has no counterpart for, with the only value it takes.
_UNSUPPORTED = {"write_steps_per_second": False, "profile_batch": 0, "embeddings_freq": 0,
                "embeddings_metadata": None}


class TensorBoard(Callback):
    """Write TensorBoard event files (Keras 3's ``keras.callbacks.TensorBoard``), through tensorboardX.

    As Keras lays them out: ``log_dir/train`` holds the training scalars (``epoch_loss``,
    ``epoch_accuracy``, ``epoch_learning_rate``) and ``log_dir/validation`` the validation ones
    under the same tags (``val_loss`` is ``epoch_loss`` there), so TensorBoard draws the two
    runs on one chart. The step is the 0-based epoch.

    ``histogram_freq=k`` (k > 0) adds a histogram of every weight every k epochs, tagged
    ``<layer name>/<parameter>/histogram`` (``dense_1/W1/histogram``); ``write_images=True``
    adds each weight matrix as a grey image; ``write_graph=True`` (Keras's default) writes the
    model's summary table as text (symdl has no TensorFlow graph to draw). ``update_freq`` is
    ``"epoch"`` only (``fit`` reports to callbacks once per epoch); ``write_steps_per_second``,
    ``profile_batch``, ``embeddings_freq`` and ``embeddings_metadata`` take only their defaults
    (symdl has no per-step hook, profiler or projector): another value is an error, not ignored.
    Needs ``pip install tensorboardX``.
    """

    def __init__(self, log_dir="logs", histogram_freq: int = 0, write_graph: bool = True, write_images: bool = False,
                 write_steps_per_second: bool = False, update_freq="epoch", profile_batch=0, embeddings_freq=0,
                 embeddings_metadata=None):
        if not (isinstance(histogram_freq, numbers.Integral) and not isinstance(histogram_freq, bool)
                and histogram_freq >= 0):
            raise ValueError(f"TensorBoard: histogram_freq must be an integer >= 0, got {histogram_freq!r}")
        if update_freq != "epoch":
            raise ValueError(f"TensorBoard: update_freq={update_freq!r} is not supported: symdl's fit reports to "
                             "callbacks once per epoch (use update_freq='epoch')")
        given = {"write_steps_per_second": write_steps_per_second, "profile_batch": profile_batch,
                 "embeddings_freq": embeddings_freq, "embeddings_metadata": embeddings_metadata}
        for name, value in given.items():
            if value != _UNSUPPORTED[name]:
                raise ValueError(f"TensorBoard: {name}={value!r} is not supported by symdl (no per-step hook, "
                                 f"profiler or embeddings projector); leave it at {_UNSUPPORTED[name]!r}")
        self.log_dir, self.histogram_freq = os.fspath(log_dir), int(histogram_freq)
        self.write_graph, self.write_images = bool(write_graph), bool(write_images)
        self.update_freq = update_freq
        self._writers = {}

    # ------------------------------------------------------------------ writers

    def _writer(self, run: str):
        if run not in self._writers:
            self._writers[run] = _EventFile(os.path.join(self.log_dir, run))
        return self._writers[run]

    def on_train_begin(self, logs=None):
        self._writer("train")  # fails here, before training, when tensorboardX is missing
        if self.write_graph and self.model is not None and hasattr(self.model, "summary"):
            text = self.model.summary(print_fn=None)
            self._writer("train").text("model/summary", "```\n" + text + "\n```", 0)
            self._writer("train").flush()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        train, validation = {}, {}
        for key, value in logs.items():
            if not isinstance(value, (numbers.Number, np.generic)) or isinstance(value, bool):
                continue
            if key == "lr":
                key = "learning_rate"  # Keras 3's name
            if key.startswith("val_"):
                validation[key[4:]] = float(value)
            else:
                train[key] = float(value)
        for run, values in (("train", train), ("validation", validation)):
            if not values:
                continue
            writer = self._writer(run)
            for key, value in values.items():
                writer.scalar(f"epoch_{key}", value, epoch)
        if self.histogram_freq and epoch % self.histogram_freq == 0:
            self._log_weights(epoch)
        for writer in self._writers.values():
            writer.flush()

    def _log_weights(self, epoch):
        writer = self._writer("train")
        for tag, value in weights_by_layer(self.model):
            writer.histogram(f"{tag}/histogram", np.asarray(value, dtype=np.float64), epoch)
            if self.write_images:
                image = value.reshape(-1, value.shape[-1]) if value.ndim != 2 else value
                lo, hi = float(image.min()), float(image.max())
                scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
                writer.image(f"{tag}/image", scaled.astype(np.float32), epoch)

    def on_train_end(self, logs=None):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}

    def set_model(self, model):  # Keras's hook name; fit sets ``model`` directly
        self.model = model


class _EventFile:
    """One run's event file, written synchronously: every event is on disk after ``flush``.

    (tensorboardX's ``SummaryWriter`` queues events for a background thread and its ``flush``
    does not wait for the queue, so an interrupted run could lose its last epochs; its
    summary builders and record writer are used directly instead.)
    """

    _count = 0

    def __init__(self, folder):
        try:
            from tensorboardX import summary
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import event_pb2
        except ImportError as exc:
            raise ImportError("the TensorBoard callback writes event files with tensorboardX: "
                              "pip install tensorboardX (or 'symdl[tensorboard]')") from exc
        os.makedirs(folder, exist_ok=True)
        _EventFile._count += 1  # two runs started in the same second get two files
        self._summary, self._event = summary, event_pb2.Event
        self._file = EventsWriter(os.path.join(folder, "events"), f".{os.getpid()}.{_EventFile._count}.v2")

    def _write(self, proto, step):
        import time

        self._file.write_event(self._event(wall_time=time.time(), step=int(step), summary=proto))

    def scalar(self, tag, value, step):
        self._write(self._summary.scalar(tag, float(value)), step)

    def histogram(self, tag, values, step):
        self._write(self._summary.histogram(tag, values, 30), step)

    def image(self, tag, values, step):
        self._write(self._summary.image(tag, values, dataformats="HW"), step)

    def text(self, tag, value, step):
        self._write(self._summary.text(tag, value), step)

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def weights_by_layer(model):
    """``[("dense_1/W1", array), ...]``: each parameter's current value, tagged by its layer's name."""
    if model is None or getattr(model, "train_step", None) is None:
        return []
    values = model.train_step.params
    out = []
    for name, params in zip(model.layer_names, model.layer_params):
        for p in params:
            key = str(p.name)
            if key in values:
                out.append((f"{name}/{key}", values[key]))
    return out


__all__ = ["CSVLogger", "TensorBoard", "weights_by_layer"]
