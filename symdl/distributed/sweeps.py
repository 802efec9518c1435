"""``sweep``: one model per configuration of a grid, fitted in parallel on a cluster; a ``Table``.

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
import time

import numpy as np

from ..backends.threads import set_num_threads
from .cluster import as_client, dask_distributed, wait_for_workers


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
    distributed = dask_distributed()
    client, owned = as_client(cluster)
    points = grid_points(grid)
    try:
        wait_for_workers(client)  # a cluster still starting its workers: broadcast to all of them
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
