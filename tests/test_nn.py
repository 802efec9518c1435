"""Layers, fit, checkpoints, datasets, the CLI and the examples."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symdl as sd
from symdl.nn.checkpoint import CheckpointError
from symdl.nn.datasets import DataError

ROOT = Path(__file__).resolve().parents[1]


def xor_model(backend="cpu", optimizer=None, seed=0, regularizer=None):
    model = sd.nn.Sequential([sd.nn.Dense(8, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
    model.compile(loss="softmax_cross_entropy", optimizer=optimizer or sd.optim.Adam(0.05), backend=backend,
                  seed=seed, regularizer=regularizer)
    return model


@pytest.fixture(scope="module")
def xor_data():
    return sd.datasets.xor(256, seed=1)


# --------------------------------------------------------------------------- layers & model


def test_dense_initialisation_follows_activation():
    relu = sd.nn.Dense(4, activation="relu")
    tanh = sd.nn.Dense(4, activation="tanh")
    assert relu.kernel_initializer == "he_normal" and tanh.kernel_initializer == "glorot_uniform"
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        sd.nn.Dense(4, activation="swish2")
    with pytest.raises(ValueError, match="positive integer"):
        sd.nn.Dense(0)


def test_initial_weights_are_seeded_and_scaled():
    m1 = sd.nn.Sequential([sd.nn.Dense(256, activation="relu"), sd.nn.Dense(2)], input_dim=128)
    m1.compile(backend="numpy", seed=3)
    m2 = sd.nn.Sequential([sd.nn.Dense(256, activation="relu"), sd.nn.Dense(2)], input_dim=128)
    m2.compile(backend="numpy", seed=3)
    w1, w2 = m1.get_weights(), m2.get_weights()
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert np.std(w1["W1"]) == pytest.approx(np.sqrt(2 / 128), rel=0.05)  # He
    assert np.abs(w1["W2"]).max() <= np.sqrt(6 / (256 + 2))  # Glorot uniform
    assert not w1["b1"].any()


def test_summary_and_formulas(xor_data):
    model = xor_model(backend="numpy")
    text = model.summary(print_fn=None)
    assert "dense_1" in text and "total params: 42" in text
    f = model.formulas()
    assert "δ1 = (δ2*W2.T)⊙(1 - A1**2)" in f
    assert r"\delta_{1}" in model.formulas(latex=True)
    assert "def run(" in model.source() and "def formula_kernel(" in model.source("cpu")


def test_fit_learns_xor_and_history(xor_data):
    X, y = xor_data
    model = xor_model()
    history = model.fit(X, y, epochs=25, batch_size=32, validation_split=0.25, verbose=0)
    assert set(history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert len(history["loss"]) == 25 and history["loss"][-1] < history["loss"][0]
    assert model.evaluate(X, y)["accuracy"] > 0.95
    assert model.predict(X).shape == (256, 2)


def test_one_hot_targets_and_binary_and_regression(xor_data):
    X, y = xor_data
    model = xor_model(backend="numpy")
    model.fit(X, np.eye(2)[y], epochs=2, verbose=0)
    binary = sd.nn.Sequential([sd.nn.Dense(8, activation="tanh"), sd.nn.Dense(1)], input_dim=2)
    binary.compile(loss="bce_with_logits", optimizer=sd.optim.Adam(0.05), backend="cpu")
    binary.fit(X, y, epochs=20, batch_size=32, verbose=0)
    assert binary.evaluate(X, y)["accuracy"] > 0.9
    Xs, ys = sd.datasets.sine(200, seed=0)
    for loss in ("mse", "huber", "mae"):
        reg = sd.nn.Sequential([sd.nn.Dense(16, activation="tanh"), sd.nn.Dense(1)], input_dim=1)
        reg.compile(loss=loss, optimizer=sd.optim.Adam(0.02), backend="cpu")
        h = reg.fit(Xs, ys, epochs=30, batch_size=32, verbose=0)
        assert h["loss"][-1] < h["loss"][0] and "accuracy" not in h.history


def test_training_is_reproducible(xor_data):
    X, y = xor_data
    runs = []
    for _ in range(2):
        model = xor_model(seed=5)
        model.fit(X, y, epochs=3, batch_size=20, verbose=0)  # 256 = 12*20 + 16: a short last batch
        runs.append(model.get_weights())
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_resume_from_checkpoint_matches_uninterrupted_run(xor_data, tmp_path):
    X, y = xor_data
    whole = xor_model(optimizer=sd.optim.Adam(0.02))
    whole.fit(X, y, epochs=6, batch_size=32, verbose=0)
    part = xor_model(optimizer=sd.optim.Adam(0.02))
    part.fit(X, y, epochs=4, batch_size=32, verbose=0)
    part.save(tmp_path / "run.symdl")
    resumed = sd.nn.load(tmp_path / "run.symdl")
    assert resumed.epoch == 4 and resumed.train_step.t == part.train_step.t
    resumed.fit(X, y, epochs=2, batch_size=32, verbose=0)
    w1, w2 = whole.get_weights(), resumed.get_weights()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-6)
    assert len(resumed.history["loss"]) == 6


def test_save_load_predict_identical(xor_data, tmp_path):
    X, y = xor_data
    model = xor_model(regularizer=sd.l2(1e-3))
    model.fit(X, y, epochs=3, verbose=0)
    model.save(tmp_path / "m.symdl")
    loaded = sd.nn.load(tmp_path / "m.symdl")
    assert np.array_equal(loaded.predict(X), model.predict(X))
    assert loaded.regularizer.coefficient == 1e-3 and loaded.optimizer.lr == 0.05
    for k, v in model.train_step.state["W1"].items():
        assert np.array_equal(loaded.train_step.state["W1"][k], v)


def test_failed_save_leaves_previous_checkpoint_intact(xor_data, tmp_path, monkeypatch):
    X, y = xor_data
    model = xor_model(backend="numpy")
    path = tmp_path / "m.symdl"
    model.save(path)
    before = path.read_bytes()
    model.fit(X, y, epochs=1, verbose=0)

    def crash(f, payload):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(sd.nn.checkpoint, "_savez", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.symdl"]  # no temporary file left behind
    assert sd.nn.load(path).epoch == 0


def test_corrupt_truncated_and_foreign_checkpoints(xor_data, tmp_path):
    model = xor_model(backend="numpy")
    path = tmp_path / "m.symdl"
    model.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.symdl").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        sd.nn.load(tmp_path / "trunc.symdl")
    (tmp_path / "junk.symdl").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="is not a symdl checkpoint"):
        sd.nn.load(tmp_path / "junk.symdl")
    np.savez(tmp_path / "other.npz", a=np.ones(2))
    with pytest.raises(CheckpointError, match="not a symdl checkpoint"):
        sd.nn.load(tmp_path / "other.npz")
    sd.nn.checkpoint.write(tmp_path / "future.symdl", {"format": sd.nn.checkpoint.FORMAT, "version": 99}, {})
    with pytest.raises(CheckpointError, match="version 99"):
        sd.nn.load(tmp_path / "future.symdl")
    meta, arrays = sd.nn.checkpoint.read(path)
    arrays["param/W1"] = np.ones((3, 3))
    sd.nn.checkpoint.write(tmp_path / "shape.symdl", meta, arrays)
    with pytest.raises(ValueError, match=r"'param/W1' has shape \(3, 3\), expected \(2, 8\)"):
        sd.nn.load(tmp_path / "shape.symdl")


def test_checkpoint_never_unpickles(tmp_path):
    """An object array (which would need pickle) is refused, not executed."""
    with open(tmp_path / "evil.symdl", "wb") as f:
        np.savez(f, __meta__=np.frombuffer(b'{"format": "x"}', np.uint8), obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CheckpointError):
        sd.nn.checkpoint.read(tmp_path / "evil.symdl")


def test_custom_activation_model_round_trip(xor_data, tmp_path):
    mish = sd.activation("mish_rt", lambda t: t * sp.tanh(sp.log(1 + sp.exp(t))))
    model = sd.nn.Sequential([sd.nn.Dense(4, activation=mish), sd.nn.Dense(2)], input_dim=2)
    model.compile(backend="numpy")
    model.save(tmp_path / "m.symdl")
    assert np.array_equal(sd.nn.load(tmp_path / "m.symdl").predict(xor_data[0]), model.predict(xor_data[0]))
    del sd.functions.REGISTRY["mish_rt"]
    with pytest.raises(CheckpointError, match="sd.activation\\('mish_rt'"):
        sd.nn.load(tmp_path / "m.symdl")


# --------------------------------------------------------------------------- callbacks & schedules


def test_early_stopping_restores_best_weights(xor_data):
    X, y = xor_data
    model = xor_model(optimizer=sd.optim.SGD(0.0))  # nothing improves: stop after `patience` epochs
    stop = sd.nn.EarlyStopping(monitor="val_loss", patience=2)
    history = model.fit(X, y, epochs=20, validation_data=(X, y), callbacks=[stop], verbose=0)
    assert len(history["loss"]) == 3 and stop.stopped_epoch == 2


def test_model_checkpoint_and_lr_schedules(xor_data, tmp_path):
    X, y = xor_data
    model = xor_model(optimizer=sd.optim.Adam(0.1))
    sched = sd.nn.LearningRateScheduler(sd.nn.step_decay(0.1, step_size=2, gamma=0.5))
    ckpt = sd.nn.ModelCheckpoint(tmp_path / "ep{epoch}.symdl")
    history = model.fit(X, y, epochs=4, callbacks=[sched, ckpt], verbose=0)
    assert history["lr"] == [0.1, 0.1, 0.05, 0.05]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ep{i}.symdl" for i in range(1, 5)]
    assert sd.nn.exponential_decay(1.0, 0.5)(3) == 0.125
    assert sd.nn.cosine_decay(1.0, 10)(10) == pytest.approx(0.0)


def test_history_plot(tmp_path):
    h = sd.nn.History({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7]})
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="matplotlib"):
            h.plot()
        return
    h.plot(tmp_path / "h.png")
    assert (tmp_path / "h.png").exists()


# --------------------------------------------------------------------------- data


def test_bad_data_is_refused_before_compiling(xor_data):
    X, y = xor_data
    model = xor_model()
    cases = [
        (X[:, :1], y, "X has 1 features, the model expects 2"),
        (X[0], y, "X must be 2-D"),
        (X, y[:-1], "X has 256 rows but y has 255"),
        (np.where(np.arange(256)[:, None] == 7, np.nan, X), y, "NaN or Inf .*row 7"),
        (X, y + 1, r"labels must lie in 0..1 for 2 classes, found 1..2"),
        (X, y + 0.5, "class labels must be integers"),
        (X, np.ones((256, 3)), r"labels \(n,\) or one-hot \(n, 2\)"),
    ]
    for Xb, yb, msg in cases:
        with pytest.raises(DataError, match=msg):
            model.fit(Xb, yb, verbose=0)
    assert not model.train_step.runner._ready, "nothing may compile before the data is checked"


def test_dataset_shapes_and_seeds():
    for fn in (sd.datasets.xor, sd.datasets.moons, sd.datasets.spirals):
        X1, y1 = fn(50, seed=3)
        X2, y2 = fn(50, seed=3)
        assert X1.shape == (50, 2) and np.array_equal(X1, X2) and np.array_equal(y1, y2)
    X, y = sd.datasets.sine(30, seed=1)
    assert X.shape == y.shape == (30, 1)
    Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.2, seed=0)
    assert len(Xte) == 6 and len(Xtr) == 24
    A, B = sd.datasets.standardize(Xtr, Xte)
    assert np.allclose(A.mean(0), 0) and np.allclose(A.std(0), 1)


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_reads_files_the_test_writes(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    floats = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    suffix = ".gz" if gz else ""
    for name, arr in (("img", images), ("lab", labels), ("flt", floats)):
        sd.datasets.save_idx(tmp_path / f"{name}{suffix}", arr)
        assert np.array_equal(sd.datasets.load_idx(tmp_path / f"{name}{suffix}"), arr)
    if gz:
        with gzip.open(tmp_path / "img.gz", "rb") as f:
            assert f.read(4) == bytes([0, 0, 8, 3])


def test_load_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        sd.datasets.load_idx(tmp_path / "bad")
    sd.datasets.save_idx(tmp_path / "ok", np.arange(10, dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(DataError, match="expected 10 bytes"):
        sd.datasets.load_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError):
        sd.datasets.load_idx(tmp_path / "missing")


# --------------------------------------------------------------------------- digits, CLI, examples


@pytest.mark.slow
def test_digits_reaches_97_percent():
    X, y = sd.datasets.digits()
    Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=0)
    Xtr, Xte = sd.datasets.standardize(Xtr, Xte)
    model = sd.nn.Sequential([sd.nn.Dense(128, activation="relu"), sd.nn.Dense(10)], input_dim=64)
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(1e-2), regularizer=sd.l2(1e-4))
    model.fit(Xtr, ytr, epochs=30, batch_size=64, verbose=0)
    assert model.evaluate(Xte, yte)["accuracy"] >= 0.97


def run(cmd, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout)


def test_cli_help_and_formulas():
    out = run([sys.executable, "-m", "symdl", "--help"])
    assert out.returncode == 0 and "formulas" in out.stdout and "train" in out.stdout
    out = run([sys.executable, "-m", "symdl", "formulas", "--layers", "2,16,1", "--activation", "tanh",
               "--loss", "bce_with_logits"])
    assert out.returncode == 0, out.stderr
    assert "∂L/∂W1 = x.T*" in out.stdout and "δ1 = (δ2*W2.T)⊙(1 - A1**2)" in out.stdout
    out = run([sys.executable, "-m", "symdl", "formulas", "--layers", "2,4,3", "--loss",
               "softmax_cross_entropy", "--latex"])
    assert out.returncode == 0 and r"\frac{\partial L}{\partial W_{1}}" in out.stdout
    out = run([sys.executable, "-m", "symdl", "formulas", "--layers", "2,x"])
    assert out.returncode == 2 and "comma-separated integers" in out.stderr


def test_cli_train(tmp_path):
    out = run([sys.executable, "-m", "symdl", "train", "--dataset", "xor", "--layers", "2,8,2", "--epochs", "15",
               "--quiet", "--save", str(tmp_path / "xor.symdl")])
    assert out.returncode == 0, out.stderr
    acc = float(out.stdout.split("held-out accuracy: ")[1].split()[0])
    assert acc > 0.9 and (tmp_path / "xor.symdl").exists()
    out = run([sys.executable, "-m", "symdl", "train", "--dataset", "digits", "--layers", "64,10,3", "--quiet"])
    assert out.returncode == 2 and "needs --layers 64,...,10" in out.stderr


EXAMPLES = ["xor", "moons", "digits", "digits_cnn", "sine_regression", "custom_activation", "regularization", "mnist_idx"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_run(name, tmp_path):
    args = [str(tmp_path / "moons.png")] if name == "moons" else []
    scratch = tmp_path / "tmp"  # the examples' temporary files go here, and must be gone afterwards
    scratch.mkdir()
    out = run([sys.executable, f"examples/{name}.py", *args], env={"SYMDL_QUICK": "1", "TMPDIR": str(scratch)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert [p.name for p in scratch.iterdir()] == [], "the example left temporary files behind"
    if name == "moons":
        assert (tmp_path / "moons.png").read_bytes()[:4] == b"\x89PNG"
    if name == "mnist_idx":
        assert "never downloads" in out.stdout


def test_mnist_idx_example_trains_on_written_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, arr in [("tx.gz", rng.integers(0, 256, (64, 28, 28))), ("ty.gz", rng.integers(0, 10, 64)),
                      ("vx", rng.integers(0, 256, (16, 28, 28))), ("vy", rng.integers(0, 10, 16))]:
        sd.datasets.save_idx(tmp_path / name, arr.astype(np.uint8))
        paths.append(str(tmp_path / name))
    out = run([sys.executable, "examples/mnist_idx.py", *paths], env={"SYMDL_QUICK": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test accuracy:" in out.stdout


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="nothing compiles")
def test_fit_says_when_it_compiles(xor_data, tmp_path, monkeypatch, capsys):
    """A compile that takes a while is announced; a model whose formulas are cached is not."""
    monkeypatch.setenv("SYMDL_CACHE_DIR", str(tmp_path))
    X, y = xor_data

    def fit():
        model = sd.nn.Sequential([sd.nn.Dense(5, activation="tanh"), sd.nn.Dense(1)],
                                 input_dim=2)
        model.compile(loss="bce_with_logits", optimizer="adam", backend="cpu")
        model.fit(X, y, epochs=1, batch_size=4, verbose=1)
        return capsys.readouterr()

    first = fit()
    assert "compiling the training step" in first.out + first.err
    second = fit()
    assert "compiling" not in second.out + second.err
