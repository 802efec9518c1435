"""Scale out on Dask distributed: data-parallel ``fit`` and parallel sweeps.

symdl does not run its own cluster: it runs on `Dask distributed
<https://distributed.dask.org>`_ (``pip install "symdl[distributed]"``), locally
(``LocalCluster``) or on a scheduler you already have (``Client("tcp://host:8786")``).

* ``model.fit(X, y, cluster=client)`` (``sync="grads"``, the default): exact synchronous
  data parallelism. Each worker holds one shard of the rows (sent once, pinned to it).
  Every global batch (the same batches as a single-process run: ``nn.batches``) is
  split by which worker owns each row; each worker runs the model's compiled gradient
  program (``sd.value_and_grad`` of the data loss) on its rows; the driver averages the
  shard gradients weighted by rows and applies one optimizer update, itself a compiled
  program (see ``UpdateProgram``). The parameters equal a single-process run's.
* ``sync="params", every=k``: local SGD. Workers run ``k`` fused training steps
  (``sd.compile``) on their own rows of the same global batches, then the driver
  averages parameters and optimizer state (weighted by rows).
* ``sweep(build_fn, grid, X, y, cluster=client)``: one model per configuration, fitted
  in parallel on the cluster; returns a ``Table``.

Nothing here imports ``dask`` or ``distributed`` until a cluster is used.

>>> import symdl as sd
>>> from symdl.distributed import grid_points, split_rows
>>> tuple(len(s) for s in split_rows(10, 3))
(4, 3, 3)
>>> for point in grid_points({"lr": (0.1, 0.01), "units": (8,)}): print(point)
{'lr': 0.1, 'units': 8}
{'lr': 0.01, 'units': 8}
>>> print(Table([{"lr": 0.1, "val_accuracy": 0.9}, {"lr": 0.01, "val_accuracy": 0.95}]).sort("val_accuracy"))
lr    val_accuracy
----  ------------
0.01  0.95
0.1   0.9
"""
from __future__ import annotations

import itertools
import os
import tempfile
import time
import uuid

import numpy as np

from ..backends.threads import set_num_threads
from ..nn.datasets import check_dataset
from ..graph.nodes import Input, hadamard, total
from ..nn import batches, load
from ..nn.fitting import DISTRIBUTED, end_epoch
from ..run.pipeline import compile as sd_compile, value_and_grad

INSTALL_HINT = 'pip install "symdl[distributed]"'

#: Seconds a worker may take for one step (or round) before ``fit`` gives up (``timeout=None``).
DEFAULT_TIMEOUT = 120.0
_POLL = 0.25  # seconds between liveness checks while waiting


class WorkerLostError(RuntimeError):
    """A worker died (or left the cluster) during a distributed ``fit``.

    ``worker`` is its address, ``step`` the global step (1-based) that could not be
    completed, ``epoch`` the epoch (0-based). The model keeps the parameters of the
    last completed step (``sync="grads"``) or averaging round (``sync="params"``).
    """

    def __init__(self, message, worker=None, step=None, epoch=None):
        super().__init__(message)
        self.worker, self.step, self.epoch = worker, step, epoch


class ClusterTimeoutError(TimeoutError):
    """A step (or round) took longer than ``timeout`` seconds; nothing was updated."""


def _dask():
    """The ``distributed`` module, or an ImportError that says what to install."""
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError as exc:
        raise ImportError(f"symdl's cluster mode runs on Dask distributed, which is not installed: "
                          f"{INSTALL_HINT}") from exc
    return distributed


def as_client(cluster):
    """``(client, owned)`` for a ``Client``, a cluster object (``LocalCluster``...) or an address."""
    distributed = _dask()
    if isinstance(cluster, distributed.Client):
        return cluster, False
    if isinstance(cluster, str) or hasattr(cluster, "scheduler_address"):
        return distributed.Client(cluster, timeout=30), True
    raise TypeError(f"cluster must be a distributed.Client, a cluster object or a scheduler address, got {cluster!r}")


# ---------------------------------------------------------------------------- small pieces


def split_rows(n: int, parts: int) -> list:
    """Contiguous row ranges of (nearly) equal size, one per worker."""
    return np.array_split(np.arange(n), parts)


def grid_points(grid) -> list:
    """A dict of lists (every combination) or a list of dicts, as a list of dicts."""
    if isinstance(grid, dict):
        keys = list(grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    return [dict(g) for g in grid]


class Table(list):
    """Rows (dicts) with aligned printing; ``sort(column)`` puts the best first."""

    def sort(self, column, descending=None):
        """A new table ordered by ``column`` (descending for accuracies, ascending otherwise)."""
        if descending is None:
            descending = "acc" in column
        key = lambda r: (r.get(column) is None, -r[column] if descending and r.get(column) is not None else r.get(column))  # noqa: E731
        return Table(sorted(self, key=key))

    def __str__(self):
        cols = list(dict.fromkeys(k for r in self for k in r))
        fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
        rows = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in self]
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _correct(kind, out, Y) -> float:
    """Correct predictions in a batch (the same rule as ``Sequential``'s accuracy)."""
    if kind == "classes":
        return float(np.sum(out.argmax(1) == Y.argmax(1)))
    if kind == "binary":
        return float(np.sum((out > 0) == (Y > 0.5)))
    return 0.0


def _weighted_sum(parts) -> dict:
    """``Σ weight · arrays[k]`` for each key, accumulated in float64."""
    out = {}
    for weight, arrays in parts:
        for k, a in arrays.items():
            term = np.multiply(a, weight, dtype=np.float64)
            if k in out:
                out[k] += term
            else:
                out[k] = term
    return out


def _model_blob(model) -> bytes:
    """The model as checkpoint bytes (architecture, compile options): rebuilt on each worker."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.symdl")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def _load_blob(blob: bytes, backend: str):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.symdl")
        with open(path, "wb") as f:
            f.write(blob)
        return load(path, backend=backend)


def _penalty(model, params) -> float:
    """The regulariser's value (the loss a single-process step reports includes it)."""
    reg = model.regularizer
    if reg is None:
        return 0.0
    f = np.abs if reg.kind == "l1" else np.square
    return reg.coefficient * sum(float(np.sum(f(np.asarray(params[str(W.name)], np.float64)))) for W in model.kernels)


class UpdateProgram:
    """The optimizer update as its own compiled program, fed a gradient each step.

    For each parameter ``p`` the program is the training step of the loss
    ``sum(p ⊙ G_p) + regulariser(p)``, where ``G_p`` is an input with ``p``'s shape: its
    gradient is ``G_p + regulariser'(p)``, so one ``step(G_p=g)`` applies exactly the
    update the fused single-process step applies with data gradient ``g``. The
    regulariser is not a per-row mean, so it is added here once, never on the shards.
    Parameters with the same number of rows share one program (one batch size).
    """

    def __init__(self, model):
        kernels = {W.name for W in model.kernels}
        groups = {}
        for p in model.params:
            groups.setdefault(int(p.shape[0]), []).append(p)
        self.steps = []
        for params in groups.values():
            loss = None
            for p in params:
                term = total(hadamard(p, Input(f"G_{p.name}", *p.shape)))
                if model.regularizer is not None and p.name in kernels:
                    term = term + model.regularizer(p)
                loss = term if loss is None else loss + term
            step = sd_compile(loss, params, optimizer=model.optimizer, backend=model.backend, dtype=model.dtype)
            self.steps.append((step, [(str(p.name), p.shape) for p in params]))

    def load(self, state: dict) -> None:
        """Take parameters, optimizer state and step count from a ``TrainStep.state_dict()``."""
        for step, names in self.steps:
            step.load_state_dict({k: v for k, v in state.items() if k == "t" or k.split("/")[1] in dict(names)})

    def state_dict(self) -> dict:
        out = {}
        for step, _ in self.steps:
            out.update(step.state_dict())
        return out

    @property
    def params(self) -> dict:
        return {k: v for step, _ in self.steps for k, v in step.params.items()}

    def apply(self, grads: dict) -> None:
        """One optimizer update with the data-loss gradients ``grads`` (by parameter name).

        It runs on one thread: the loops are memory-bound, and on a host shared with worker
        processes a parallel loop waits for busy cores (measured: 24 ms against 1.2 ms for
        the 784-256-256-10 model's Adam update).
        """
        import numba

        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            for step, names in self.steps:
                feed = {f"G_{k}": np.ascontiguousarray(grads[k], step.dtype).reshape(int(s[0]), int(s[1]))
                        for k, s in names}
                step.step(check_finite=False, **feed)
        finally:
            numba.set_num_threads(threads)


# ---------------------------------------------------------------------------- the worker side

_WORKER_STATE = {}  # fit key -> _Shard, in each worker process
_NO_SHARD = "has no shard for this fit"


def _shard(key):
    try:
        return _WORKER_STATE[key]
    except KeyError:
        raise LookupError(f"worker (pid {os.getpid()}) {_NO_SHARD} ({key}): it restarted") from None


class _Shard:
    """What one worker keeps for one fit: its rows, the programs, counters."""

    def __init__(self, blob, backend, sync, X, Y, rows, threads):
        if threads:
            set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        started = time.perf_counter()
        # sync="grads" needs only the graph here (the gradient program is compiled below), so the
        # worker's own copy of the model uses the NumPy backend: no Numba compile for an unused step
        self.model = _load_blob(blob, backend if sync == "params" else "numpy")
        self.X = np.ascontiguousarray(X, self.model.train_step.dtype)
        self.Y = np.ascontiguousarray(Y, self.model.train_step.dtype)
        self.rows = np.asarray(rows)
        self.seen = np.zeros(len(self.X), np.int64)  # how often each row took part in a step
        self.steps = 0
        if sync == "grads":
            self.grad = value_and_grad(self.model.data_loss, self.model.params, backend=backend,
                                           dtype=self.model.dtype)
        self.setup_seconds = time.perf_counter() - started

    def warm_up(self, sync):
        """Run (and so compile, or load from the cache) the program once on one row."""
        xb, yb = self.X[:1], self.Y[:1]
        if sync == "grads":
            self.grad(x=xb, y=yb, **self.model.get_weights())
        else:
            saved = self.model.train_step.state_dict()
            self.model.train_step.step(x=xb, y=yb)
            self.model.train_step.load_state_dict(saved)


def _setup(key, blob, backend, sync, X, Y, rows, threads, check):
    """Task: build this worker's shard state (X, Y are lists of chunks for a Dask array)."""
    if isinstance(X, list):
        X, Y = check_dataset(np.concatenate(X), np.concatenate(Y), what="training data (Dask array)", **check)
    shard = _Shard(blob, backend, sync, X, Y, rows, threads)
    started = time.perf_counter()
    shard.warm_up(sync)
    _WORKER_STATE[key] = shard
    return {"pid": os.getpid(), "shard_rows": len(shard.X), "setup_seconds": shard.setup_seconds,
            "compile_seconds": time.perf_counter() - started}


def _grad_task(key, params, local):
    """Task (sync="grads"): the data loss and its gradients on this worker's rows ``local``."""
    s = _shard(key)
    started = time.perf_counter()
    xb, yb = s.X[local], s.Y[local]
    loss, grads = s.grad(x=xb, y=yb, **params)
    correct = 0.0
    if s.model.kind != "regression":
        s.model.set_weights(params)
        correct = _correct(s.model.kind, s.model.predict(xb, batch_size=len(xb)), yb)
    s.seen[local] += 1
    s.steps += 1
    return {"loss": loss, "grads": grads, "rows": len(local), "correct": correct,
            "seconds": time.perf_counter() - started}


def _params_task(key, state, lr_values, t0, steps):
    """Task (sync="params"): fused local steps on this worker's rows, one index array per step."""
    s = _shard(key)
    started = time.perf_counter()
    ts = s.model.train_step
    ts.load_state_dict(state)
    ts.optimizer.values.update(lr_values)
    total = correct = 0.0
    rows = 0
    for j, local in enumerate(steps):
        if len(local) == 0:
            continue
        xb, yb = s.X[local], s.Y[local]
        ts.t = t0 + j  # step() adds one: Adam's bias correction counts global steps
        loss = ts.step(x=xb, y=yb, check_finite=False)
        total += loss * len(local)
        correct += _correct(s.model.kind, ts.output("out"), yb)
        rows += len(local)
        s.seen[local] += 1
        s.steps += 1
    out = ts.state_dict()
    out.pop("t")
    return {"state": out, "loss": total, "rows": rows, "correct": correct, "seconds": time.perf_counter() - started}


def _report_task(key, release):
    s = _shard(key)
    if release:
        del _WORKER_STATE[key]
    return {"pid": os.getpid(), "rows": s.rows, "seen": s.seen, "steps": s.steps}


# ---------------------------------------------------------------------------- the driver side


class DataParallel:
    """A model's shards placed on a cluster's workers, and the step loops over them.

    ``fit`` (and ``Sequential.fit(..., cluster=...)``) use this; it is public for those who
    want to drive epochs themselves (``train_epoch``) or read the workers' counters
    (``report``).
    """

    def __init__(self, client, model, X, Y, *, sync="grads", every=1, timeout=None):
        if sync not in ("grads", "params"):
            raise ValueError(f"sync must be 'grads' or 'params', got {sync!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.distributed = _dask()
        self.client, self.model, self.sync, self.every = client, model, sync, every
        self.timeout = float(DEFAULT_TIMEOUT if timeout is None else timeout)
        info = client.scheduler_info()["workers"]
        self.workers = sorted(info)
        if not self.workers:
            raise RuntimeError("the cluster has no workers")
        self.threads = {w: int(info[w].get("nthreads", 1)) for w in self.workers}
        self.key = f"symdl-fit-{uuid.uuid4().hex}"
        self.step = int(model.train_step.t)  # global steps taken so far
        # per sync round: wall time waiting for the workers, the slowest worker's compute inside
        # its task, and the driver's own work after the round (averaging, the update program)
        self.rounds, self.round_seconds, self.worker_seconds, self.driver_seconds = 0, 0.0, 0.0, 0.0
        self._futures = []
        blob = _model_blob(model)
        check = dict(kind=model.kind, outputs=model.units, input_dim=model.input_dim)
        placed = self._place(X, Y)
        setups = {}
        for w, (xs, ys, rows) in placed.items():
            setups[w] = self._submit(w, _setup, self.key, blob, model.backend, sync, xs, ys, rows,
                                     self.threads[w], check)
        self.workers = [w for w in self.workers if w in setups]
        try:
            self.setup = self._wait(setups, what="setting up the workers")
        except BaseException:
            self.close()  # the workers that did set up forget their shard
            raise
        if sync == "grads":
            self.update = UpdateProgram(model)
            self.update.load(model.train_step.state_dict())
            warm = self.update.state_dict()  # compile the update program now (or load it from the cache)
            self.update.apply({k: np.zeros_like(v) for k, v in self.update.params.items()})
            self.update.load(warm)
        self.state = model.train_step.state_dict()

    # -- placement -------------------------------------------------------------------------

    def _place(self, X, Y) -> dict:
        """Send each worker its shard once; returns ``{worker: (X part, Y part, global rows)}``."""
        if hasattr(X, "to_delayed") and hasattr(X, "chunks"):
            return self._place_dask(X, Y)
        n = len(X)
        self.n = n
        self.owner = np.empty(n, np.int64)
        self.local = np.empty(n, np.int64)
        out = {}
        for i, (w, rows) in enumerate(zip(self.workers, split_rows(n, len(self.workers)))):
            if len(rows) == 0:
                continue
            self.owner[rows], self.local[rows] = i, np.arange(len(rows))
            xs, ys = self.client.scatter([X[rows], Y[rows]], workers=[w], hash=False)
            self._futures += [xs, ys]
            out[w] = (xs, ys, rows)
        return out

    def _place_dask(self, X, Y) -> dict:
        """Split a Dask array by its row chunks; chunks go worker to worker, never to the driver."""
        X = X.rechunk({1: -1}) if X.ndim == 2 else X
        row_chunks = X.chunks[0]
        if hasattr(Y, "to_delayed"):
            Y = Y.rechunk({0: row_chunks, **({1: -1} if Y.ndim == 2 else {})})
            y_parts = list(Y.to_delayed().ravel())
        else:
            Y = np.asarray(Y)
            edges = np.cumsum((0,) + tuple(row_chunks))
            y_parts = [Y[a:b] for a, b in zip(edges[:-1], edges[1:])]
        x_futs = self.client.compute(list(X.to_delayed().ravel()))
        y_futs = [self.client.compute(p) if hasattr(p, "dask") else self.client.scatter(p, hash=False) for p in y_parts]
        self._futures += x_futs + y_futs
        self.distributed.wait(x_futs + y_futs, timeout=self.timeout)
        n = int(sum(row_chunks))
        self.n = n
        self.owner = np.empty(n, np.int64)
        self.local = np.empty(n, np.int64)
        # contiguous runs of chunks of about n / workers rows each: balanced, in row order
        target = n / len(self.workers)
        out, start = {}, 0
        for c, rows_c in enumerate(row_chunks):
            i = min(int((start + rows_c / 2) // target), len(self.workers) - 1)
            w = self.workers[i]
            xs, ys, rows = out.setdefault(w, ([], [], []))
            xs.append(x_futs[c])
            ys.append(y_futs[c])
            rows.extend(range(start, start + rows_c))
            start += rows_c
        for i, w in enumerate(self.workers):
            if w in out:
                rows = np.asarray(out[w][2])
                self.owner[rows], self.local[rows] = i, np.arange(len(rows))
                out[w] = (out[w][0], out[w][1], rows)
        return out

    # -- waiting -----------------------------------------------------------------------------

    def _submit(self, worker, fn, *args):
        return self.client.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False)

    def _wait(self, futures: dict, what: str, epoch=None) -> dict:
        """Results of ``{worker: future}``; a dead worker, a task error or the timeout raises."""
        deadline = time.monotonic() + self.timeout
        pending = list(futures.values())
        while not all(f.done() for f in pending):
            try:
                self.distributed.wait(pending, timeout=_POLL)
            except TimeoutError:
                pass
            if all(f.done() for f in pending) or any(f.status == "error" for f in pending):
                break
            alive = set(self.client.scheduler_info()["workers"])
            for w in futures:
                if w not in alive:
                    self._lost(w, what, epoch)
            if time.monotonic() > deadline:
                slow = [w for w, f in futures.items() if not f.done()]
                raise ClusterTimeoutError(f"{what}: no answer from worker(s) {', '.join(slow)} within "
                                          f"{self.timeout:g} s (fit's timeout=); the model keeps the "
                                          f"parameters of step {self.step}")
        for w, f in futures.items():
            if f.status == "error":
                exc = f.exception()
                if isinstance(exc, LookupError) and _NO_SHARD in str(exc) or not self._alive(w):
                    self._lost(w, what, epoch)
                raise exc
            if f.status != "finished":  # lost or cancelled: its worker went away
                self._lost(w, what, epoch)
        try:
            values = self.client.gather(pending, errors="raise")
        except Exception:
            for w in futures:
                if not self._alive(w):
                    self._lost(w, what, epoch)
            raise
        return dict(zip(futures, values))

    def _alive(self, worker) -> bool:
        return worker in self.client.scheduler_info()["workers"]

    def _lost(self, worker, what, epoch):
        where = f" (epoch {epoch + 1})" if epoch is not None else ""
        raise WorkerLostError(f"worker {worker} died or left the cluster while {what}{where}; the model keeps "
                              f"the parameters of step {self.step} (the last completed one)",
                              worker=worker, step=self.step + 1, epoch=epoch)

    # -- steps -------------------------------------------------------------------------------

    def _split(self, idx) -> dict:
        """This global batch's rows, by worker, as positions in each worker's shard."""
        owner = self.owner[idx]
        return {w: self.local[idx[owner == i]] for i, w in enumerate(self.workers)}

    def train_epoch(self, epoch: int, batch_size: int, seed: int, shuffle: bool = True) -> dict:
        """One epoch over the same batches a single-process ``fit`` takes; returns the logs."""
        groups = batches(self.n, batch_size, seed, epoch, shuffle)
        if self.sync == "grads":
            return self._epoch_grads(groups, epoch)
        return self._epoch_params(groups, epoch)

    def _epoch_grads(self, groups, epoch):
        model, total, correct, seen = self.model, 0.0, 0.0, 0
        for idx in groups:
            parts = {w: loc for w, loc in self._split(idx).items() if len(loc)}
            params = {k: v.copy() for k, v in self.update.params.items()}  # sent as they are now
            started = time.perf_counter()
            futures = {w: self._submit(w, _grad_task, self.key, params, loc) for w, loc in parts.items()}
            results = self._wait(futures, f"computing the gradients of step {self.step + 1}", epoch)
            wall = time.perf_counter() - started
            n = sum(r["rows"] for r in results.values())
            grads = _weighted_sum([(r["rows"] / n, r["grads"]) for r in results.values()])
            loss = sum(r["loss"] * r["rows"] for r in results.values()) / n + _penalty(model, params)
            self.update.apply(grads)
            self.step += 1
            self._log_round(wall, results, time.perf_counter() - started - wall)
            total += loss * n
            correct += sum(r["correct"] for r in results.values())
            seen += n
        self.state = self.update.state_dict()
        return self._logs(total, correct, seen)

    def _epoch_params(self, groups, epoch):
        model, total, correct, seen = self.model, 0.0, 0.0, 0
        for start in range(0, len(groups), self.every):
            chunk = groups[start : start + self.every]
            split = [self._split(idx) for idx in chunk]
            state = {k: v for k, v in self.state.items() if k != "t"}
            lr_values = dict(model.optimizer.values)
            begun = time.perf_counter()
            futures = {w: self._submit(w, _params_task, self.key, state, lr_values, self.step,
                                       [s[w] for s in split])
                       for w in self.workers if any(len(s[w]) for s in split)}
            steps = f"steps {self.step + 1}-{self.step + len(chunk)}" if len(chunk) > 1 else f"step {self.step + 1}"
            results = self._wait(futures, f"running local {steps}", epoch)
            wall = time.perf_counter() - begun
            n = sum(r["rows"] for r in results.values())
            averaged = _weighted_sum([(r["rows"] / n, r["state"]) for r in results.values()])
            dt = model.train_step.dtype
            self.step += len(chunk)
            self.state = {k: v.astype(dt) for k, v in averaged.items()}
            self.state["t"] = np.array(self.step)
            self._log_round(wall, results, time.perf_counter() - begun - wall)
            total += sum(r["loss"] for r in results.values())
            correct += sum(r["correct"] for r in results.values())
            seen += n
        return self._logs(total, correct, seen)

    def _log_round(self, wall, results, driver):
        slowest = max(r["seconds"] for r in results.values())
        self.rounds += 1
        self.round_seconds += wall
        self.worker_seconds += slowest
        self.driver_seconds += driver

    def _logs(self, total, correct, seen):
        logs = {"loss": total / seen}
        if self.model.kind != "regression":
            logs["accuracy"] = correct / seen
        return logs

    def commit(self):
        """Write the last consistent parameters, optimizer state and step count into the model."""
        if self.sync == "grads":
            self.state = self.update.state_dict()
        self.model.train_step.load_state_dict(self.state)

    @property
    def sync_overhead(self) -> float:
        """Mean seconds per sync round not spent computing on the slowest worker."""
        return (self.round_seconds - self.worker_seconds) / max(self.rounds, 1)

    def report(self, release: bool = False) -> dict:
        """Per-worker counters (pid, the shard's global rows, how often each was used) and sync timings."""
        futures = {w: self._submit(w, _report_task, self.key, release) for w in self.workers}
        workers = self._wait(futures, "collecting the workers' counters")
        for w, r in workers.items():
            r.update({k: v for k, v in self.setup[w].items() if k != "pid"})
        return {"sync": self.sync, "every": self.every, "workers": workers, "rounds": self.rounds,
                "round_seconds": self.round_seconds, "worker_seconds": self.worker_seconds,
                "driver_seconds": self.driver_seconds, "sync_overhead_seconds": self.sync_overhead}

    def close(self):
        """Forget the shards on the workers (best effort: a dead worker has nothing to forget)."""
        try:
            alive = set(self.client.scheduler_info()["workers"])
            futures = [self._submit(w, _report_task, self.key, True) for w in self.workers if w in alive]
            self.distributed.wait(futures, timeout=min(self.timeout, 10.0))
        except Exception:  # noqa: BLE001 - cleanup must not hide the real error
            pass
        self._futures = []


# ---------------------------------------------------------------------------- fit


def _as_numpy(a):
    return a.compute() if hasattr(a, "compute") and hasattr(a, "chunks") else a


def fit(model, X, y, *, cluster, sync="grads", every=1, epochs=1, batch_size=32, validation_data=None,
        validation_split=0.0, shuffle=True, callbacks=None, verbose=1, seed=None, timeout=None):
    """``model.fit`` on a Dask cluster: the same loop (callbacks, validation, history) with
    each epoch's steps run by ``DataParallel``. ``Sequential.fit(..., cluster=...)`` calls this.

    ``X``, ``y`` may be NumPy arrays (split into contiguous shards, one per worker) or Dask
    arrays (split by their row chunks, which move between workers, never to the driver).
    The workers' counters and sync timings are left in ``model.cluster_report``.
    """

    if sync not in ("grads", "params"):
        raise ValueError(f"sync must be 'grads' or 'params', got {sync!r}")
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every must be a positive integer, got {every!r}")
    client, owned = as_client(cluster)
    if model.train_step is None:
        raise RuntimeError("call model.compile(...) first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check = dict(kind=model.kind, outputs=model.units, input_dim=model.input_dim)
    lazy = hasattr(X, "to_delayed") and hasattr(X, "chunks")
    Xv = Yv = None
    if validation_data is None and validation_split:
        if not 0 < validation_split < 1:
            raise ValueError(f"validation_split must be between 0 and 1, got {validation_split}")
        k = int(len(X) * (1 - validation_split))
        X, y, Xv, Yv = X[:k], y[:k], _as_numpy(X[k:]), _as_numpy(y[k:])
    elif validation_data is not None:
        Xv, Yv = (_as_numpy(a) for a in validation_data)
    if Xv is not None:
        check_dataset(Xv, Yv, what="validation data", **check)  # refused now, before any cluster work
    if not lazy:
        X, Y = check_dataset(X, y, what="training data", **check)
        dt = model.train_step.dtype
        X, Y = np.ascontiguousarray(X, dt), np.ascontiguousarray(Y, dt)
    else:
        Y = y
    seed = model.seed if seed is None else seed
    callbacks = list(callbacks or [])
    for cb in callbacks:
        cb.model = model
    trainer = None
    try:
        trainer = DataParallel(client, model, X, Y, sync=sync, every=every, timeout=timeout)
        model.stop_training = False
        for cb in callbacks:
            cb.on_train_begin()
        last = model.epoch + epochs
        for epoch in range(model.epoch, last):
            for cb in callbacks:
                cb.on_epoch_begin(epoch)
            trainer.state = model.train_step.state_dict()  # a callback may have set weights
            if sync == "grads":
                trainer.update.load(trainer.state)
            started = time.perf_counter()
            logs = trainer.train_epoch(epoch, batch_size, seed, shuffle)
            model.last_epoch_seconds = time.perf_counter() - started
            trainer.commit()
            if end_epoch(model, epoch, logs, Xv, Yv, callbacks, verbose):
                break
        for cb in callbacks:
            cb.on_train_end()
        model.cluster_report = trainer.report()
    finally:
        if trainer is not None:
            trainer.commit()  # the last consistent parameters, also when a worker died
            trainer.close()
        if owned:
            client.close()
    return model.history


DISTRIBUTED.register("dask")(fit)  # what ``Model.fit(cluster=...)`` calls


# ---------------------------------------------------------------------------- sweeps


def _sweep_task(build_fn, config, X, y, fit_kwargs, validation_data):
    set_num_threads(1)
    started = time.perf_counter()
    model = build_fn(**config)
    history = model.fit(X, y, verbose=0, validation_data=validation_data, **fit_kwargs)
    row = dict(config)
    row.update({k: v[-1] for k, v in history.history.items() if k != "lr"})
    row["seconds"] = round(time.perf_counter() - started, 3)
    row["pid"] = os.getpid()
    return row


def sweep(build_fn, grid, X, y, *, cluster, validation_data=None, timeout=600.0, **fit_kwargs) -> Table:
    """Fit one model per configuration of ``grid`` on the cluster; a ``Table`` of final metrics.

    ``build_fn(**config)`` returns a compiled ``Sequential``; ``grid`` is a dict of lists
    (every combination) or a list of dicts; ``fit_kwargs`` (``epochs``, ``batch_size``...)
    go to every ``fit``. The data is sent to each worker once. Rows come back in grid
    order; ``table.sort("val_accuracy")[0]`` is the best configuration. ``build_fn`` travels
    by cloudpickle, so a function defined in a script or notebook works.
    """
    distributed = _dask()
    client, owned = as_client(cluster)
    points = grid_points(grid)
    try:
        data = client.scatter([np.asarray(X), np.asarray(y)], broadcast=True, hash=False)
        val = None
        if validation_data is not None:
            val = client.scatter([np.asarray(a) for a in validation_data], broadcast=True, hash=False)
        futures = [client.submit(_sweep_task, build_fn, cfg, data[0], data[1], fit_kwargs, val, pure=False)
                   for cfg in points]
        distributed.wait(futures, timeout=timeout)
        return Table(client.gather(futures))
    finally:
        if owned:
            client.close()
