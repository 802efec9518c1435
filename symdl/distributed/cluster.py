"""The cluster as ``fit`` sees it: a Dask client, tasks pinned to workers, bounded waits, clear errors.

Nothing here imports ``dask`` or ``distributed`` until a cluster is used (``dask_distributed``).

Which workers there are is asked of the scheduler each time (``client.nthreads()``), never read
from ``client.scheduler_info()``: a synchronous client refreshes that cache every 2 s with the
cluster's totals only (``"workers"`` empty), so on a busy host a call can return just after the
refresh overwrote its own answer (docs/reliability.md, "a cluster with no workers").

Waits scale with what the workers do. A worker tells the scheduler when it starts and stops
compiling (``compiling``, a worker event); while every late worker is compiling, a wait goes on
past ``timeout`` (up to ``COMPILE_TIMEOUT`` of compiling), so a cold compile cache on a busy host
is not a hang. A worker that is late and not compiling is one: ``ClusterTimeoutError``.
"""
from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager

INSTALL_HINT = 'pip install "symdl[distributed]"'

#: Seconds a worker may take for one step (or round) before ``fit`` gives up (``timeout=None``).
DEFAULT_TIMEOUT = 120.0
#: Seconds a worker may spend compiling its programs (or loading them from the cache) before
#: ``fit`` calls it a hang; compiling time does not count against ``timeout``.
COMPILE_TIMEOUT = 1800.0
#: Seconds to wait for a cluster's workers to start on an idle host with a core per worker;
#: ``start_timeout`` scales it with the host's load and its workers per core.
WORKER_START_TIMEOUT = 60.0
_POLL = 0.25  # seconds between liveness checks while waiting

#: What a task says when its worker holds no state for the fit: the worker restarted (``shards``).
NO_SHARD = "has no shard for this fit"
COMPILING = "compiling"


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


def host_load() -> tuple:
    """``(1-minute load average, cores)`` of this host; the load is 0 where the OS has none."""
    cores = os.cpu_count() or 1
    try:
        return os.getloadavg()[0], cores
    except (AttributeError, OSError):  # Windows
        return 0.0, cores


def start_timeout(workers: int) -> float:
    """Seconds to wait for ``workers`` workers to start: ``WORKER_START_TIMEOUT`` times the host's
    load per core and its workers per core (each at least 1; together at most 10).

    >>> import symdl.distributed.cluster as c
    >>> c.start_timeout(1) >= c.WORKER_START_TIMEOUT
    True
    """
    load, cores = host_load()
    factor = max(1.0, load / cores) * max(1.0, workers / cores)
    return WORKER_START_TIMEOUT * min(factor, 10.0)


def worker_threads(client) -> dict:
    """``{address: threads}`` of the workers the scheduler has now: a fresh answer (``nthreads``),
    not ``scheduler_info()``'s cache, whose ``"workers"`` a periodic refresh leaves empty."""
    return dict(client.nthreads())


def expected_workers(client) -> int:
    """How many workers the client's cluster object plans (a ``LocalCluster``'s ``n_workers``, or
    what ``scale`` asked for: ``plan``, not ``requested``, which holds only those already being
    launched); 1 for a scheduler known only by its address."""
    plan = getattr(getattr(client, "cluster", None), "plan", None)
    try:
        return max(1, len(plan))
    except TypeError:
        return 1


def wait_for_workers(client, expected: int | None = None, timeout: float | None = None) -> dict:
    """``{address: threads}`` once ``expected`` workers (``expected_workers``) have joined; waits at
    most ``timeout`` seconds (``start_timeout``). None by then: ``RuntimeError`` naming what was
    seen; fewer: a ``RuntimeWarning``, and the fit uses those there are."""
    expected = expected_workers(client) if expected is None else expected
    timeout = start_timeout(expected) if timeout is None else timeout
    started = time.monotonic()
    while True:
        threads = worker_threads(client)
        waited = time.monotonic() - started
        if len(threads) >= expected or waited > timeout:
            break
        time.sleep(0.1)
    if len(threads) >= expected:
        return threads
    load, cores = host_load()
    seen = (f"{len(threads)} of the {expected} expected worker(s) ({', '.join(sorted(threads))})"
            if threads else f"none of the {expected} expected worker(s)")
    where = getattr(getattr(client, "scheduler", None), "address", None) or "the client's scheduler"
    message = (f"the cluster at {where} had {seen} after waiting {waited:.0f} s (the bound for this host: "
               f"load {load:.1f} on {cores} cores; cluster.WORKER_START_TIMEOUT = {WORKER_START_TIMEOUT:g} s)")
    if not threads:
        raise RuntimeError(message + "; are the workers starting, and can they reach the scheduler?")
    warnings.warn(message + "; the fit runs on those", RuntimeWarning, stacklevel=3)
    return threads


@contextmanager
def compiling(key: str):
    """On a worker: tell the scheduler (a worker event under ``key``) that this task is compiling
    until the block ends, so the driver's wait does not take it for a hang. Outside a worker: no-op."""
    worker = _this_worker()
    if worker is not None:
        worker.log_event(key, {"worker": worker.address, "state": COMPILING})
    try:
        yield
    finally:
        if worker is not None:
            worker.log_event(key, {"worker": worker.address, "state": "done"})


def _this_worker():
    try:
        from distributed import get_worker
        return get_worker()
    except (ImportError, ValueError):
        return None


class Workers:
    """A client's workers for one fit: tasks pinned to a worker, and waits that end in an answer,
    a ``WorkerLostError`` or a ``ClusterTimeoutError``, never in a hang.

    ``key`` names the fit (its workers' ``compiling`` events); ``completed`` names the last step
    whose result the model keeps (the errors say it).
    """

    def __init__(self, client, timeout: float | None = None, key: str | None = None):
        self.distributed = dask_distributed()
        self.client = client
        self.timeout = float(DEFAULT_TIMEOUT if timeout is None else timeout)
        self.compile_timeout = float(COMPILE_TIMEOUT)
        self.key = key
        self.threads = wait_for_workers(client)
        self.addresses = sorted(self.threads)
        self.completed = 0

    def import_symdl(self, task):
        """Run ``task`` (``shards.import_task``: it imports the worker side of a fit, seconds in a fresh
        process on a busy host) on every worker, bounded like starting a worker (``start_timeout``),
        so that no step's ``timeout`` counts it; a worker that cannot import symdl says so."""
        futures = {w: self.submit(w, task) for w in self.addresses}
        bound = start_timeout(len(futures))
        try:
            self.distributed.wait(list(futures.values()), timeout=bound)
        except TimeoutError:
            slow = [w for w, f in futures.items() if not f.done()]
            raise ClusterTimeoutError(f"importing symdl on the workers: no answer from worker(s) {', '.join(slow)} "
                                      f"within {bound:.0f} s (cluster.start_timeout)") from None
        for w, f in futures.items():
            if f.status == "error":
                raise ImportError(f"worker {w} cannot import symdl ({f.exception()!r}): install the same symdl "
                                  f"in the workers' environment") from f.exception()

    def submit(self, worker, fn, *args):
        """Run ``fn(*args)`` on ``worker`` and nowhere else."""
        return self.client.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False)

    def alive(self) -> set:
        return set(worker_threads(self.client))

    def compile_events(self) -> dict:
        """``{worker: (state, time.time() of the event)}``: each worker's last ``compiling`` event of
        this fit (``COMPILING`` while it compiles, ``"done"`` after)."""
        if self.key is None:
            return {}
        return {msg["worker"]: (msg["state"], stamp) for stamp, msg in self.client.get_events(self.key)}

    def _late(self, slow, what, begun) -> float:
        """Seconds until the next look at a late wait begun at ``begun`` (``time.time()``), or raise.

        A worker compiling may go on up to ``compile_timeout``; one that stopped compiling has
        ``timeout`` from that moment; any other has ``timeout`` from the wait's start."""
        events, now = self.compile_events(), time.time()
        left = {}
        for w in slow:
            state, stamp = events.get(w, (None, begun))
            if state == COMPILING:
                if now - stamp > self.compile_timeout:
                    raise ClusterTimeoutError(
                        f"{what}: worker {w} has been compiling for {now - stamp:.1f} s, more than "
                        f"cluster.COMPILE_TIMEOUT = {self.compile_timeout:g} s; the model keeps the parameters of "
                        f"step {self.completed}")
                left[w] = min(self.timeout, self.compile_timeout - (now - stamp))
            else:
                idle = now - max(stamp, begun)
                if idle > self.timeout:
                    after = state is not None and stamp > begun
                    compiled = f" ({idle:.0f} s since it finished compiling)" if after else ""
                    raise ClusterTimeoutError(
                        f"{what}: no answer from worker {w} within {self.timeout:g} s{compiled} (fit's timeout=; "
                        f"compiling does not count); the model keeps the parameters of step {self.completed}")
                left[w] = self.timeout - idle
        return max(min(left.values()), _POLL)

    def wait(self, futures: dict, what: str, epoch=None) -> dict:
        """Results of ``{worker: future}``; a dead worker, a task error or the timeout raises.

        The timeout counts from the start of the wait, or from the moment a worker finished
        compiling; time spent compiling has its own bound (``_late``)."""
        begun = time.time()
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
                deadline = time.monotonic() + self._late([w for w, f in futures.items() if not f.done()], what, begun)
        # a task's error first: the loop above stops at the first one, when other tasks may still run
        for w, f in futures.items():
            if f.status == "error":
                exc = f.exception()
                if isinstance(exc, LookupError) and NO_SHARD in str(exc) or w not in self.alive():
                    self.lost(w, what, epoch)
                raise exc
        for w, f in futures.items():
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
