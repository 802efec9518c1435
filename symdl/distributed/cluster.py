"""The cluster as ``fit`` sees it: a Dask client, tasks pinned to workers, bounded waits, clear errors.

Nothing here imports ``dask`` or ``distributed`` until a cluster is used (``dask_distributed``).
"""
from __future__ import annotations

import time

INSTALL_HINT = 'pip install "symdl[distributed]"'

#: Seconds a worker may take for one step (or round) before ``fit`` gives up (``timeout=None``).
DEFAULT_TIMEOUT = 120.0
_POLL = 0.25  # seconds between liveness checks while waiting

#: What a task says when its worker holds no state for the fit: the worker restarted (``shards``).
NO_SHARD = "has no shard for this fit"


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


def dask_distributed():
    """The ``distributed`` module, or an ImportError that says what to install."""
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError as exc:
        raise ImportError(f"symdl's cluster mode runs on Dask distributed, which is not installed: "
                          f"{INSTALL_HINT}") from exc
    return distributed


def as_client(cluster):
    """``(client, owned)`` for a ``Client``, a cluster object (``LocalCluster``...) or an address;
    ``owned``: the client was opened here (whoever asked closes it)."""
    distributed = dask_distributed()
    if isinstance(cluster, distributed.Client):
        return cluster, False
    if isinstance(cluster, str) or hasattr(cluster, "scheduler_address"):
        return distributed.Client(cluster, timeout=30), True
    raise TypeError(f"cluster must be a distributed.Client, a cluster object or a scheduler address, got {cluster!r}")


class Workers:
    """A client's workers for one fit: tasks pinned to a worker, and waits that end in an answer,
    a ``WorkerLostError`` or a ``ClusterTimeoutError``, never in a hang.

    ``completed`` names the last step whose result the model keeps (the errors say it).
    """

    def __init__(self, client, timeout: float | None = None):
        self.distributed = dask_distributed()
        self.client = client
        self.timeout = float(DEFAULT_TIMEOUT if timeout is None else timeout)
        info = client.scheduler_info()["workers"]
        self.addresses = sorted(info)
        if not self.addresses:
            raise RuntimeError("the cluster has no workers")
        self.threads = {w: int(info[w].get("nthreads", 1)) for w in self.addresses}
        self.completed = 0

    def submit(self, worker, fn, *args):
        """Run ``fn(*args)`` on ``worker`` and nowhere else."""
        return self.client.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False)

    def alive(self) -> set:
        return set(self.client.scheduler_info()["workers"])

    def wait(self, futures: dict, what: str, epoch=None) -> dict:
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
            alive = self.alive()
            for w in futures:
                if w not in alive:
                    self.lost(w, what, epoch)
            if time.monotonic() > deadline:
                slow = [w for w, f in futures.items() if not f.done()]
                raise ClusterTimeoutError(f"{what}: no answer from worker(s) {', '.join(slow)} within "
                                          f"{self.timeout:g} s (fit's timeout=); the model keeps the "
                                          f"parameters of step {self.completed}")
        for w, f in futures.items():
            if f.status == "error":
                exc = f.exception()
                if isinstance(exc, LookupError) and NO_SHARD in str(exc) or w not in self.alive():
                    self.lost(w, what, epoch)
                raise exc
            if f.status != "finished":  # lost or cancelled: its worker went away
                self.lost(w, what, epoch)
        try:
            values = self.client.gather(pending, errors="raise")
        except Exception:
            alive = self.alive()
            for w in futures:
                if w not in alive:
                    self.lost(w, what, epoch)
            raise
        return dict(zip(futures, values))

    def lost(self, worker, what, epoch):
        where = f" (epoch {epoch + 1})" if epoch is not None else ""
        raise WorkerLostError(f"worker {worker} died or left the cluster while {what}{where}; the model keeps "
                              f"the parameters of step {self.completed} (the last completed one)",
                              worker=worker, step=self.completed + 1, epoch=epoch)
