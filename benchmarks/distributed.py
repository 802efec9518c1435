"""Data-parallel fit on a Dask LocalCluster against a single-process fit.

The mnist-sized model (784-256-256-10, ReLU, softmax cross-entropy, Adam, float32, cpu
backend) on synthetic data. For single-process fit (all cores, and one thread) and for a
LocalCluster of 1 and 2 worker processes with one thread each, in every sync mode, it
prints the time per epoch (after a warm-up epoch that compiles or loads the cache) and the
overhead of one sync round: the round's wall time on the driver minus the slowest worker's
compute time, i.e. what sending parameters and gradients (or state) and scheduling costs.

    python benchmarks/distributed.py                          # 16,384 rows, batch 256
    python benchmarks/distributed.py --rows 8192 --modes grads,params:32 --workers 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# this file is named like the package it benchmarks: keep its folder off the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402

import symdl as sd  # noqa: E402

WIDTHS = [784, 256, 256, 10]


def data(rows, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, WIDTHS[0])).astype(np.float32)
    teacher = rng.normal(size=(WIDTHS[0], WIDTHS[-1])).astype(np.float32)
    return X, (X @ teacher).argmax(1)  # learnable labels


def build(backend, dtype):
    layers = [sd.nn.Dense(w, activation="relu") for w in WIDTHS[1:-1]] + [sd.nn.Dense(WIDTHS[-1])]
    model = sd.nn.Sequential(layers, input_dim=WIDTHS[0])
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(1e-3), backend=backend, dtype=dtype, seed=0)
    return model


def param_megabytes(model):
    return sum(v.nbytes for v in model.get_weights().values()) / 1e6


def time_fit(model, X, y, args, **kwargs):
    """Seconds per epoch (median of the timed epochs after one warm-up epoch) and the fit's report."""
    model.fit(X, y, epochs=1, batch_size=args.batch, verbose=0, **kwargs)  # compile / load the cache
    seconds = []
    for _ in range(args.epochs):
        model.fit(X, y, epochs=1, batch_size=args.batch, verbose=0, **kwargs)
        seconds.append(model.last_epoch_seconds)
    return statistics.median(seconds), getattr(model, "cluster_report", None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up epoch")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--modes", default="grads,params:8,params:32")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    X, y = data(args.rows)
    steps = -(-args.rows // args.batch)
    rows = []
    model = build(args.backend, args.dtype)
    mb = param_megabytes(model)
    print(f"{os.cpu_count()} cores; {args.rows} rows, batch {args.batch} ({steps} steps per epoch), "
          f"{WIDTHS}, {args.dtype}, backend {args.backend}, {mb:.2f} MB of parameters", flush=True)
    for threads, label in ((None, "all cores"), (1, "1 thread")):
        sd.set_num_threads(threads)
        sec, _ = time_fit(build(args.backend, args.dtype), X, y, args)
        rows.append((f"single process ({label})", "-", sec, None, None, None, None))
        print(rows[-1], flush=True)
    sd.set_num_threads(None)
    # the workers' gradient program, compiled here once so that they load it from the cache
    sd.value_and_grad(model.data_loss, model.params, backend=args.backend, dtype=args.dtype)(
        x=X[:2], y=np.eye(WIDTHS[-1])[y[:2]], **model.get_weights())
    for n in (int(w) for w in args.workers.split(",")):
        started = time.perf_counter()
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=40)
        client = Client(cluster)
        client.wait_for_workers(n, timeout=120)
        print(f"LocalCluster with {n} worker(s) up in {time.perf_counter() - started:.2f} s", flush=True)
        try:
            for mode in args.modes.split(","):
                sync, _, every = mode.partition(":")
                every = int(every or 1)
                sec, report = time_fit(build(args.backend, args.dtype), X, y, args, cluster=client, sync=sync,
                                       every=every)
                label = "grads" if sync == "grads" else f"params, every={every}"
                rounds = report["rounds"]
                rows.append((f"{n} worker(s)", label, sec, rounds, report["worker_seconds"] / rounds,
                             report["sync_overhead_seconds"], report["driver_seconds"] / rounds))
                print(rows[-1], flush=True)
        finally:
            client.close()
            cluster.close()
    print()
    print("| run | sync | s / epoch | vs single process, 1 thread | sync rounds | slowest worker's compute "
          "(ms / round) | sync overhead (ms / round) | per MB of parameters (ms) | driver update (ms / round) |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows[1][2]
    ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
    for name, sync, sec, rounds, compute, overhead, driver in rows:
        per_mb = "-" if overhead is None else f"{overhead * 1e3 / mb:.1f}"
        print(f"| {name} | {sync} | {sec:.3f} | {sec / base:.2f}x | {rounds or '-'} | {ms(compute)} | {ms(overhead)} "
              f"| {per_mb} | {ms(driver)} |")


if __name__ == "__main__":
    main()
