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
  program (``UpdateProgram``). The parameters equal a single-process run's.
* ``sync="params", every=k``: local SGD. Workers run ``k`` fused training steps
  (``sd.compile``) on their own rows of the same global batches, then the driver
  averages parameters and optimizer state (weighted by rows).
* ``sweep(build_fn, grid, X, y, cluster=client)``: one model per configuration, fitted
  in parallel on the cluster; returns a ``Table``.

One module per job: ``cluster`` (clients, waits, errors, timeouts), ``shards`` (what each
worker keeps, and its tasks), ``update`` (the driver's optimizer update), ``parallel``
(``DataParallel``: placement and the steps of an epoch), ``training`` (``fit``) and ``sweeps``
(``sweep``, ``Table``). The fit loop itself is ``nn.fitting``'s, shared with the
single-process fit. Nothing here imports ``dask`` or ``distributed`` until a cluster is used.

>>> from symdl.distributed import split_rows
>>> tuple(len(s) for s in split_rows(10, 3))
(4, 3, 3)
"""
from .cluster import ClusterTimeoutError, WorkerLostError, as_client
from .training import fit
from .parallel import DataParallel, split_rows
from .sweeps import Table, grid_points, sweep
from .update import UpdateProgram

__all__ = ["fit", "sweep", "DataParallel", "UpdateProgram", "Table", "WorkerLostError", "ClusterTimeoutError",
           "as_client", "grid_points", "split_rows"]  # DEFAULT_TIMEOUT: set it on .cluster, where it is read
