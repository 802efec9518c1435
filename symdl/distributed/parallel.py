"""``DataParallel``: a model's rows placed on a cluster's workers, and how an epoch's steps run there.

It is the trainer ``fit(cluster=...)`` uses (``nn.fitting.Trainer``): the fit loop draws the
batches, logs, validates and calls back; this module only trains the batches.

* ``sync="grads"``: each global batch is split by which worker owns each row; every worker
  computes the data-loss gradient of its rows; the driver averages them (weighted by rows)
  and applies one optimizer update (``UpdateProgram``).
* ``sync="params", every=k``: the workers run ``k`` fused training steps on their own rows of
  the same global batches; then the driver averages parameters and optimizer state.
"""
from __future__ import annotations

import time
import uuid

import numpy as np

from ..nn.fitting import Trainer
from .cluster import Workers, as_client
from .shards import grad_task, import_task, model_blob, params_task, report_task, setup_task
from .update import UpdateProgram


def split_rows(n: int, parts: int) -> list:
    """Contiguous row ranges of (nearly) equal size, one per worker."""
    return np.array_split(np.arange(n), parts)


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


class DataParallel(Trainer):
    """A model's shards placed on a cluster's workers, and the steps over them.

    ``cluster`` is a ``distributed.Client``, a cluster object or a scheduler address (a client
    opened here is closed by ``close``). ``X``, ``Y`` are checked arrays in the model's dtype, or
    Dask arrays (split by their row chunks, checked on the workers). ``fit`` drives it; it is
    public for reading the workers' counters (``report``) or driving ``steps`` yourself.
    """

    def __init__(self, model, X, Y, *, cluster, sync="grads", every=1, timeout=None):
        if sync not in ("grads", "params"):
            raise ValueError(f"sync must be 'grads' or 'params', got {sync!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.client, self.owned = as_client(cluster)
        self.model, self.sync, self.every = model, sync, every
        self.key = f"symdl-fit-{uuid.uuid4().hex}"
        self._futures = []
        try:
            self.cluster = Workers(self.client, timeout, key=self.key)
            self.cluster.import_symdl(import_task)  # before any step's timeout runs
            self.workers = self.cluster.addresses
            self.cluster.completed = int(model.train_step.t)  # global steps taken so far
            # per sync round: wall time waiting for the workers, the slowest worker's compute inside
            # its task, and the driver's own work after the round (averaging, the update program)
            self.rounds, self.round_seconds, self.worker_seconds, self.driver_seconds = 0, 0.0, 0.0, 0.0
            self._set_up(X, Y)
        except BaseException:
            self.close()  # the workers that did set up forget their shard
            raise

    @property
    def step(self) -> int:
        """Global steps completed (the model's ``train_step.t`` once committed)."""
        return self.cluster.completed

    def _set_up(self, X, Y):
        model = self.model
        blob = model_blob(model)
        setups = {w: self.cluster.submit(w, setup_task, self.key, blob, model.backend, self.sync, xs, ys, rows,
                                         self.cluster.threads[w])
                  for w, (xs, ys, rows) in self._place(X, Y).items()}
        self.workers = [w for w in self.workers if w in setups]
        self.setup = self.cluster.wait(setups, what="setting up the workers")
        if self.sync == "grads":
            self.update = UpdateProgram(model)
            # compile the update program now (or load it from the cache), then start from the model
            self.update.apply({k: np.zeros_like(v) for k, v in self.update.params.items()})
            self.update.load(model.train_step.state_dict())
        self.state = model.train_step.state_dict()

    # -- placement -------------------------------------------------------------------------

    def _place(self, X, Y) -> dict:
        """Send each worker its shard once; returns ``{worker: (X part, Y part, global rows)}``."""
        if hasattr(X, "to_delayed") and hasattr(X, "chunks"):
            return self._place_dask(X, Y)
        self._index(len(X))
        out = {}
        for i, (w, rows) in enumerate(zip(self.workers, split_rows(self.n, len(self.workers)))):
            if len(rows) == 0:
                continue
            self.owner[rows], self.local[rows] = i, np.arange(len(rows))
            xs, ys = self.client.scatter([X[rows], Y[rows]], workers=[w], hash=False)
            self._futures += [xs, ys]
            out[w] = (xs, ys, rows)
        return out

    def _index(self, n):
        """``n`` rows, each to be given its owner (a worker's index) and its position in that shard."""
        self.n = n
        self.owner = np.empty(n, np.int64)
        self.local = np.empty(n, np.int64)

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
        self.cluster.distributed.wait(x_futs + y_futs, timeout=self.cluster.timeout)
        self._index(int(sum(row_chunks)))
        # contiguous runs of chunks of about n / workers rows each: balanced, in row order
        target = self.n / len(self.workers)
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

    # -- steps -------------------------------------------------------------------------------

    def _split(self, idx) -> dict:
        """This global batch's rows, by worker, as positions in each worker's shard."""
        owner = self.owner[idx]
        return {w: self.local[idx[owner == i]] for i, w in enumerate(self.workers)}

    def steps(self, groups, epoch: int):
        """One epoch's batches on the workers, from the model's parameters (a callback may have set
        them); yields what ``Trainer.steps`` says, per sync round."""
        self.state = self.model.train_step.state_dict()
        if self.sync == "grads":
            self.update.load(self.state)
            yield from self._grad_steps(groups, epoch)
        else:
            yield from self._param_rounds(groups, epoch)

    def _grad_steps(self, groups, epoch):
        for idx in groups:
            parts = {w: loc for w, loc in self._split(idx).items() if len(loc)}
            params = {k: v.copy() for k, v in self.update.params.items()}  # sent as they are now
            started = time.perf_counter()
            futures = {w: self.cluster.submit(w, grad_task, self.key, params, loc) for w, loc in parts.items()}
            results = self.cluster.wait(futures, f"computing the gradients of step {self.step + 1}", epoch)
            wall = time.perf_counter() - started
            n = sum(r["rows"] for r in results.values())
            grads = _weighted_sum([(r["rows"] / n, r["grads"]) for r in results.values()])
            penalty = self.update.apply(grads)
            loss = sum(r["loss"] * r["rows"] for r in results.values()) / n + penalty
            self.cluster.completed += 1
            self._log_round(wall, results, time.perf_counter() - started - wall)
            yield 1, n, loss * n, sum(r["correct"] for r in results.values())

    def _param_rounds(self, groups, epoch):
        for start in range(0, len(groups), self.every):
            chunk = groups[start : start + self.every]
            split = [self._split(idx) for idx in chunk]
            state = {k: v for k, v in self.state.items() if k != "t"}
            lr_values = dict(self.model.optimizer.values)
            begun = time.perf_counter()
            futures = {w: self.cluster.submit(w, params_task, self.key, state, lr_values, self.step,
                                              [s[w] for s in split])
                       for w in self.workers if any(len(s[w]) for s in split)}
            steps = f"steps {self.step + 1}-{self.step + len(chunk)}" if len(chunk) > 1 else f"step {self.step + 1}"
            results = self.cluster.wait(futures, f"running local {steps}", epoch)
            wall = time.perf_counter() - begun
            n = sum(r["rows"] for r in results.values())
            averaged = _weighted_sum([(r["rows"] / n, r["state"]) for r in results.values()])
            dt = self.model.train_step.dtype
            self.cluster.completed += len(chunk)
            self.state = {k: v.astype(dt) for k, v in averaged.items()}
            self.state["t"] = np.array(self.step)
            self._log_round(wall, results, time.perf_counter() - begun - wall)
            yield (len(chunk), n, sum(r["loss"] for r in results.values()),
                   sum(r["correct"] for r in results.values()))

    def _log_round(self, wall, results, driver):
        slowest = max(r["seconds"] for r in results.values())
        self.rounds += 1
        self.round_seconds += wall
        self.worker_seconds += slowest
        self.driver_seconds += driver

    # -- the end -----------------------------------------------------------------------------

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
        futures = {w: self.cluster.submit(w, report_task, self.key, release) for w in self.workers}
        workers = self.cluster.wait(futures, "collecting the workers' counters")
        for w, r in workers.items():
            r.update({k: v for k, v in self.setup[w].items() if k != "pid"})
        return {"sync": self.sync, "every": self.every, "workers": workers, "rounds": self.rounds,
                "round_seconds": self.round_seconds, "worker_seconds": self.worker_seconds,
                "driver_seconds": self.driver_seconds, "sync_overhead_seconds": self.sync_overhead}

    def finish(self):
        """Leave the workers' counters and sync timings in ``model.cluster_report``."""
        self.model.cluster_report = self.report()

    def close(self):
        """Forget the shards on the workers (best effort: a dead worker has nothing to forget), and
        close a client opened here."""
        try:
            cluster = getattr(self, "cluster", None)
            if cluster is not None:
                alive = cluster.alive()
                futures = [cluster.submit(w, report_task, self.key, True) for w in self.workers if w in alive]
                cluster.distributed.wait(futures, timeout=min(cluster.timeout, 10.0))
        except Exception:  # noqa: BLE001 - cleanup must not hide the real error
            pass
        self._futures = []
        if self.owned:
            self.client.close()
