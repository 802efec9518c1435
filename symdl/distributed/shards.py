"""The worker side: what each worker process keeps for a fit (its rows, its programs) and the tasks
the driver sends it.

A worker rebuilds the model from checkpoint bytes (architecture and compile options), so it
runs the same formulas as the driver: ``sync="grads"`` the model's gradient program
(``sd.value_and_grad`` of the data loss), ``sync="params"`` its fused training step.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time

import numpy as np

from ..backends.threads import set_num_threads
from ..nn import load
from ..nn.fitting import correct_predictions
from ..run.pipeline import value_and_grad
from .cluster import NO_SHARD, compiling

_WORKER_STATE = {}  # fit key -> Shard, in each worker process


def model_blob(model) -> bytes:
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


def _shard(key):
    try:
        return _WORKER_STATE[key]
    except KeyError:
        raise LookupError(f"worker (pid {os.getpid()}) {NO_SHARD} ({key}): it restarted") from None


class Shard:
    """What one worker keeps for one fit: its rows, the programs, counters."""

    def __init__(self, blob, backend, sync, X, Y, rows, threads):
        if threads:
            set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        started = time.perf_counter()
        # sync="grads" needs only the graph here (the gradient program is compiled below), so the
        # worker's own copy of the model uses the NumPy backend: no Numba compile for an unused step
        self.model = _load_blob(blob, backend if sync == "params" else "numpy")
        if isinstance(X, list):  # a Dask array's chunks: checked here as fit checks NumPy arrays
            X, Y = check_chunks(self.model, X, Y, rows)
        self.X = np.ascontiguousarray(X, self.model.train_step.dtype)
        self.Y = np.ascontiguousarray(Y, self.model.train_step.dtype)
        self.rows = np.asarray(rows)
        self.seen = np.zeros(len(self.X), np.int64)  # how often each row took part in a step
        self.steps = 0
        if sync == "grads":
            self.grad = value_and_grad(self.model.data_loss, self.model.params, backend=backend,
                                       dtype=self.model.dtype)
        self.setup_seconds = time.perf_counter() - started

    def runner(self, sync):
        """The compiled program this shard's steps run (the gradient program or the training step)."""
        return (self.grad if sync == "grads" else self.model.train_step).runner

    def compiling(self, key, sync, rows: int):
        """``cluster.compiling(key)`` if a step on ``rows`` rows compiles code first, else nothing."""
        return compiling(key) if self.runner(sync).will_compile(rows) else contextlib.nullcontext()

    def warm_up(self, sync):
        """Run (and so compile, or load from the cache) the program once on one row."""
        xb, yb = self.X[:1], self.Y[:1]
        if sync == "grads":
            self.grad(x=xb, y=yb, **self.model.get_weights())
        else:
            saved = self.model.train_step.state_dict()
            self.model.train_step.step(x=xb, y=yb)
            self.model.train_step.load_state_dict(saved)


def check_chunks(model, X: list, Y: list, rows) -> tuple:
    """The rows of a Dask array's chunks checked and converted by the model itself, as ``fit`` checks
    NumPy arrays (``Model.prepare``): features ``(n, d)`` or images, or token ids ``(n, T)`` inside
    every vocabulary with per-token targets ``(n, T)`` / ``(n, T, V)``. An error counts rows from
    the shard's first (``rows``: their places in the whole array, a contiguous run)."""
    rows = np.asarray(rows)
    where = f" rows {rows[0]}..{rows[-1]}, X[0] is row {rows[0]}" if len(rows) else ""
    return model.prepare(np.concatenate(X), np.concatenate(Y), f"training data (Dask array{where})")


def import_task() -> int:
    """Task: nothing but what running it takes, importing this module (and so symdl) in the worker."""
    return os.getpid()


def setup_task(key, blob, backend, sync, X, Y, rows, threads):
    """Task: build this worker's shard state (X, Y are lists of chunks for a Dask array, checked by
    the worker's copy of the model)."""
    with compiling(key):  # building the programs (a cold compile cache: a minute or more on a busy host)
        shard = Shard(blob, backend, sync, X, Y, rows, threads)
        started = time.perf_counter()
        shard.warm_up(sync)
    _WORKER_STATE[key] = shard
    return {"pid": os.getpid(), "shard_rows": len(shard.X), "setup_seconds": shard.setup_seconds,
            "compile_seconds": time.perf_counter() - started}


def grad_task(key, params, local):
    """Task (sync="grads"): the data loss and its gradients on this worker's rows ``local``."""
    s = _shard(key)
    started = time.perf_counter()
    xb, yb = s.X[local], s.Y[local]
    with s.compiling(key, "grads", len(local)):
        loss, grads = s.grad(x=xb, y=yb, check_finite=False, **params)  # rows checked at setup; fit judges the loss
    correct = 0.0
    if s.model.kind != "regression":  # the gradient program has no logits: one forward pass for them
        s.model.set_weights(params)
        # the forward program on the checked rows (token ids are already floats here, which predict's
        # check refuses): its outputs as the training step gives them, token rows (n·T, V) included
        out = s.model._run_forward("predict", {"x": xb}, len(xb))["out"]
        correct = correct_predictions(s.model, np.asarray(out), yb)
    s.seen[local] += 1
    s.steps += 1
    return {"loss": loss, "grads": grads, "rows": len(local), "correct": correct,
            "seconds": time.perf_counter() - started}


def params_task(key, state, lr_values, t0, steps):
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
        with s.compiling(key, "params", len(local)):
            loss = ts.step(x=xb, y=yb, check_finite=False)
        total += loss * len(local)
        correct += correct_predictions(s.model, ts.output("out"), yb)
        rows += len(local)
        s.seen[local] += 1
        s.steps += 1
    out = ts.state_dict()
    out.pop("t")
    return {"state": out, "loss": total, "rows": rows, "correct": correct, "seconds": time.perf_counter() - started}


def report_task(key, release):
    """Task: this worker's counters for the fit (and, with ``release``, forget its shard)."""
    s = _shard(key)
    if release:
        del _WORKER_STATE[key]
    return {"pid": os.getpid(), "rows": s.rows, "seen": s.seen, "steps": s.steps}
