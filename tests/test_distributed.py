"""Data-parallel fit and sweeps on a real Dask cluster (two worker processes, one thread each).

Every wait is bounded (fit waits at most FIT_TIMEOUT per step, cluster calls have timeouts); the
cluster is shared by the module. Most tests use the NumPy backend (no Numba compile
in each worker process); one runs the ``cpu`` backend end to end.
"""
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

import symdl as sd

ROOT = Path(__file__).resolve().parents[1]
FIT_TIMEOUT = 60.0  # seconds one step may take before fit raises


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    # worker processes import symdl from this checkout, as the driver does
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([old] if old else []))
    try:
        cluster = distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                           dashboard_address=None, silence_logs=50)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    c = distributed.Client(cluster, timeout=30)
    c.wait_for_workers(2, timeout=60)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("symdl.distributed.cluster.DEFAULT_TIMEOUT", FIT_TIMEOUT)  # what model.fit(cluster=...) waits
        yield c
    c.close(timeout=30)
    cluster.close(timeout=30)


def _data(n=300, d=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.integers(0, classes, n)


def _model(optimizer, backend="numpy", regularizer=sd.l2(1e-3), dtype="float64", hidden=16):
    m = sd.nn.Sequential([sd.nn.Dense(hidden, activation="tanh"), sd.nn.Dense(3)], input_dim=4)
    m.compile(loss="softmax_cross_entropy", optimizer=optimizer, regularizer=regularizer, backend=backend,
              dtype=dtype, seed=0)
    return m


def _max_rel_error(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    assert wa.keys() == wb.keys()
    return max(float(np.max(np.abs(wa[k] - wb[k])) / np.max(np.abs(wa[k]))) for k in wa)


def _state_equal(a, b, rtol):
    sa, sb = a.train_step.state_dict(), b.train_step.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_allclose(sb[k], sa[k], rtol=rtol, atol=1e-300, err_msg=k)


OPTIMIZERS = {"SGD": lambda: sd.optim.SGD(0.1), "Momentum": lambda: sd.optim.Momentum(0.05),
              "Adam": lambda: sd.optim.Adam(0.01)}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sync_grads_equals_single_process(client, name):
    """Parameters, optimizer state, step count and logs after 2 epochs (10 steps, the last batch
    short) equal a single-process run on the same batches; the loss has an l2 term, which is not a
    per-row mean, and a learning-rate schedule changes lr between epochs."""
    X, y = _data()
    Xv, yv = _data(60, seed=1)
    schedule = sd.nn.step_decay(1.0, step_size=1, gamma=0.5)
    runs = []
    for cluster in (None, client):
        m = _model(OPTIMIZERS[name]())
        base = m.optimizer.lr
        cb = sd.nn.LearningRateScheduler(lambda e: base * schedule(e))
        kwargs = {} if cluster is None else {"cluster": cluster}
        m.fit(X, y, epochs=2, batch_size=64, verbose=0, callbacks=[cb], validation_data=(Xv, yv), **kwargs)
        runs.append(m)
    single, dist = runs
    assert _max_rel_error(single, dist) < 1e-9
    _state_equal(single, dist, rtol=1e-9)
    assert dist.train_step.t == single.train_step.t == 10
    assert dist.epoch == 2
    for k, v in single.history.history.items():
        np.testing.assert_allclose(dist.history.history[k], v, rtol=1e-9, err_msg=k)
    assert dist.history["lr"] == [OPTIMIZERS[name]().lr, 0.5 * OPTIMIZERS[name]().lr]


def test_sync_params_every_1_equals_gradient_averaging_for_sgd(client):
    X, y = _data()
    grads, params = _model(sd.optim.SGD(0.1)), _model(sd.optim.SGD(0.1))
    grads.fit(X, y, epochs=2, batch_size=50, verbose=0, cluster=client)
    params.fit(X, y, epochs=2, batch_size=50, verbose=0, cluster=client, sync="params", every=1)
    assert _max_rel_error(grads, params) < 1e-9
    assert params.train_step.t == grads.train_step.t == 12
    np.testing.assert_allclose(params.history["loss"], grads.history["loss"], rtol=1e-9)
    # with Adam the two differ: its update is not linear in the gradient
    adam_grads, adam_params = _model(sd.optim.Adam(0.05)), _model(sd.optim.Adam(0.05))
    adam_grads.fit(X, y, epochs=1, batch_size=50, verbose=0, cluster=client)
    adam_params.fit(X, y, epochs=1, batch_size=50, verbose=0, cluster=client, sync="params", every=1)
    assert _max_rel_error(adam_grads, adam_params) > 1e-6


def test_workers_are_other_processes_and_each_saw_exactly_its_shard(client):
    X, y = _data(301)
    for sync, every in (("grads", 1), ("params", 3)):
        m = _model(sd.optim.SGD(0.1))
        m.fit(X, y, epochs=3, batch_size=40, verbose=0, cluster=client, sync=sync, every=every)
        report = m.cluster_report
        workers = report["workers"]
        assert sorted(workers) == sorted(client.nthreads())  # not scheduler_info(): its cache can lack them
        pids = {r["pid"] for r in workers.values()}
        assert os.getpid() not in pids and len(pids) == 2
        rows = [r["rows"] for r in workers.values()]
        assert sorted(np.concatenate(rows).tolist()) == list(range(301))  # the shards partition the rows
        assert sorted(len(r) for r in rows) == [150, 151]
        for r in workers.values():
            assert r["shard_rows"] == len(r["rows"])
            np.testing.assert_array_equal(r["seen"], 3)  # each own row once per epoch, nothing else
        assert sum(r["steps"] for r in workers.values()) >= 3 * 8  # 8 batches per epoch, most split in two
        assert report["rounds"] == (3 * 8 if sync == "grads" else 3 * 3)


def test_sync_grads_cpu_backend(client):
    """The Numba path: gradient program compiled in each worker (from the shared compile cache),
    update program compiled in the driver; equals the single-process fused cpu step."""
    X, y = _data()
    single = _model(sd.optim.Adam(0.01), backend="cpu")
    single.fit(X, y, epochs=1, batch_size=64, verbose=0)
    # warm the compile cache the workers share: the same gradient program, compiled here first
    sd.value_and_grad(single.data_loss, single.params, backend="cpu", dtype="float64")(
        x=X[:2], y=np.eye(3)[y[:2]], **single.get_weights())
    dist = _model(sd.optim.Adam(0.01), backend="cpu")
    dist.fit(X, y, epochs=1, batch_size=64, verbose=0, cluster=client)
    assert _max_rel_error(single, dist) < 1e-9
    _state_equal(single, dist, rtol=1e-9)


def test_dask_array_is_split_by_chunks_without_reaching_the_driver(client, monkeypatch):
    da = pytest.importorskip("dask.array")
    X, y = _data(300)
    single = _model(sd.optim.Momentum(0.05))
    single.fit(X, y, epochs=1, batch_size=64, verbose=0)
    Xd, yd = da.from_array(X, chunks=(50, 4)), da.from_array(y, chunks=50)

    def refuse(*args, **kwargs):
        raise AssertionError("the training array was gathered to the driver")

    monkeypatch.setattr(type(Xd), "__array__", refuse)
    monkeypatch.setattr(type(Xd), "compute", refuse)
    dist = _model(sd.optim.Momentum(0.05))
    dist.fit(Xd, yd, epochs=1, batch_size=64, verbose=0, cluster=client)
    assert _max_rel_error(single, dist) < 1e-9
    for r in dist.cluster_report["workers"].values():  # whole chunks, 3 of the 6 each
        assert len(r["rows"]) == 150 and r["rows"][0] % 50 == 0
        np.testing.assert_array_equal(np.diff(r["rows"]), 1)


def test_digits_local_sgd_every_16_matches_single_process_accuracy(client):
    images, labels = sd.datasets.digits()
    Xtr, Xte, ytr, yte = sd.datasets.train_test_split(images, labels, test_size=0.25, seed=0)
    Xtr, Xte = sd.datasets.standardize(Xtr, Xte)
    acc = []
    for kwargs in ({}, {"cluster": client, "sync": "params", "every": 16}):
        m = sd.nn.Sequential([sd.nn.Dense(64, activation="relu"), sd.nn.Dense(10)], input_dim=64)
        m.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(1e-2), regularizer=sd.l2(1e-4),
                  backend="numpy", dtype="float32", seed=0)
        m.fit(Xtr, ytr, epochs=12, batch_size=32, verbose=0, **kwargs)
        acc.append(m.evaluate(Xte, yte)["accuracy"])
    single, local_sgd = acc
    assert single > 0.95
    assert local_sgd >= single - 0.01, acc


class _KillWorker(sd.nn.Callback):
    """At the end of the first epoch: remember the weights, then SIGKILL one worker process."""

    def __init__(self, pid):
        self.pid = pid

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.weights, self.t = self.model.get_weights(), self.model.train_step.t
            os.kill(self.pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("sync", ["grads", "params"])
def test_killed_worker_gives_a_clear_error_and_keeps_consistent_parameters(client, sync, tmp_path):
    from symdl.distributed import WorkerLostError

    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)
    victim = sorted(pids)[1]
    X, y = _data()
    m = _model(sd.optim.Adam(0.01))
    kill = _KillWorker(pids[victim])
    path = tmp_path / "epoch{epoch}.symdl"
    with pytest.raises(WorkerLostError, match=r"worker tcp://\S+ died .*steps? 6\b.*epoch 2") as info:
        m.fit(X, y, epochs=3, batch_size=64, verbose=0, cluster=client, sync=sync, every=2,
              callbacks=[kill, sd.nn.ModelCheckpoint(path)])
    assert info.value.worker == victim and info.value.step == 6 and info.value.epoch == 1
    assert m.epoch == 1 and m.train_step.t == kill.t == 5
    for k, w in kill.weights.items():  # the last consistent parameters: those after epoch 1
        np.testing.assert_array_equal(m.get_weights()[k], w)
    saved = sd.nn.load(tmp_path / "epoch1.symdl")
    assert saved.epoch == 1 and not (tmp_path / "epoch2.symdl").exists()
    for k, w in kill.weights.items():
        np.testing.assert_array_equal(saved.get_weights()[k], w)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it, for the tests after this one


def test_sweep_fits_one_model_per_configuration(client):
    from symdl.distributed import Table, sweep

    X, y = sd.datasets.xor(200, seed=0)

    def build(lr, units):
        m = sd.nn.Sequential([sd.nn.Dense(units, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
        m.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(lr), backend="numpy", seed=0)
        return m

    table = sweep(build, {"lr": [0.05, 1e-4], "units": [8]}, X, y, cluster=client, epochs=15, batch_size=32,
                  validation_data=(X, y), timeout=FIT_TIMEOUT)
    assert isinstance(table, Table) and [(r["lr"], r["units"]) for r in table] == [(0.05, 8), (1e-4, 8)]
    assert table[0]["val_accuracy"] > 0.9 > table[1]["val_accuracy"]
    assert table.sort("val_accuracy")[0]["lr"] == 0.05
    assert os.getpid() not in {r["pid"] for r in table}
    assert "val_accuracy" in str(table).splitlines()[0]


def _diverging_model():
    """A regression whose SGD steps (lr 1e4) overflow float32 in the first epoch (step 5 of 7)."""
    m = sd.nn.Sequential([sd.nn.Dense(16, activation="tanh"), sd.nn.Dense(1)], input_dim=1)
    m.compile(loss="mse", optimizer=sd.optim.SGD(1e4), backend="numpy", dtype="float32", seed=0)
    return m


@pytest.mark.parametrize("sync", ["grads", "params"])
def test_terminate_on_nan_stops_a_cluster_fit_as_it_stops_a_single_process_one(client, sync):
    """The cluster path runs the same loop: the first non-finite loss stops it with the same warning
    and the weights, optimizer state and step count go back to the start of the epoch."""
    X, y = sd.datasets.sine(200, seed=0)
    single = _diverging_model()
    with pytest.warns(RuntimeWarning, match=r"fit stopped: the training loss is (nan|inf|-inf) at epoch 1") as alone:
        single.fit(X, y, epochs=5, batch_size=32, verbose=0)
    dist = _diverging_model()
    start = dist.train_step.state_dict()
    with pytest.warns(RuntimeWarning, match=r"fit stopped: the training loss is (nan|inf|-inf) at epoch 1, "
                                            r"step \d+ of 7 .*restored to the start of epoch 1") as spread:
        dist.fit(X, y, epochs=5, batch_size=32, verbose=0, cluster=client, sync=sync, every=2)
    if sync == "grads":  # the same steps, so the same step fails
        stopped = [[str(w.message) for w in record if "fit stopped" in str(w.message)] for record in (spread, alone)]
        assert stopped[0] == stopped[1] and len(stopped[0]) == 1
    assert dist.stop_training and dist.epoch == 0 and dist.history.history == {}
    assert dist.train_step.t == 0
    for k, v in start.items():
        np.testing.assert_array_equal(dist.train_step.state_dict()[k], v, err_msg=k)
    # turned off, the cluster fit trains on through the non-finite losses, as a single process does
    dist.fit(X, y, epochs=2, batch_size=32, verbose=0, cluster=client, sync=sync, every=2, terminate_on_nan=False)
    assert dist.epoch == 2 and not np.isfinite(dist.history["loss"][-1])


def test_bad_arguments_are_refused(client):
    X, y = _data()
    m = _model(sd.optim.SGD(0.1))
    with pytest.raises(ValueError, match="sync must be"):
        m.fit(X, y, cluster=client, sync="weights", verbose=0)
    with pytest.raises(ValueError, match="every must be"):
        m.fit(X, y, cluster=client, sync="params", every=0, verbose=0)
    with pytest.raises(sd.datasets.DataError, match="labels must lie"):
        m.fit(X, y + 5, cluster=client, verbose=0)
    with pytest.raises(TypeError, match="cluster must be"):
        m.fit(X, y, cluster=42, verbose=0)
    assert m.epoch == 0 and m.train_step.t == 0


def test_without_distributed_cluster_raises_an_import_error_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # "import distributed" now raises ImportError
    X, y = _data()
    m = _model(sd.optim.SGD(0.1))
    with pytest.raises(ImportError, match=r'pip install "symdl\[distributed\]"'):
        m.fit(X, y, cluster="tcp://127.0.0.1:8786", verbose=0)
    m.fit(X, y, verbose=0)  # the single-process path needs nothing extra
    assert m.epoch == 1


# --------------------------------------------------------------------------- token models

V, T, D = 7, 4, 6  # vocabulary, sequence length, width


def _token_data(n=40, seed=0):
    X = np.random.default_rng(seed).integers(0, V, size=(n, T)).astype(np.int32)
    return X, np.roll(X, 1, axis=1)  # per-token labels (n, T): the previous token


def _token_model(optimizer, attention=False):
    inp = sd.nn.Input(shape=(T,), dtype="int32")
    h = sd.nn.TokenAndPositionEmbedding(V, T, D)(inp)
    if attention:
        h = h + sd.nn.MultiHeadAttention(num_heads=2, key_dim=3)(h, h, use_causal_mask=True)
    h = sd.nn.LayerNormalization()(sd.nn.Dense(D, activation="gelu")(h))
    m = sd.nn.Model(inp, sd.nn.Dense(V)(h))
    m.compile(loss="softmax_cross_entropy", optimizer=optimizer, backend="numpy", dtype="float64", seed=0)
    return m


def test_token_model_trains_on_the_cluster_as_in_one_process(client):
    """Token ids (n, T) and per-token labels (n, T): NumPy arrays and Dask arrays (checked by the
    workers) give the single-process run's weights, losses and per-token accuracies."""
    da = pytest.importorskip("dask.array")
    X, Y = _token_data()
    Xv, Yv = _token_data(8, seed=1)
    single = _token_model(sd.optim.Adam(0.01))
    single.fit(X, Y, epochs=2, batch_size=16, verbose=0, validation_data=(Xv, Yv))
    for data in ((X, Y), (da.from_array(X, chunks=(10, T)), da.from_array(Y, chunks=(10, T)))):
        dist = _token_model(sd.optim.Adam(0.01))
        dist.fit(*data, epochs=2, batch_size=16, verbose=0, validation_data=(Xv, Yv), cluster=client)
        assert _max_rel_error(single, dist) < 1e-9
        assert dist.train_step.t == single.train_step.t == 6
        for k, v in single.history.history.items():
            np.testing.assert_allclose(dist.history.history[k], v, rtol=1e-9, err_msg=k)
    # sync="params" with plain SGD, every step: parameter averaging equals gradient averaging
    grads, params = _token_model(sd.optim.SGD(0.5)), _token_model(sd.optim.SGD(0.5))
    grads.fit(X, Y, epochs=1, batch_size=16, verbose=0, cluster=client)
    params.fit(X, Y, epochs=1, batch_size=16, verbose=0, cluster=client, sync="params", every=1)
    assert _max_rel_error(grads, params) < 1e-9
    np.testing.assert_allclose(params.history["accuracy"], grads.history["accuracy"], rtol=1e-12)


def test_bad_token_chunks_are_clear_errors_from_the_workers(client):
    da = pytest.importorskip("dask.array")
    X, Y = _token_data()
    m = _token_model(sd.optim.SGD(0.1))
    bad = X.copy()
    bad[33, 2] = V  # outside the vocabulary, in the second worker's chunks
    with pytest.raises(sd.datasets.DataError, match=r"Dask array rows 20\.\.39, X\[0\] is row 20\).*"
                                                    r"'token_and_position_embedding_1': token id 7 at X\[13, 2\]"):
        m.fit(da.from_array(bad, chunks=(10, T)), da.from_array(Y, chunks=(10, T)), verbose=0, cluster=client)
    with pytest.raises(sd.datasets.DataError, match=r"labels \(n, 4\) or one-hot \(n, 4, 7\)"):
        m.fit(da.from_array(X, chunks=(10, T)), da.from_array(Y[:, :3], chunks=(10, 3)), verbose=0, cluster=client)
    with pytest.raises(sd.datasets.DataError, match="token"):  # NumPy arrays: checked before anything starts
        m.fit(bad.astype(float), Y, verbose=0, cluster=client)
    assert m.epoch == 0 and m.train_step.t == 0


def test_token_model_with_attention_trains_on_the_cluster(client):
    """The workers rebuild the model from its checkpoint (attention replays with its saved mask). The
    key bias is left out of the comparison: a row softmax is blind to a constant added to its row,
    so its gradient is 0 up to rounding, which Adam's normalised step turns into ±lr moves that
    differ between any two summation orders."""
    X, Y = _token_data()
    single = _token_model(sd.optim.Adam(0.01), attention=True)
    single.fit(X, Y, epochs=1, batch_size=16, verbose=0)
    dist = _token_model(sd.optim.Adam(0.01), attention=True)
    dist.fit(X, Y, epochs=1, batch_size=16, verbose=0, cluster=client)
    wa, wb = single.get_weights(), dist.get_weights()
    for k in wa:
        if not k.startswith("key_bias"):
            assert float(np.max(np.abs(wa[k] - wb[k])) / np.max(np.abs(wa[k]))) < 1e-9, k
    np.testing.assert_allclose(dist.history.history["loss"], single.history.history["loss"], rtol=1e-9)
