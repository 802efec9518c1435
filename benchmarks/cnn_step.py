"""One SGD step of a CNN (float32, batch 64, 28x28x1) against PyTorch eager and JAX jit.

``--model lenet`` (the default): conv 5x5x6 (valid) -> relu -> max-pool 2 -> conv 5x5x16 -> relu
-> max-pool 2 -> flatten -> dense 120 (relu) -> dense 84 (relu) -> dense 10.
``--model residual``: conv 3x3x8 (same) -> relu -> max-pool 2 -> two residual blocks
(``relu(conv(relu(conv(h) + c)) + c' + h)``, 3x3x8 same convolutions, the skip an identity) ->
global average pool -> dense 10. Both: softmax cross-entropy, SGD.

Each framework runs in its own process (thread pools and caches do not leak). Prints the
median ms/step, each peer's ratio to symdl (>1: symdl is faster), symdl's cold start (empty
cache: build, derive, generate, compile, first step) and warm start (the same in a second
process, from the cache), both timed after the import, which has its own column (the
interpreter's cost, paid once per process); a peer's start is its first step (JAX: its jit).

    python benchmarks/cnn_step.py                  # 2 threads, every installed peer
    python benchmarks/cnn_step.py --threads 1
    python benchmarks/cnn_step.py --baseline ../old-checkout --rounds 3   # before/after, interleaved
    python benchmarks/cnn_step.py --model residual                      # the residual CNN
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from _common import result, spawn as run_child, timeit

BATCH, LR = 64, 0.01
MODEL = os.environ.get("BENCH_MODEL", "lenet")
SHAPES = {"lenet": {"K1": (5, 5, 1, 6), "c1": (6,), "K2": (5, 5, 6, 16), "c2": (16,), "W1": (256, 120), "b1": (120,),
                    "W2": (120, 84), "b2": (84,), "W3": (84, 10), "b3": (10,)},
          "residual": {"K0": (3, 3, 1, 8), "c0": (8,), **{f"K{i}": (3, 3, 8, 8) for i in range(1, 5)},
                       **{f"c{i}": (8,) for i in range(1, 5)}, "W": (8, 10), "b": (10,)}}


def data(seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(BATCH, 28, 28, 1)).astype(np.float32)
    Y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, BATCH)]
    shapes = SHAPES[MODEL]
    params = {k: (rng.normal(size=s) * (2 / max(1, int(np.prod(s[:-1])))) ** 0.5).astype(np.float32)
              if len(s) > 1 else np.zeros(s, np.float32) for k, s in shapes.items()}
    return X, Y, params


def run_symdl():
    started = time.perf_counter()
    import symdl as sd

    t0 = time.perf_counter()
    X, Y, init = data()
    x = sd.input("x", (28, 28, 1)); y = sd.input("y", 10)
    P = {k: sd.param(k, v.shape) for k, v in init.items()}
    if MODEL == "residual":
        h = sd.max_pool2d(sd.relu(sd.conv2d(x, P["K0"], padding="same") + P["c0"]), 2)
        for a, b in ((1, 2), (3, 4)):
            r = sd.relu(sd.conv2d(h, P[f"K{a}"], padding="same") + P[f"c{a}"])
            h = sd.relu(sd.conv2d(r, P[f"K{b}"], padding="same") + P[f"c{b}"] + h)
        loss = sd.losses.softmax_cross_entropy(sd.flatten(sd.avg_pool2d(h, 14)) @ P["W"] + P["b"], y)
    else:
        h = sd.max_pool2d(sd.relu(sd.conv2d(x, P["K1"]) + P["c1"]), 2)
        h = sd.max_pool2d(sd.relu(sd.conv2d(h, P["K2"]) + P["c2"]), 2)
        h = sd.relu(sd.flatten(h) @ P["W1"] + P["b1"])
        h = sd.relu(h @ P["W2"] + P["b2"])
        loss = sd.losses.softmax_cross_entropy(h @ P["W3"] + P["b3"], y)
    train = sd.compile(loss, list(P.values()), optimizer=sd.optim.SGD(LR), backend="cpu", dtype="float32")
    for k, v in init.items():
        train.params[k][...] = v
    train.step(x=X, y=Y)
    ready = time.perf_counter() - t0
    return {"ms": timeit(lambda: train.step(x=X, y=Y, check_finite=False)), "ready_s": ready, "import_s": t0 - started}


def run_torch():
    started = time.perf_counter()
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    X, Y, init = data()
    x = torch.tensor(X.transpose(0, 3, 1, 2).copy()); y = torch.tensor(Y.argmax(1))
    p = {k: torch.tensor(v.transpose(3, 2, 0, 1).copy() if v.ndim == 4 else v.copy(), requires_grad=True)
         for k, v in init.items()}
    F = torch.nn.functional

    def forward():
        if MODEL == "residual":
            h = F.max_pool2d(F.relu(F.conv2d(x, p["K0"], p["c0"], padding=1)), 2)
            for a, b in ((1, 2), (3, 4)):
                r = F.relu(F.conv2d(h, p[f"K{a}"], p[f"c{a}"], padding=1))
                h = F.relu(F.conv2d(r, p[f"K{b}"], p[f"c{b}"], padding=1) + h)
            return F.avg_pool2d(h, 14).reshape(BATCH, -1) @ p["W"] + p["b"]
        h = F.max_pool2d(F.relu(F.conv2d(x, p["K1"], p["c1"])), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, p["K2"], p["c2"])), 2)
        h = F.relu(h.permute(0, 2, 3, 1).reshape(BATCH, -1) @ p["W1"] + p["b1"])
        h = F.relu(h @ p["W2"] + p["b2"])
        return h @ p["W3"] + p["b3"]

    def step():
        loss = F.cross_entropy(forward(), y)
        for t in p.values():
            t.grad = None
        loss.backward()
        with torch.no_grad():
            for t in p.values():
                t -= LR * t.grad
    step()
    ready = time.perf_counter() - t0
    return {"ms": timeit(step), "ready_s": ready, "import_s": t0 - started}


def run_jax():
    started = time.perf_counter()
    import jax
    import jax.numpy as jnp

    t0 = time.perf_counter()
    X, Y, init = data()
    params = {k: jnp.asarray(v) for k, v in init.items()}

    def loss_fn(p, x, y):
        dn = ("NHWC", "HWIO", "NHWC")
        pool = lambda h: jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")  # noqa
        if MODEL == "residual":
            def conv(h, k, c):
                return jax.lax.conv_general_dilated(h, p[k], (1, 1), "SAME", dimension_numbers=dn) + p[c]

            h = pool(jax.nn.relu(conv(x, "K0", "c0")))
            for a, b in ((1, 2), (3, 4)):
                h = jax.nn.relu(conv(jax.nn.relu(conv(h, f"K{a}", f"c{a}")), f"K{b}", f"c{b}") + h)
            z = h.mean(axis=(1, 2)) @ p["W"] + p["b"]
            return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(z), axis=1))
        h = pool(jax.nn.relu(jax.lax.conv_general_dilated(x, p["K1"], (1, 1), "VALID", dimension_numbers=dn) + p["c1"]))
        h = pool(jax.nn.relu(jax.lax.conv_general_dilated(h, p["K2"], (1, 1), "VALID", dimension_numbers=dn) + p["c2"]))
        h = jax.nn.relu(h.reshape(x.shape[0], -1) @ p["W1"] + p["b1"])
        h = jax.nn.relu(h @ p["W2"] + p["b2"])
        z = h @ p["W3"] + p["b3"]
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(z), axis=1))

    @jax.jit
    def step(p, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        return jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)

    x, y = jnp.asarray(X), jnp.asarray(Y)
    state = {"p": params}

    def one():
        state["p"] = step(state["p"], x, y)
        jax.block_until_ready(state["p"])
    one()
    ready = time.perf_counter() - t0
    return {"ms": timeit(one), "ready_s": ready, "import_s": t0 - started}


def child(which):
    result({"symdl": run_symdl, "torch": run_torch, "jax": run_jax}[which]())


def spawn(which, env):
    return run_child(__file__, ["--child", which], env)


def symdl_rounds(variants, env, rounds):
    """``{label: [(cold, warm), ...]}``: each symdl checkout cold (an empty cache) then warm (a
    second process), the checkouts taking turns round after round, so drift in the machine's
    load lands on all of them alike."""
    out = {label: [] for label in variants}
    for _ in range(rounds):
        for label, root in variants.items():
            child_env = dict(env, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            with tempfile.TemporaryDirectory() as cache:
                child_env["SYMDL_CACHE_DIR"] = cache
                cold = spawn("symdl", child_env)
                warm = spawn("symdl", child_env)
            if cold and warm:
                out[label].append((cold, warm))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=sorted(SHAPES), default="lenet")
    ap.add_argument("--baseline", help="another symdl checkout, measured as 'symdl-baseline' in the same run")
    ap.add_argument("--rounds", type=int, default=1, help="symdl (and the baseline) measured this many times, "
                                                         "taking turns; medians are printed")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, BENCH_THREADS=str(args.threads), NUMBA_NUM_THREADS=str(args.threads), BENCH_MODEL=args.model)
    variants = {"symdl (cpu)": os.path.dirname(here)}
    if args.baseline:
        variants["symdl-baseline"] = os.path.abspath(args.baseline)
    measured = symdl_rounds(variants, env, args.rounds)
    med = {label: {"ms": statistics.median(w["ms"] for _, w in runs),
                   "cold": statistics.median(c["ready_s"] for c, _ in runs),
                   "warm": statistics.median(w["ready_s"] for _, w in runs),
                   "import": statistics.median(w["import_s"] for _, w in runs)} for label, runs in measured.items() if runs}
    rows = [(label, m) for label, m in med.items()]
    import importlib.util

    env["PYTHONPATH"] = variants["symdl (cpu)"] + os.pathsep + os.environ.get("PYTHONPATH", "")
    for name in ("torch", "jax"):
        if importlib.util.find_spec(name):
            rows.append((f"{name} ({'eager' if name == 'torch' else 'jit'})", spawn(name, env)))
    base = med["symdl (cpu)"]["ms"] if "symdl (cpu)" in med else float("nan")
    print(f"{args.model} CNN, SGD step, batch {BATCH}, float32, {args.threads} threads, {args.rounds} round(s)")
    print(f"{'framework':<16} {'ms/step':>9} {'vs symdl':>9} {'import s':>9} {'cold s':>7} {'warm s':>7}")
    for name, r in rows:
        if r:
            cold = f"{r['cold']:>7.2f}" if "cold" in r else f"{'':>7}"
            warm = r.get("warm", r.get("ready_s"))
            imported = r.get("import", r.get("import_s"))
            print(f"{name:<16} {r['ms']:>9.2f} {r['ms'] / base:>8.2f}x {imported:>9.2f} {cold} {warm:>7.2f}")
    print("after the import: cold, build + first step from an empty cache; warm, the same in a second process, "
          "from the cache (a peer: its first step)")


if __name__ == "__main__":
    main()
