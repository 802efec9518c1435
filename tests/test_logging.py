"""Training logs and curves: CSVLogger and TensorBoard (symdl.nn.logging), the files they write read back
by other tools; plot_history and the live PlotLosses (symdl.nn.curves)."""
from __future__ import annotations

import csv
import glob
import os
import warnings

import numpy as np
import pytest

import symdl as sd
from symdl.nn import curves
from symdl.nn.callbacks import Callback
from symdl.nn.curves import PlotLosses, plot_history
from symdl.nn.fitting import History
from symdl.nn.logging import CSVLogger, TensorBoard


def _model(seed=0):
    model = sd.nn.Sequential([sd.nn.Dense(4, activation="tanh", name="hidden"), sd.nn.Dense(2)], input_dim=2)
    model.compile(optimizer=sd.optim.Adam(0.05), backend="numpy", seed=seed)
    return model


@pytest.fixture(scope="module")
def data():
    X, y = sd.datasets.xor(96, seed=1)
    return X[:64], y[:64], X[64:], y[64:]


class _StopAt(Callback):
    """Raise ``KeyboardInterrupt`` at the start of an epoch, as a user's Ctrl-C would."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_csv_rows_are_the_history(tmp_path, data):
    X, y, Xv, yv = data
    model, path = _model(), tmp_path / "sub" / "log.csv"
    history = model.fit(X, y, epochs=3, batch_size=16, verbose=0, validation_data=(Xv, yv),
                        callbacks=[CSVLogger(path)])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "accuracy", "loss", "lr", "val_accuracy", "val_loss"]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert np.allclose([float(r[key]) for r in rows], history.history[key], rtol=0, atol=1e-12), key


def test_csv_separator_and_append(tmp_path, data):
    X, y, _, _ = data
    model, path = _model(), tmp_path / "log.tsv"
    model.fit(X, y, epochs=2, verbose=0, callbacks=[CSVLogger(path, separator="\t")])
    model.fit(X, y, epochs=2, verbose=0, callbacks=[CSVLogger(path, separator="\t", append=True)])
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["epoch", "accuracy", "loss", "lr"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "3"]  # one header; epochs continue
    assert all(len(r) == 4 for r in rows)
    model.fit(X, y, epochs=1, verbose=0, callbacks=[CSVLogger(path, separator="\t")])  # append=False: anew
    with open(path, newline="") as f:
        assert [r[0] for r in csv.reader(f, delimiter="\t")] == ["epoch", "4"]


def test_csv_interrupted_run_leaves_a_valid_file(tmp_path, data):
    X, y, _, _ = data
    model, path = _model(), tmp_path / "log.csv"
    logger = CSVLogger(path)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, y, epochs=5, verbose=0, callbacks=[logger, _StopAt(3)])
    # read while the logger still holds its file (on_train_end never ran)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert all(len(r) == 4 and None not in r and all(v not in ("", None) for v in r.values()) for r in rows)
    assert np.allclose([float(r["loss"]) for r in rows], model.history.history["loss"])


def test_csv_missing_key_is_na(tmp_path):
    logger, path = CSVLogger(tmp_path / "log.csv"), tmp_path / "log.csv"
    logger.on_train_begin()
    logger.on_epoch_end(0, {"loss": 1.5, "val_loss": 2.0})
    logger.on_epoch_end(1, {"loss": 1.25})
    logger.on_train_end()
    assert open(path).read().splitlines() == ["epoch,loss,val_loss", "0,1.5,2.0", "1,1.25,NA"]


def test_csv_bad_separator():
    with pytest.raises(ValueError, match="CSVLogger: separator must be one character"):
        CSVLogger("x.csv", separator=", ")


def _scalars_with_tensorboard(run_dir):
    """``{tag: [(step, value), ...]}`` and histogram tags, read by TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    hist = {t: acc.Histograms(t) for t in tags["histograms"]}
    return scalars, hist


def _scalars_with_protobuf(run_dir):
    """The same read with tensorboardX's protobuf records (no TensorBoard installed)."""
    from tensorboardX.proto import event_pb2

    scalars, hist = {}, {}
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
            length = int.from_bytes(data[i : i + 8], "little")
            payload = data[i + 12 : i + 12 + length]
            i += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                if v.HasField("histo"):
                    hist.setdefault(v.tag, []).append(event.step)
                elif v.HasField("simple_value"):
                    scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars, hist


def _read_events(run_dir):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pytest.importorskip("tensorboardX.proto.event_pb2", reason="reading event files needs tensorboard or "
                                                                  "tensorboardX")
        return _scalars_with_protobuf(run_dir)
    return _scalars_with_tensorboard(run_dir)


def test_tensorboard_scalars_read_back(tmp_path, data):
    pytest.importorskip("tensorboardX", reason="the TensorBoard callback writes through tensorboardX")
    X, y, Xv, yv = data
    model = _model()
    history = model.fit(X, y, epochs=3, batch_size=16, verbose=0, validation_data=(Xv, yv),
                        callbacks=[TensorBoard(log_dir=tmp_path / "logs")])
    train, _ = _read_events(tmp_path / "logs" / "train")
    val, _ = _read_events(tmp_path / "logs" / "validation")
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= set(train)
    assert set(val) == {"epoch_loss", "epoch_accuracy"}
    for tags, prefix in ((train, ""), (val, "val_")):
        for tag in ("epoch_loss", "epoch_accuracy"):
            steps, values = zip(*tags[tag])
            assert steps == (0, 1, 2)
            assert np.allclose(values, history.history[prefix + tag[6:]], rtol=1e-6)  # stored as float32
    assert np.allclose([v for _, v in train["epoch_learning_rate"]], 0.05)


def test_tensorboard_both_readers_agree(tmp_path, data):
    pytest.importorskip("tensorboard", reason="compares TensorBoard's EventAccumulator with the protobuf reader")
    pytest.importorskip("tensorboardX")
    X, y, _, _ = data
    _model().fit(X, y, epochs=2, verbose=0, callbacks=[TensorBoard(tmp_path, histogram_freq=1)])
    a, ha = _scalars_with_tensorboard(tmp_path / "train")
    b, hb = _scalars_with_protobuf(tmp_path / "train")
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k]) for k in a)
    assert ha.keys() == hb.keys()


def test_tensorboard_histograms(tmp_path, data):
    pytest.importorskip("tensorboardX")
    X, y, _, _ = data
    model = _model()
    model.fit(X, y, epochs=3, verbose=0, callbacks=[TensorBoard(tmp_path, histogram_freq=2, write_images=True)])
    _, hist = _read_events(tmp_path / "train")
    assert set(hist) == {"hidden/W1/histogram", "hidden/b1/histogram", "dense_2/W2/histogram", "dense_2/b2/histogram"}
    for tag, events in hist.items():
        steps = [getattr(e, "step", e) for e in events]
        assert steps == [0, 2], tag
    # the last histogram (epoch 2, the last) counts every entry of the final weights
    try:
        last = hist["hidden/W1/histogram"][-1].histogram_value
    except AttributeError:
        return  # the protobuf reader keeps steps only
    W1 = model.get_weights()["W1"]
    assert last.num == 8 and np.isclose(last.min, W1.min()) and np.isclose(last.max, W1.max())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "train"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("hidden/W1/image")
    assert [e.step for e in images] == [0, 2] and (images[-1].width, images[-1].height) == (4, 2)


def test_tensorboard_interrupted_run_is_readable(tmp_path, data):
    pytest.importorskip("tensorboardX")
    X, y, _, _ = data
    model = _model()
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, y, epochs=5, verbose=0, callbacks=[TensorBoard(tmp_path), _StopAt(2)])
    train, _ = _read_events(tmp_path / "train")
    assert [s for s, _ in train["epoch_loss"]] == [0, 1]


@pytest.mark.parametrize("kw, word", [({"update_freq": "batch"}, "update_freq"),
                                      ({"profile_batch": 3}, "profile_batch"),
                                      ({"histogram_freq": -1}, "histogram_freq"),
                                      ({"write_steps_per_second": True}, "write_steps_per_second")])
def test_tensorboard_bad_arguments(kw, word):
    with pytest.raises(ValueError, match=f"TensorBoard: {word}"):
        TensorBoard("logs", **kw)


# ---------------------------------------------------------------- curves (symdl.nn.curves)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mpl():
    matplotlib = pytest.importorskip("matplotlib", reason="curves are drawn with matplotlib (the plot extra)")
    matplotlib.use("Agg")
    return matplotlib


@pytest.fixture(scope="module")
def trained(mpl):
    X, y = sd.datasets.xor(96, seed=2)
    model = sd.nn.Sequential([sd.nn.Dense(6, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
    model.compile(optimizer=sd.optim.Adam(0.05), backend="numpy")
    model.fit(X[:64], y[:64], epochs=4, batch_size=16, verbose=0, validation_data=(X[64:], y[64:]))
    return model


def test_plot_history_draws_train_and_validation(trained, tmp_path):
    h = trained.history
    fig = plot_history(h, path=tmp_path / "curves.png")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    for ax, name in zip(fig.axes, ("loss", "accuracy")):
        lines = {line.get_label(): line for line in ax.lines}
        assert set(lines) == {name, f"val_{name}"}
        for key, line in lines.items():
            x, y = line.get_data()
            assert list(x) == [1, 2, 3, 4] and np.allclose(y, h.history[key])
        assert ax.get_xlabel() == "epoch"
    assert open(tmp_path / "curves.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    png = fig._repr_png_()  # what a notebook shows
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_plot_history_choices(mpl):
    h = History({"loss": [3.0, 2.0], "accuracy": [0.5, 0.7], "lr": [0.1, 0.05]})
    assert [ax.get_title() for ax in plot_history(h, metrics="lr").axes] == ["lr"]
    assert [ax.get_title() for ax in plot_history(h.history).axes] == ["loss", "accuracy"]
    with pytest.raises(KeyError, match="plot_history: no 'val_loss'.*'accuracy', 'loss', 'lr'"):
        plot_history(h, metrics=["val_loss"])
    with pytest.raises(ValueError, match="history is empty"):
        plot_history(History())
    assert plot_history({"loss": [100.0, 1.0, 0.1]}).axes[0].get_yscale() == "log"
    assert plot_history({"loss": [3.0, 1.0, 0.1]}).axes[0].get_yscale() == "linear"


def test_plot_losses_outside_a_notebook_warns_once(trained):
    X, y = sd.datasets.xor(32, seed=3)
    cb = PlotLosses()
    with pytest.warns(RuntimeWarning, match="PlotLosses draws in a Jupyter notebook only"):
        trained.fit(X, y, epochs=1, verbose=0, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.fit(X, y, epochs=1, verbose=0, callbacks=[cb])  # the same callback again: no second warning
    assert cb.figure is None


def test_plot_losses_redraws_in_place(trained, monkeypatch):
    """In a kernel, each epoch clears the previous drawing and displays the new one (IPython.display)."""
    pytest.importorskip("IPython", reason="PlotLosses displays through IPython")
    import IPython.display as display

    calls = []
    monkeypatch.setattr(curves, "in_notebook", lambda: True)
    monkeypatch.setattr(display, "clear_output", lambda wait=False: calls.append(("clear", wait)))
    monkeypatch.setattr(display, "display", lambda obj: calls.append(("show", obj)))
    X, y = sd.datasets.xor(32, seed=3)
    cb = PlotLosses(every=2)
    start = trained.epoch
    trained.fit(X, y, epochs=4, verbose=0, callbacks=[cb])
    drawn = [c for c in calls if c[0] == "show"]
    assert [c[0] for c in calls] == ["clear", "show"] * 2 and all(c[1] for c in calls if c[0] == "clear")
    assert drawn[-1][1].data[:8] == b"\x89PNG\r\n\x1a\n"
    x, _ = cb.figure.axes[0].lines[0].get_data()
    assert len(x) == start + 4  # the whole history so far


def test_plot_losses_bad_every(mpl):
    with pytest.raises(ValueError, match="PlotLosses: every must be an integer >= 1"):
        PlotLosses(every=0)


def test_plot_losses_in_a_real_kernel(mpl, tmp_path, monkeypatch):
    """A notebook run headless: the cell ends with one PNG (each epoch replaced the last)."""
    nbformat = pytest.importorskip("nbformat", reason="executes a notebook")
    nbclient = pytest.importorskip("nbclient", reason="executes a notebook")
    pytest.importorskip("ipykernel", reason="executes a notebook")
    cell = ("import symdl as sd\n"
            "from symdl.nn.curves import PlotLosses\n"
            "X, y = sd.datasets.xor(64, seed=0)\n"
            "m = sd.nn.Sequential([sd.nn.Dense(4, activation='tanh'), sd.nn.Dense(2)], input_dim=2)\n"
            "m.compile(optimizer=sd.optim.Adam(0.05), backend='numpy')\n"
            "cb = PlotLosses()\n"
            "_ = m.fit(X, y, epochs=3, verbose=0, validation_split=0.25, callbacks=[cb])\n"
            "print(len(cb.figure.axes), len(cb.figure.axes[0].lines))")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    texts = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert len(images) == 1, [o.output_type for o in outputs]
    assert "2 2" in texts  # loss and accuracy panels, train and validation curves
