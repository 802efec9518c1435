"""Digits on a Dask cluster: exact data-parallel fit, local SGD, and a learning-rate sweep.

Needs ``pip install "symdl[distributed]"``. Starts a LocalCluster of two worker processes;
set SYMDL_SCHEDULER=tcp://host:8786 to use a running scheduler instead.
"""
import os

import symdl as sd
from _common import epochs
from symdl.distributed import sweep


def build(lr=1e-2, units=64):
    model = sd.nn.Sequential([sd.nn.Dense(units, activation="relu"), sd.nn.Dense(10)], input_dim=64)
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(lr), regularizer=sd.l2(1e-4), backend="cpu")
    return model


def main():
    from distributed import Client, LocalCluster

    X, y = sd.datasets.digits()
    Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=0)
    Xtr, Xte = sd.datasets.standardize(Xtr, Xte)
    address = os.environ.get("SYMDL_SCHEDULER")
    cluster = None if address else LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None)
    client = Client(address or cluster)
    try:
        model = build()
        model.fit(Xtr, ytr, epochs=epochs(20), batch_size=64, cluster=client, verbose=0)  # exact data-parallel
        print(f"sync='grads':             held-out accuracy {model.evaluate(Xte, yte)['accuracy']:.4f}")
        report = model.cluster_report
        print(f"  {report['rounds']} sync rounds, {1e3 * report['sync_overhead_seconds']:.1f} ms overhead each;",
              "rows per worker:", [len(w["rows"]) for w in report["workers"].values()])

        model = build()
        model.fit(Xtr, ytr, epochs=epochs(20), batch_size=64, cluster=client, sync="params", every=16, verbose=0)
        print(f"sync='params', every=16: held-out accuracy {model.evaluate(Xte, yte)['accuracy']:.4f}")

        table = sweep(build, {"lr": [3e-2, 1e-2, 1e-3], "units": [32, 64]}, Xtr, ytr,
                      cluster=client, epochs=epochs(10), batch_size=64, validation_data=(Xte, yte))
        print(table.sort("val_accuracy"))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    main()
