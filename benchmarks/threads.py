"""When a CPU step should use its own threads, and which kernels they should split.

A CPU step runs in one of two ways (``symdl/backends/threads.py``): one thread runs every kernel
and BLAS threads the products, or the step's threads (``cpu.runtime.Pool``) each run a share of
every kernel whose work is at least ``SPLIT_MIN_WORK``, products included, with BLAS held to one
thread. This prints the two measurements those choices rest on, interleaved in one process:

1. whole steps, one thread vs the step's threads, for MLPs and the LeNet CNN at several batches;
2. each kernel of the LeNet step alone, on one thread vs split across the threads, with its work
   (elements x operations, or multiply-adds): where splitting starts to pay.

    python benchmarks/threads.py                  # 2 threads (the machine's cores by default)
    python benchmarks/threads.py --threads 2 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))


def mlp(widths, batch):
    import symdl as sd

    rng = np.random.default_rng(0)
    x = sd.input("x", widths[0]); y = sd.input("y", widths[-1])
    h, params = x, []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        W, c = sd.param(f"W{i}", (a, b)), sd.param(f"b{i}", b)
        params += [W, c]
        h = h @ W + c
        if i < len(widths) - 2:
            h = sd.relu(h)
    train = sd.compile(sd.losses.softmax_cross_entropy(h, y), params, optimizer=sd.optim.SGD(0.01),
                       backend="cpu", dtype="float32")
    for p in params:
        train.params[p.name][...] = rng.normal(size=train.params[p.name].shape) * 0.05
    X = rng.normal(size=(batch, widths[0])).astype(np.float32)
    Y = np.eye(widths[-1], dtype=np.float32)[rng.integers(0, widths[-1], batch)]
    return train, {"x": X, "y": Y}


def lenet(batch):
    import cnn_step
    import symdl as sd

    X, Y, init = cnn_step.data()
    reps = -(-batch // len(X))
    X, Y = np.concatenate([X] * reps)[:batch], np.concatenate([Y] * reps)[:batch]
    x = sd.input("x", (28, 28, 1)); y = sd.input("y", 10)
    P = {k: sd.param(k, v.shape) for k, v in init.items()}
    h = sd.max_pool2d(sd.relu(sd.conv2d(x, P["K1"]) + P["c1"]), 2)
    h = sd.max_pool2d(sd.relu(sd.conv2d(h, P["K2"]) + P["c2"]), 2)
    h = sd.relu(sd.flatten(h) @ P["W1"] + P["b1"])
    h = sd.relu(h @ P["W2"] + P["b2"])
    loss = sd.losses.softmax_cross_entropy(h @ P["W3"] + P["b3"], y)
    train = sd.compile(loss, list(P.values()), optimizer=sd.optim.SGD(0.01), backend="cpu", dtype="float32")
    for k, v in init.items():
        train.params[k][...] = v
    return train, {"x": X, "y": Y}


def step_time(train, arrays, threaded: bool, seconds: float) -> float:
    """Median µs of a step with the runner forced to one way (a fresh table)."""
    runner = train.runner
    runner.uses_parallel = lambda n: threaded
    runner._ready.clear()
    for _ in range(3):
        train.step(**arrays, check_finite=False)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        train.step(**arrays, check_finite=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def steps(threads: int, rounds: int) -> None:
    import symdl as sd

    sd.set_num_threads(threads)
    models = [("MLP 64-128-10", lambda: mlp([64, 128, 10], 64)),
              ("MLP 784-256-256-10", lambda: mlp([784, 256, 256, 10], 128)),
              ("MLP 784-1024-1024-10", lambda: mlp([784, 1024, 1024, 10], 512)),
              ("LeNet", lambda: lenet(64)), ("LeNet", lambda: lenet(256))]
    print(f"\nwhole steps: one thread (BLAS threads the products) vs {threads} step threads (BLAS on one)")
    print(f"{'model':<22} {'batch':>6} {'loops/all work':>15} {'1 thread µs':>12} {'threads µs':>11} "
          f"{'speed-up':>9} {'chosen':>9}")
    for name, make in models:
        train, arrays = make()
        runner = train.runner
        n = len(arrays["x"])
        chosen = "threads" if runner.uses_parallel(n) else "1 thread"
        program = runner.program
        loops = sum(program.work(k, n) for k in program.kernels if k.kind != "gemm")
        total = sum(program.work(k, n) for k in program.kernels)
        seconds = 0.5 if total < 1e7 else 1.5
        one, many = [], []
        for _ in range(rounds):
            one.append(step_time(train, arrays, False, seconds))
            many.append(step_time(train, arrays, True, seconds))
        a, b = statistics.median(one), statistics.median(many)
        print(f"{name:<22} {n:>6} {loops / total:>15.2f} {a:>12.0f} {b:>11.0f} {a / b:>9.2f} {chosen:>9}")


def kernels(threads: int, rounds: int, batch: int = 64, copies: int = 20) -> None:
    """Each kernel of the LeNet step alone: a table of ``copies`` of its row, run whole on one
    thread and split on ``threads``."""
    from symdl.backends import threads as symdl_threads
    from symdl.backends.cpu import backend as cpu_backend, runtime as cpu_runtime

    train, arrays = lenet(batch)
    runner = train.runner
    cpu_backend.SPLIT_MIN_WORK = 0
    runner.uses_parallel = lambda n: True
    runner._ready.clear()
    train.step(**arrays)
    frames = runner.frames(batch, True)
    program = runner.program
    print(f"\nLeNet (batch {batch}) kernels alone: µs per call, whole on 1 thread vs split across {threads}")
    print(f"{'kernel':<14} {'units':>7} {'work':>10} {'1 thread':>9} {'split':>9} {'speed-up':>9}")
    pool = cpu_runtime.pool()
    rows = []
    with symdl_threads.blas_single_threaded():
        for k, row in zip(program.kernels, frames):
            table = np.ascontiguousarray(np.repeat(row[None, :], copies, 0))
            address = table.ctypes.data

            def timed(count):
                best = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    pool.run(address, copies, table.shape[1], count)
                    best.append(time.perf_counter() - t0)
                return min(best) / copies * 1e6

            one = statistics.median(timed(1) for _ in range(rounds))
            many = statistics.median(timed(threads) for _ in range(rounds))
            rows.append((k.kind, row[1], program.work(k, batch), one, many))
    for kind, units, work, one, many in sorted(rows, key=lambda r: r[2]):
        print(f"{kind:<14} {units:>7} {work:>10} {one:>9.1f} {many:>9.1f} {one / many:>9.2f}")
    print(f"SPLIT_MIN_WORK in symdl: {1 << 14} (work below it runs on thread 0 alone)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["steps", "kernels"], default=None)
    args = parser.parse_args()
    from symdl.backends import threads as symdl_threads

    threads = args.threads or symdl_threads.cores()
    print(f"CPU: {cpu_name()}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}, threads {threads}")
    if args.only in (None, "steps"):
        steps(threads, args.rounds)
    if args.only in (None, "kernels"):
        kernels(threads, args.rounds)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
