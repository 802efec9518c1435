"""One AdamW step of nanoGPT's CPU configuration in symdl against PyTorch eager, torch.compile and JAX jit.

The model (nanoGPT's ``config/train_shakespeare_char.py`` scaled to a CPU, as its README runs it:
4 layers, 4 heads, width 128, context 64, batch 12, a vocabulary of 65): token and position
embeddings -> pre-norm blocks ``x + MHA(LN(x), causal)``, ``x + Dense(d)(gelu(Dense(4d)(LN(x))))``
-> LN -> Dense(vocab); per-token softmax cross-entropy, AdamW (lr 1e-3, weight decay 0.01). Every
framework gets the same weights (nanoGPT's N(0, 0.02) init), the same batch, float32, and the same
layer norm epsilon (Keras's 1e-3); PyTorch's model is ``nn.Linear``/``nn.LayerNorm``/``nn.GELU()``
(exact erf) with ``F.scaled_dot_product_attention(is_causal=True)``. The first step's loss of each
framework is printed beside symdl's: the same model computes the same number.

Each measurement runs in its own process (thread pools and caches do not leak); frameworks take
turns round after round (symdl, torch, torch.compile, jax, symdl, ...), and the medians of the
rounds are printed. symdl's cold start is its first round (an empty ``SYMDL_CACHE_DIR``: build,
derive, generate, compile, first step), its warm start the later rounds (a new process, the same
cache), both after the import, which has its own column; a peer's start is its first step.
Derivation (build the graph, derive, lower: no code generated or compiled) is timed for 1 and 8
blocks in fresh processes. ``--profile`` times each kernel of symdl's step alone and prints the
top ones.

    python benchmarks/gpt_step.py                   # 3 rounds, 2 threads
    python benchmarks/gpt_step.py --rounds 5 --layers 8 --profile
    python benchmarks/gpt_step.py --quick           # tiny sizes: a smoke test of the script
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from _common import result, spawn, timeit

FULL = {"layers": 4, "heads": 4, "width": 128, "context": 64, "batch": 12, "vocab": 65}
QUICK = {"layers": 1, "heads": 2, "width": 16, "context": 8, "batch": 2, "vocab": 11}
LR, WEIGHT_DECAY, EPS = 1e-3, 0.01, 1e-3  # EPS: layer norm's (Keras's default, used by both)


def config() -> dict:
    return json.loads(os.environ["BENCH_CONFIG"])


def data(cfg, seed=0):
    """``(ids, targets, weights)``: a batch of token ids ``(batch, context)``, next-token targets, and
    every weight in symdl's order (``model.get_weights()``): embeddings, positions, per block
    (γ, β, Wq, bq, Wk, bk, Wv, bv, Wo, bo, γ, β, W_fc, b_fc, W_proj, b_proj), final (γ, β), head (W, b);
    matrices ``(in, out)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    V, T, d, B = cfg["vocab"], cfg["context"], cfg["width"], cfg["batch"]
    ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    normal = lambda *shape: (rng.normal(size=shape) * 0.02).astype(np.float32)  # noqa: E731
    ones, zeros = (lambda k: np.ones(k, np.float32)), (lambda k: np.zeros(k, np.float32))
    weights = [normal(V, d), normal(T, d)]
    for _ in range(cfg["layers"]):
        weights += [ones(d), zeros(d)]
        for _ in range(4):  # query, key, value, output
            weights += [normal(d, d), zeros(d)]
        weights += [ones(d), zeros(d), normal(d, 4 * d), zeros(4 * d), normal(4 * d, d), zeros(d)]
    weights += [ones(d), zeros(d), normal(d, V), zeros(V)]
    return ids, targets, weights


# ----------------------------------------------------------------------------- symdl


def symdl_gpt(sd, cfg, layers=None):
    """The GPT as a Keras-style functional model (what examples/char_transformer.py trains)."""
    V, T, d, H = cfg["vocab"], cfg["context"], cfg["width"], cfg["heads"]
    inp = sd.nn.Input(shape=(T,), dtype="int32")
    x = sd.nn.TokenAndPositionEmbedding(V, T, d)(inp)
    for _ in range(cfg["layers"] if layers is None else layers):
        h = sd.nn.LayerNormalization(epsilon=EPS)(x)
        x = x + sd.nn.MultiHeadAttention(num_heads=H, key_dim=d // H)(h, h, use_causal_mask=True)
        h = sd.nn.LayerNormalization(epsilon=EPS)(x)
        x = x + sd.nn.Dense(d)(sd.nn.Dense(4 * d, activation="gelu")(h))
    return sd.nn.Model(inp, sd.nn.Dense(V)(sd.nn.LayerNormalization(epsilon=EPS)(x)))


def run_symdl(profile=False):
    started = time.perf_counter()
    import symdl as sd

    t0 = time.perf_counter()
    cfg = config()
    ids, targets, weights = data(cfg)
    model = symdl_gpt(sd, cfg)
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.AdamW(LR, weight_decay=WEIGHT_DECAY),
                  backend="cpu", dtype="float32")
    names = list(model.get_weights())
    model.set_weights(dict(zip(names, weights, strict=True)))
    arrays = model.feed(*model.prepare(ids, targets, "benchmark batch"))
    step = model.train_step
    first = step.step(check_finite=False, **arrays)
    ready = time.perf_counter() - t0
    out = {"ms": timeit(lambda: step.step(check_finite=False, **arrays)), "ready_s": ready,
           "import_s": t0 - started, "loss": first, "kernels": len(step.program.kernels)}
    if profile:
        out["profile"] = kernel_profile(step)
    return out


def kernel_profile(step, repeats=20):
    """Each kernel of the step alone (one thread, its frame row run by the serial driver, the median
    of ``repeats`` calls, in step order so its inputs hold the step's values): ``[(kind, what it
    computes, shape, ms), ...]``, less the cost of an empty call. A profile, not the step: one thread."""
    import numpy as np
    import sympy as sp

    from symdl.backends import threads
    from symdl.backends.cpu import runtime

    runner, n = step.runner, step.last_n
    frames = runner._ready[n][0]
    if len(frames) != len(step.program.kernels):
        return []
    driver = runtime.serial_driver()
    rows, width = frames.shape
    out = []
    with threads.blas_single_threaded():
        calls = []  # the cost of a call that runs no kernel (Python and the driver), subtracted
        for _ in range(200):
            t0 = time.perf_counter()
            driver(frames.ctypes.data, 0, width)
            calls.append(time.perf_counter() - t0)
        empty = float(np.median(calls))
        for i, k in enumerate(step.program.kernels):
            address = frames.ctypes.data + i * width * frames.itemsize
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                driver(address, 1, width)
                times.append(time.perf_counter() - t0)
            dims = [sp.sympify(d) for d in step.program.shape_of(k.out)]
            shape = "(" + ", ".join(str(d.subs({s: n for s in d.free_symbols})) for d in dims) + ")"
            what = f"{k.out} = {k}"
            what = what if len(what) <= 80 else what[:77] + "..."
            out.append((type(k).__name__, what, shape, max(0.0, float(np.median(times)) - empty) * 1e3))
    return out


def run_derive(layers):
    """Build the graph of ``layers`` blocks, derive its gradients and the AdamW update, lower them to
    kernels (``training_program``): no code is generated or compiled."""
    started = time.perf_counter()
    import symdl as sd
    from symdl.formulas import losses
    from symdl.run.pipeline import training_program

    t0 = time.perf_counter()
    model = symdl_gpt(sd, config(), layers)
    loss = losses.get("softmax_cross_entropy")(model.output_exprs[0], model.ys[0])
    program = training_program(loss, model.params, sd.optim.AdamW(LR), writes=model.writes)
    return {"derive_s": time.perf_counter() - t0, "import_s": t0 - started, "kernels": len(program.kernels)}


# ----------------------------------------------------------------------------- PyTorch


def run_torch(compiled=False):
    started = time.perf_counter()
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    cfg = config()
    ids, targets, weights = data(cfg)
    V, T, d, H = cfg["vocab"], cfg["context"], cfg["width"], cfg["heads"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d, eps=EPS), nn.LayerNorm(d, eps=EPS)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.fc, self.proj, self.gelu = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.GELU()

        def forward(self, x):
            B = x.shape[0]
            h = self.ln1(x)
            q, k, v = (f(h).view(B, T, H, d // H).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
            x = x + self.o(a)
            return x + self.proj(self.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, d), nn.Parameter(torch.zeros(T, d))
            self.blocks = nn.ModuleList(Block() for _ in range(cfg["layers"]))
            self.ln, self.head = nn.LayerNorm(d, eps=EPS), nn.Linear(d, V)

        def forward(self, idx):
            x = self.tok(idx) + self.pos
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln(x))

    model = GPT()
    w = iter(torch.tensor(a) for a in weights)
    with torch.no_grad():
        model.tok.weight.copy_(next(w)); model.pos.copy_(next(w))

        def linear(m):
            m.weight.copy_(next(w).T); m.bias.copy_(next(w))

        def norm(m):
            m.weight.copy_(next(w)); m.bias.copy_(next(w))
        for b in model.blocks:
            norm(b.ln1); linear(b.q); linear(b.k); linear(b.v); linear(b.o)
            norm(b.ln2); linear(b.fc); linear(b.proj)
        norm(model.ln); linear(model.head)
    forward = model
    if compiled:
        try:
            forward = torch.compile(model)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x, y = torch.tensor(ids, dtype=torch.long), torch.tensor(targets, dtype=torch.long)

    def step():
        loss = F.cross_entropy(forward(x).view(-1, V), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    try:
        first = step().item()
    except Exception as e:  # noqa: BLE001 - torch.compile's backend may be missing a compiler
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
    ready = time.perf_counter() - t0
    return {"ms": timeit(step), "ready_s": ready, "import_s": t0 - started, "loss": first}


# ----------------------------------------------------------------------------- JAX


def run_jax():
    started = time.perf_counter()
    import jax
    import jax.numpy as jnp

    t0 = time.perf_counter()
    cfg = config()
    ids, targets, weights = data(cfg)
    V, T, d, H = cfg["vocab"], cfg["context"], cfg["width"], cfg["heads"]
    params = [jnp.asarray(a) for a in weights]

    def norm(x, g, b):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS) * g + b

    def loss_fn(p, idx, tgt):
        B = idx.shape[0]
        x = p[0][idx] + p[1]
        mask = jnp.tril(jnp.ones((T, T), bool))
        i = 2
        for _ in range(cfg["layers"]):
            g1, b1, Wq, bq, Wk, bk, Wv, bv, Wo, bo, g2, b2, Wf, bf, Wp, bp = p[i : i + 16]
            i += 16
            h = norm(x, g1, b1)
            q, k, v = ((h @ W + c).reshape(B, T, H, d // H).transpose(0, 2, 1, 3) for W, c in
                       ((Wq, bq), (Wk, bk), (Wv, bv)))
            s = jnp.where(mask, q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(d // H), -jnp.inf)
            a = (jax.nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
            x = x + a @ Wo + bo
            x = x + jax.nn.gelu(norm(x, g2, b2) @ Wf + bf, approximate=False) @ Wp + bp
        z = norm(x, p[i], p[i + 1]) @ p[i + 2] + p[i + 3]
        logp = jax.nn.log_softmax(z, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tgt[..., None], axis=-1))

    @jax.jit
    def step(p, m, v, t, idx, tgt):  # AdamW as torch.optim.AdamW computes it
        loss, g = jax.value_and_grad(loss_fn)(p, idx, tgt)
        m = [0.9 * a + 0.1 * b for a, b in zip(m, g)]
        v = [0.999 * a + 0.001 * b * b for a, b in zip(v, g)]
        p = [w * (1 - LR * WEIGHT_DECAY) - LR * (a / (1 - 0.9**t)) / (jnp.sqrt(b / (1 - 0.999**t)) + 1e-8)
             for w, a, b in zip(p, m, v)]
        return loss, p, m, v

    idx, tgt = jnp.asarray(ids), jnp.asarray(targets)
    state = {"p": params, "m": [jnp.zeros_like(a) for a in params], "v": [jnp.zeros_like(a) for a in params],
             "t": 0}

    def one():
        state["t"] += 1
        loss, state["p"], state["m"], state["v"] = step(state["p"], state["m"], state["v"], float(state["t"]),
                                                          idx, tgt)
        jax.block_until_ready(state["p"])
        return loss

    first = float(one())
    ready = time.perf_counter() - t0
    return {"ms": timeit(one), "ready_s": ready, "import_s": t0 - started, "loss": first}


# ----------------------------------------------------------------------------- the table


def child(which, args):
    if which == "derive":
        return result(run_derive(args.blocks))
    runs = {"symdl": lambda: run_symdl(args.profile), "torch": run_torch, "torch.compile": lambda: run_torch(True),
            "jax": run_jax}
    result(runs[which]())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--blocks", type=int, help="(a derive child) blocks to derive")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every framework, taking turns")
    ap.add_argument("--layers", type=int, help=f"transformer blocks (default {FULL['layers']})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--derive-blocks", default="1,8", help="block counts whose derivation is timed")
    ap.add_argument("--profile", action="store_true", help="time each kernel of symdl's step alone")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test of the script")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args)
    import importlib.util

    load_start = os.getloadavg()[0]
    cfg = dict(QUICK if args.quick else FULL)
    if args.layers:
        cfg["layers"] = args.layers
    rounds = 1 if args.quick else args.rounds
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, BENCH_THREADS=str(args.threads), NUMBA_NUM_THREADS=str(args.threads),
               BENCH_CONFIG=json.dumps(cfg),
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(here), os.environ.get("PYTHONPATH")])))
    peers = ["torch", "torch.compile"] if importlib.util.find_spec("torch") else []
    missing = {"torch": "torch not installed", "torch.compile": "torch not installed"} if not peers else {}
    if importlib.util.find_spec("jax"):
        peers.append("jax")
    else:
        missing["jax"] = "jax not installed"
    runs = {name: [] for name in ["symdl"] + peers}
    failed = dict(missing)
    profile = None
    with tempfile.TemporaryDirectory() as cache:
        symdl_env = dict(env, SYMDL_CACHE_DIR=cache)
        for r in range(max(rounds, 2)):  # one round: a second symdl process still gives the warm start
            last = r == max(rounds, 2) - 1
            out = spawn(__file__, ["--child", "symdl", *(["--profile"] if args.profile and last else [])], symdl_env)
            if out:
                runs["symdl"].append(out)
                profile = out.get("profile") or profile
            for name in peers if r < rounds else []:
                if name in failed:
                    continue
                out = spawn(__file__, ["--child", name], env)
                if out is None or "error" in out:
                    failed[name] = (out or {}).get("error", "failed (see stderr)")
                else:
                    runs[name].append(out)
    derive = {}
    for blocks in (int(b) for b in args.derive_blocks.split(",") if b):
        out = spawn(__file__, ["--child", "derive", "--blocks", str(blocks)], env)
        if out:
            derive[blocks] = out

    sym = runs["symdl"]
    base = statistics.median(r["ms"] for r in sym) if sym else float("nan")
    print(f"GPT step (AdamW): {cfg['layers']} layers, {cfg['heads']} heads, width {cfg['width']}, context "
          f"{cfg['context']}, batch {cfg['batch']}, vocabulary {cfg['vocab']}; float32, {args.threads} threads, "
          f"{rounds} round(s); OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; "
          f"load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    print()
    print("| framework | ms/step | time vs PyTorch eager | import s | cold s | warm s | first step's loss | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    eager = statistics.median(r["ms"] for r in runs["torch"]) if runs.get("torch") else None
    for name in ["symdl", "torch", "torch.compile", "jax"]:
        label = {"symdl": "symdl (cpu)", "torch": "PyTorch eager", "torch.compile": "torch.compile",
                 "jax": "JAX jit"}[name]
        if name in failed and not runs.get(name):
            print(f"| {label} | n/a | | | | | | {failed[name]} |")
            continue
        rs = runs.get(name) or []
        if not rs:
            continue
        ms = statistics.median(r["ms"] for r in rs)
        ratio = f"{ms / eager:.2f}x" if eager else "n/a"
        imported = statistics.median(r["import_s"] for r in rs)
        if name == "symdl":
            cold, warm = f"{rs[0]['ready_s']:.2f}", (f"{statistics.median(r['ready_s'] for r in rs[1:]):.2f}"
                                                     if len(rs) > 1 else "")
        else:
            cold, warm = "", f"{statistics.median(r['ready_s'] for r in rs):.2f}"
        note = f"{len(rs)} processes" if name == "symdl" else ""
        print(f"| {label} | {ms:.2f} | {ratio} | {imported:.2f} | {cold} | {warm} | {rs[0]['loss']:.6f} | {note} |")
    print()
    print("ms/step: the median over rounds of each process's median step; time vs PyTorch eager: < 1 is faster. "
          "After the import: cold, build + derive + generate + compile + first step from an empty cache; warm, "
          "the same in a new process from the cache (a peer: its first step, torch.compile's compile included).")
    if sym:
        print(f"symdl's step has {sym[0]['kernels']} kernels.")
    if derive:
        print()
        print("| blocks | derive s (build + grad + lower, no compile) | kernels | vs the fewest blocks | "
              "per block, vs the fewest |")
        print("|---:|---:|---:|---:|---:|")
        few = min(derive)
        first = derive[few]["derive_s"]
        for blocks, out in sorted(derive.items()):
            per = out["derive_s"] / blocks / (first / few)
            ratio = out["derive_s"] / first
            print(f"| {blocks} | {out['derive_s']:.2f} | {out['kernels']} | {ratio:.2f}x | {per:.2f}x |")
    if profile:
        total = sum(p[3] for p in profile)
        print()
        print(f"symdl's kernels, each alone on one thread (sum {total:.2f} ms; the top 12):")
        print()
        print("| kernel | computes | shape | ms | share |")
        print("|---|---|---|---:|---:|")
        for kind, name, shape, ms in sorted(profile, key=lambda p: -p[3])[:12]:
            print(f"| {kind} | {name} | {shape} | {ms:.3f} | {ms / total:.1%} |")
        by_kind = {}
        for kind, _, _, ms in profile:
            by_kind[kind] = by_kind.get(kind, 0.0) + ms
        print()
        print("by kind: " + ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})"
                                      for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
