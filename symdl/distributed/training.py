"""``fit(model, X, y, cluster=...)``: the one fit loop (``nn.fitting``) with a cluster trainer.

Importing ``symdl.distributed`` registers ``DataParallel`` as the trainer ``Model.fit(cluster=...)``
uses, so the single-process and the distributed fit share the setup (checks, validation,
seeds, callbacks, ``terminate_on_nan``, progress) and each epoch's end; only the steps differ.
"""
from __future__ import annotations

from ..nn import fitting
from .parallel import DataParallel

fitting.DISTRIBUTED.register("dask")(DataParallel)  # what ``Model.fit(cluster=...)`` builds


def fit(model, X, y, *, cluster, sync="grads", every=1, timeout=None, **fit_kwargs):
    """``model.fit`` on a Dask cluster: the same loop (callbacks, validation, history,
    ``terminate_on_nan``) with each epoch's steps run by ``DataParallel``. ``Model.fit(...,
    cluster=...)`` is this without ``timeout``; ``fit_kwargs`` are ``Model.fit``'s (``epochs``,
    ``batch_size``, ``validation_data``, ``callbacks``...).

    ``X``, ``y`` may be NumPy arrays (split into contiguous shards, one per worker) or Dask
    arrays (split by their row chunks, which move between workers, never to the driver).
    ``timeout`` bounds each step or round in seconds (default ``cluster.DEFAULT_TIMEOUT``). The
    workers' counters and sync timings are left in ``model.cluster_report``.
    """
    return fitting.fit(model, X, y, cluster=cluster, sync=sync, every=every, timeout=timeout, **fit_kwargs)
