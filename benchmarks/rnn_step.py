"""One Adam step of an LSTM(128) over T = 100 steps of 32 features, batch 64 (last step -> dense 10,
softmax cross-entropy, float32), symdl's cpu backend against PyTorch eager ``nn.LSTM`` (and JAX
``jit`` of a ``lax.scan`` when JAX is installed); then the time to derive and lower the step, and to
compile it cold (empty caches) and warm (a second process, caches filled), for T = 10 and T = 300.

Each timing is its own process (``--one``); the table prints ratios. Run it when the machine is idle.

    python benchmarks/rnn_step.py             # the table
    python benchmarks/rnn_step.py --steps 20  # fewer timed steps
    python benchmarks/rnn_step.py --rounds 5  # five turns each
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

N, T, F, UNITS, CLASSES = 64, 100, 32, 128, 10


def _data(T_=T):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, T_, F)).astype(np.float32)
    y = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, size=N)]
    return x, y


def _symdl_graph(T_):
    import symdl as sd
    from symdl.graph.nodes import sequence_input

    x = sequence_input("x", (T_, F))
    y = sd.input("y", CLASSES)
    layer = sd.nn.LSTM(UNITS)
    built = layer.build_both(1, x, x)
    Wd, bd = sd.param("Wd", (UNITS, CLASSES)), sd.param("bd", CLASSES)
    loss = sd.losses.softmax_cross_entropy(built.train @ Wd + bd, y)
    return loss, built.params + [Wd, bd], built.initial


def symdl_step(steps, threads):
    import numpy as np

    import symdl as sd

    loss, params, initial = _symdl_graph(T)
    train = sd.compile(loss, params, optimizer=sd.optim.Adam(1e-3), backend="cpu", dtype="float32")
    for name, value in initial.items():
        train.params[name][...] = value
    x, y = _data()
    train.step(x=x, y=y)  # compile
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        train.step(x=x, y=y)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def torch_step(steps, threads):
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    lstm, head = torch.nn.LSTM(F, UNITS, batch_first=True), torch.nn.Linear(UNITS, CLASSES)
    opt = torch.optim.Adam(list(lstm.parameters()) + list(head.parameters()), lr=1e-3)
    x, y = _data()
    x, labels = torch.from_numpy(x), torch.from_numpy(y.argmax(1))

    def step():
        opt.zero_grad()
        out, _ = lstm(x)
        loss = torch.nn.functional.cross_entropy(head(out[:, -1]), labels)
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def jax_step(steps, threads):
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    p = {"W": rng.normal(size=(F, 4 * UNITS)).astype(np.float32) * 0.1,
         "U": rng.normal(size=(UNITS, 4 * UNITS)).astype(np.float32) * 0.1,
         "b": np.zeros(4 * UNITS, np.float32), "Wd": rng.normal(size=(UNITS, CLASSES)).astype(np.float32) * 0.1,
         "bd": np.zeros(CLASSES, np.float32)}

    def loss_fn(p, x, y):
        xp = jnp.einsum("ntf,fk->tnk", x, p["W"]) + p["b"]

        def cell(carry, xt):
            h, c = carry
            z = xt + h @ p["U"]
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), None

        zeros = jnp.zeros((x.shape[0], UNITS), x.dtype)
        (h, _), _ = jax.lax.scan(cell, (zeros, zeros), xp)
        logits = h @ p["Wd"] + p["bd"]
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=1))

    m = jax.tree_util.tree_map(jnp.zeros_like, p)
    v = jax.tree_util.tree_map(jnp.zeros_like, p)

    @jax.jit
    def step(p, m, v, t, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        m = jax.tree_util.tree_map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
        v = jax.tree_util.tree_map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
        p = jax.tree_util.tree_map(lambda w, a, b: w - 1e-3 * (a / (1 - 0.9 ** t)) / (jnp.sqrt(b / (1 - 0.999 ** t))
                                                                                       + 1e-7), p, m, v)
        return p, m, v

    x, y = _data()
    p, m, v = step(p, m, v, 1.0, x, y)
    jax.block_until_ready(p)
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        p, m, v = step(p, m, v, float(k + 2), x, y)
        jax.block_until_ready(p)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def symdl_build(T_):
    """``(derive + lower seconds, first step seconds)``: the graph's gradient and program, then the
    first compiled step (compiling, or loading the caches)."""
    import symdl as sd
    from symdl.run.pipeline import gradient_program

    t0 = time.perf_counter()
    loss, params, initial = _symdl_graph(T_)
    gradient_program(loss, params)
    derive = time.perf_counter() - t0
    t0 = time.perf_counter()
    train = sd.compile(loss, params, optimizer=sd.optim.Adam(1e-3), backend="cpu", dtype="float32")
    for name, value in initial.items():
        train.params[name][...] = value
    x, y = _data(T_)
    train.step(x=x[:8], y=y[:8])
    return derive, time.perf_counter() - t0


def _run(args, env=None):
    out = subprocess.run([sys.executable, __file__, "--one", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every framework, taking turns")
    ap.add_argument("--one", nargs="*")
    a = ap.parse_args()
    if a.one:
        what = a.one[0]
        if what == "build":
            derive, first = symdl_build(int(a.one[1]))
            print(json.dumps({"derive": derive, "first": first}))
        else:
            fn = {"symdl": symdl_step, "torch": torch_step, "jax": jax_step}[what]
            print(json.dumps({"step": fn(int(a.one[1]), int(a.one[2]))}))
        return
    env = {"NUMBA_NUM_THREADS": str(a.threads), "OMP_NUM_THREADS": str(a.threads)}
    print(f"LSTM({UNITS}), T={T}, {F} features, batch {N}, Adam, float32, {a.threads} threads: one step (median of "
          f"{a.steps}), {a.rounds} round(s) taking turns; OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    runs = {"symdl": [], "torch": [], "jax": []}
    skipped = {}
    for _ in range(a.rounds):  # the frameworks take turns, so a change in the machine's load hits both
        for fw in runs:
            if fw in skipped:
                continue
            r = _run([fw, a.steps, a.threads], env)
            if "step" in r:
                runs[fw].append(r["step"])
            else:
                skipped[fw] = r["error"][:80]
    for fw, times in runs.items():
        shown = "  ".join(f"{1e3 * t:8.2f}" for t in times)
        print(f"  {fw:6s} " + (f"{shown} ms" if times else f"skipped ({skipped.get(fw, '')})"))
    if runs["symdl"] and runs["torch"]:
        ratios = [s_ / t_ for s_, t_ in zip(runs["symdl"], runs["torch"])]
        print("  symdl / torch by round: " + "  ".join(f"{r:.2f}x" for r in ratios)
              + f"; median {statistics.median(ratios):.2f}x")
    print("\nderive + lower (in process), first step cold (empty caches) and warm (caches filled)")
    print(f"  {'T':>4s} {'derive+lower s':>15s} {'cold first s':>13s} {'warm first s':>13s}")
    results = {}
    for T_ in (10, 300):
        with tempfile.TemporaryDirectory() as cache:
            cache_env = {**env, "SYMDL_CACHE_DIR": cache, "NUMBA_CACHE_DIR": cache}
            cold = _run(["build", T_], cache_env)
            warm = _run(["build", T_], cache_env)
        results[T_] = (cold, warm)
        fmt = lambda r, k: f"{r[k]:13.2f}" if k in r else f"{'error':>13s}"  # noqa: E731
        print(f"  {T_:4d} {cold.get('derive', float('nan')):15.3f} {fmt(cold, 'first')} {fmt(warm, 'first')}")
    (c10, w10), (c300, w300) = results[10], results[300]
    if "derive" in c10 and "derive" in c300:
        print(f"  T=300 / T=10: derive+lower {c300['derive'] / c10['derive']:.2f}x, cold first step "
              f"{c300['first'] / c10['first']:.2f}x, warm {w300['first'] / w10['first']:.2f}x")


if __name__ == "__main__":
    main()
