"""Time one full SGD training step (forward, loss, backward, update; float32) against peers.

Every (framework, size) runs in a fresh process so thread pools and caches do not leak
between measurements. Prints median µs/step, the ratio of each peer to symdl (>1: symdl
is faster), symdl's cold compile (empty cache: derive + generate + Numba) and warm
start (second process, from the cache), and the GEMM-only time (NumPy's BLAS doing just
the step's matrix products).

    python benchmarks/mlp_step.py                       # every size, every installed peer
    python benchmarks/mlp_step.py --sizes tiny,mnist --no-torch-compile
    python benchmarks/mlp_step.py --backend cuda --sizes mnist,wide,huge   # on a GPU
    python benchmarks/mlp_step.py --baseline ../old-checkout      # before/after a change, in one run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = {
    "tiny": ([2, 16, 16, 1], "tanh", "bce", 32),
    "digits": ([64, 128, 10], "relu", "ce", 64),
    "mnist": ([784, 256, 256, 10], "relu", "ce", 128),
    "wide": ([784, 1024, 1024, 10], "relu", "ce", 512),
    "huge": ([784, 4096, 4096, 10], "relu", "ce", 4096),
}
LR = 0.01


def data(size, seed=0):
    import numpy as np

    widths, _, loss, batch = SIZES[size]
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(batch, widths[0])).astype(np.float32)
    if loss == "ce":
        Y = np.eye(widths[-1], dtype=np.float32)[rng.integers(0, widths[-1], batch)]
    else:
        Y = rng.integers(0, 2, (batch, 1)).astype(np.float32)
    Ws = [(rng.normal(size=(a, b)) * (2 / a) ** 0.5).astype(np.float32) for a, b in zip(widths[:-1], widths[1:])]
    bs = [np.zeros(b, np.float32) for b in widths[1:]]
    return X, Y, Ws, bs


def timeit(step, seconds=2.0, min_steps=20):
    for _ in range(5):
        step()
    t0 = time.perf_counter()
    step()
    one = max(time.perf_counter() - t0, 1e-7)
    per_round = max(min_steps, int(seconds / 10 / one))
    rounds = []
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(per_round):
            step()
        rounds.append((time.perf_counter() - t0) / per_round)
    return statistics.median(rounds) * 1e6


# --------------------------------------------------------------------------- workers


def run_symdl(size, backend="cpu"):
    t0 = time.perf_counter()
    import symdl as sd

    widths, act, loss_name, _ = SIZES[size]
    X, Y, Ws, bs = data(size)
    x = sd.input("x", widths[0]); y = sd.input("y", widths[-1])
    h, params = x, []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        W = sd.param(f"W{i}", (a, b)); c = sd.param(f"b{i}", b)
        params += [W, c]
        h = h @ W + c
        if i < len(widths) - 2:
            h = sd.functions.get(act)(h)
    loss = sd.losses.bce_with_logits(h, y) if loss_name == "bce" else sd.losses.softmax_cross_entropy(h, y)
    train = sd.compile(loss, params, optimizer=sd.optim.SGD(LR), backend=backend, dtype="float32")
    for i, (W, c) in enumerate(zip(Ws, bs)):
        train.params[f"W{i}"][...] = W
        train.params[f"b{i}"][...] = c
    train.step(x=X, y=Y)
    compile_s = time.perf_counter() - t0
    # Data is validated once (as Model.fit does); the timed step is the compiled call.
    us = timeit(lambda: train.step(x=X, y=Y, check_finite=False))
    return {"us": us, "compile_s": compile_s}


def run_numpy(size):
    import numpy as np

    widths, act, loss_name, n = SIZES[size]
    X, Y, Ws, bs = data(size)

    def step():
        hs, zs = [X], []
        for i, (W, b) in enumerate(zip(Ws, bs)):
            z = hs[-1] @ W + b
            zs.append(z)
            if i < len(Ws) - 1:
                hs.append(np.tanh(z) if act == "tanh" else np.maximum(z, 0))
        z = zs[-1]
        if loss_name == "ce":
            m = z.max(1, keepdims=True)
            e = np.exp(z - m)
            s = e / e.sum(1, keepdims=True)
            loss = float(np.mean(np.log(e.sum(1)) + m[:, 0] - (z * Y).sum(1)))
            d = (s - Y) / n
        else:
            loss = float(np.mean(np.maximum(z, 0) - z * Y + np.log1p(np.exp(-np.abs(z)))))
            d = (1 / (1 + np.exp(-z)) - Y) / z.size
        for i in range(len(Ws) - 1, -1, -1):
            gW, gb = hs[i].T @ d, d.sum(0)
            if i:
                d = d @ Ws[i].T
                d *= (1 - hs[i] ** 2) if act == "tanh" else (zs[i - 1] > 0)
            Ws[i] -= LR * gW
            bs[i] -= LR * gb
        return loss

    return {"us": timeit(step)}


def run_gemm_only(size):
    import numpy as np

    widths, _, _, n = SIZES[size]
    X, Y, Ws, bs = data(size)
    hs = [X] + [np.ones((n, w), np.float32) for w in widths[1:-1]]
    ds = [np.ones((n, w), np.float32) for w in widths[1:]]

    def step():
        for h, W in zip(hs, Ws):
            h @ W
        for i in range(len(Ws)):
            hs[i].T @ ds[i]
            if i:
                ds[i] @ Ws[i].T

    return {"us": timeit(step)}


def torch_model(size, torch):
    widths, act, _, _ = SIZES[size]
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh() if act == "tanh" else torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def run_torch(size, compiled=False, device="cpu"):
    t0 = time.perf_counter()
    import torch

    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    _, _, loss_name, _ = SIZES[size]
    X, Y, _, _ = data(size)
    model = torch_model(size, torch).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = torch.tensor(X, device=device), torch.tensor(Y, device=device)
    target = y.argmax(1) if loss_name == "ce" else y
    lossf = torch.nn.functional.cross_entropy if loss_name == "ce" else torch.nn.functional.binary_cross_entropy_with_logits

    def step():
        opt.zero_grad(set_to_none=True)
        loss = lossf(model(x), target)
        loss.backward()
        opt.step()
        return loss

    fn = torch.compile(step) if compiled else step
    fn()
    if device == "cuda":
        torch.cuda.synchronize()

        def synced():
            fn()
            torch.cuda.synchronize()

        return {"us": timeit(synced), "compile_s": time.perf_counter() - t0}
    return {"us": timeit(fn), "compile_s": time.perf_counter() - t0}


def run_jax(size):
    t0 = time.perf_counter()
    import jax
    import jax.numpy as jnp

    widths, act, loss_name, _ = SIZES[size]
    X, Y, Ws, bs = data(size)
    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in zip(Ws, bs)]
    f = jnp.tanh if act == "tanh" else jax.nn.relu

    def loss(params, x, y):
        h = x
        for i, (W, b) in enumerate(params):
            h = h @ W + b
            if i < len(params) - 1:
                h = f(h)
        if loss_name == "ce":
            return -jnp.mean(jnp.sum(jax.nn.log_softmax(h) * y, 1))
        return jnp.mean(jax.nn.softplus(h) - h * y)

    @jax.jit
    def update(params, x, y):
        l, g = jax.value_and_grad(loss)(params, x, y)
        return l, jax.tree_util.tree_map(lambda p, d: p - LR * d, params, g)

    x, y = jnp.asarray(X), jnp.asarray(Y)
    state = {"p": params}
    update(params, x, y)[0].block_until_ready()
    compile_s = time.perf_counter() - t0

    def step():
        l, state["p"] = update(state["p"], x, y)
        l.block_until_ready()

    return {"us": timeit(step), "compile_s": compile_s}


def run_pytensor(size, mode="NUMBA"):
    t0 = time.perf_counter()
    import numpy as np
    import pytensor
    import pytensor.tensor as pt

    widths, act, loss_name, _ = SIZES[size]
    X, Y, Ws, bs = data(size)
    x, y = pt.matrix("x", dtype="float32"), pt.matrix("y", dtype="float32")
    params = [pytensor.shared(W) for W in Ws] + [pytensor.shared(b) for b in bs]
    h = x
    k = len(Ws)
    for i in range(k):
        h = pt.dot(h, params[i]) + params[k + i]
        if i < k - 1:
            h = pt.tanh(h) if act == "tanh" else pt.maximum(h, 0)
    if loss_name == "ce":
        loss = -pt.mean(pt.sum(y * pt.special.log_softmax(h, axis=1), axis=1))
    else:
        loss = pt.mean(pt.softplus(h) - h * y)
    grads = pytensor.grad(loss, params)
    step = pytensor.function([x, y], loss, updates=[(p, p - np.float32(LR) * g) for p, g in zip(params, grads)],
                             mode=mode)
    step(X, Y)
    return {"us": timeit(lambda: step(X, Y)), "compile_s": time.perf_counter() - t0}


WORKERS = {
    "symdl": run_symdl,
    "numpy": run_numpy,
    "gemm-only": run_gemm_only,
    "torch": run_torch,
    "torch.compile": lambda size: run_torch(size, compiled=True),
    "jax": run_jax,
    "pytensor-numba": run_pytensor,
    "pytensor-c": lambda size: run_pytensor(size, mode="FAST_RUN"),
    "symdl-baseline": run_symdl,  # run with --baseline's checkout first on the path
    "symdl-cuda": lambda size: run_symdl(size, backend="cuda"),
    "torch-cuda": lambda size: run_torch(size, device="cuda"),
}


BASELINE = None  # --baseline: another checkout of symdl to measure beside this one


def spawn(name, size, cache_dir):
    env = dict(os.environ, SYMDL_CACHE_DIR=cache_dir)
    if name == "symdl-baseline":
        env["PYTHONPATH"] = os.pathsep.join([BASELINE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, __file__, "--worker", name, size], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def installed(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,digits,mnist,wide")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--peers", help="comma-separated subset of peers to run (default: every installed one)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="interleaved runs per framework; the best median is kept (robust to a busy neighbour)")
    ap.add_argument("--baseline", help="another symdl checkout, measured as the peer 'symdl-baseline'")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global BASELINE
    BASELINE = os.path.abspath(args.baseline) if args.baseline else None
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](args.worker[1])))
        return
    sizes = args.sizes.split(",")
    if args.backend == "cuda":
        peers = ["torch-cuda"]
        ours = "symdl-cuda"
    else:
        peers = ["gemm-only", "numpy"]
        if installed("torch"):
            peers.append("torch")
            if not args.no_torch_compile:
                peers.append("torch.compile")
        if installed("jax"):
            peers.append("jax")
        if installed("pytensor"):
            peers += ["pytensor-numba", "pytensor-c"]
        ours = "symdl"
    if args.peers:
        peers = args.peers.split(",")
    if BASELINE:
        peers.insert(0, "symdl-baseline")
    compiled = [ours] + (["symdl-baseline"] if BASELINE else [])  # measured cold, then warm
    header = (f"{'size':<7} {'symdl µs':>10} {'cold s':>7} {'warm s':>7}"
              + (f" {'base cold':>9} {'base warm':>9}" if BASELINE else "") + "".join(f" {p:>20}" for p in peers))
    print(header)
    print("-" * len(header))
    for size in sizes:
        best, colds, warms = {}, {c: [] for c in compiled}, {c: [] for c in compiled}
        for _ in range(args.repeat):  # interleave frameworks so a slow spell hits all of them
            for name in compiled:
                with tempfile.TemporaryDirectory() as cache:
                    cold = spawn(name, size, cache)
                    warm = spawn(name, size, cache)
                for r in (cold, warm):
                    if "us" in r:
                        best[name] = min(best.get(name, float("inf")), r["us"])
                colds[name].append(cold.get("compile_s", float("nan")))
                warms[name].append(warm.get("compile_s", float("nan")))
                if name == ours:
                    failed = cold.get("error") or warm.get("error")
            for p in peers:
                if p in compiled:
                    continue
                with tempfile.TemporaryDirectory() as cache:
                    r = spawn(p, size, cache)
                best[p] = min(best.get(p, float("inf")), r["us"]) if "us" in r else best.get(p, r["error"])
        if ours not in best:
            print(f"{size:<7} symdl failed: {failed}")
            continue
        us = best[ours]
        row = f"{size:<7} {us:>10.1f} {min(colds[ours]):>7.2f} {min(warms[ours]):>7.2f}"
        if BASELINE:
            row += f" {min(colds['symdl-baseline']):>9.2f} {min(warms['symdl-baseline']):>9.2f}"
        for p in peers:
            r = best.get(p, "failed")
            cell = f"{r:.1f} ({r / us:.2f}x)" if isinstance(r, float) else str(r)[:20]
            row += f" {cell:>20}"
        print(row, flush=True)
    print(f"\nbest median of {args.repeat} interleaved runs; ratio = peer time / symdl time (above 1: symdl is "
          "faster); cold = empty compile cache, warm = a second process reading it (base: the --baseline "
          "checkout, measured the same way in turn).")


if __name__ == "__main__":
    main()
