"""Hessian-vector products through an LSTM, and reverse over forward against reverse over reverse.

1. An LSTM(64) over T = 50 steps of 16 features, batch 32, last step -> dense 10, softmax
   cross-entropy, float64: symdl's ``value_and_grad`` and ``sd.hvp`` (reverse over forward: the
   gradient of the loss's tangent, a second pair of scans) compiled on a backend, against PyTorch
   eager ``nn.LSTM``: loss + ``backward()``, and the Hessian-vector product by double backward
   (``grad(⟨grad(L, create_graph=True), v⟩)``). The ratio that matters is hvp / gradient.
2. An MLP 64-256-256-10 (tanh, batch 128, float64): ``sd.hvp``'s reverse over reverse (the gradient
   of ``⟨∇L, v⟩``, what symdl uses without a recurrence) against reverse over forward (the gradient of
   the tangent ``L̇``): derive + lower seconds, kernels, and the compiled program's run time.

Each measurement is its own process; the tables print ratios. Run it when the machine is idle.

    python benchmarks/hvp_rnn.py                   # numpy and cpu backends
    python benchmarks/hvp_rnn.py --backends numpy
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import result, spawn, timeit  # noqa: E402

N, T, F, UNITS, CLASSES = 32, 50, 16, 64, 10


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, T, F))
    y = np.eye(CLASSES)[rng.integers(0, CLASSES, size=N)]
    return x, y


def _lstm_weights():
    import numpy as np

    rng = np.random.default_rng(1)
    w = {"kernel1": rng.normal(size=(F, 4 * UNITS)) * 0.2,
         "recurrent_kernel1": rng.normal(size=(UNITS, 4 * UNITS)) * 0.1, "bias1": rng.normal(size=(4 * UNITS,)) * 0.1, "Wd": rng.normal(size=(UNITS, CLASSES)) * 0.2,
         "bd": rng.normal(size=(CLASSES,)) * 0.1}
    v = {k: rng.normal(size=a.shape) for k, a in w.items()}
    return w, v


def _compiled_hvp(loss, params, backend, by):
    """``(run(arrays) -> outputs, derive + lower seconds, kernel count)`` of the hvp program."""
    import symdl as sd
    from symdl.autodiff.jvp import tangents
    from symdl.graph.nodes import Input, Param, VectorParam, leaves
    from symdl.ir.lowering import lower
    from symdl.run.higher import _directional
    from symdl.run.validate import check_arrays

    t0 = time.perf_counter()
    vs = [(VectorParam if isinstance(p, VectorParam) else Param)(f"v__{p.name}", *p.shape) for p in params]
    if by == "tangent":  # reverse over forward
        hv = sd.grad(tangents([loss], dict(zip(params, vs)))[loss], params)
    elif by == "reverse":  # reverse over reverse
        hv = sd.grad(_directional(sd.grad(loss, params), dict(zip(params, vs))), params)
    else:
        hv = sd.hvp(loss, params, vs)
    program = lower({f"hvp_{p.name}": hv[p] for p in params})
    derive = time.perf_counter() - t0
    runner = sd.backends.get(backend).compile_program(program, "float64")
    known = list(leaves(loss)) + vs
    inputs = [l for l in known if isinstance(l, Input)]
    leaves_ = [l for l in known if isinstance(l, Param)]

    def run(arrays):
        converted, n = check_arrays(arrays, inputs, leaves_, "float64")
        return runner.run({k: v for k, v in converted.items() if k in program.externals}, {}, n)

    return run, derive, len(program.kernels)


def symdl_lstm(backend):
    import symdl as sd
    from symdl.graph.nodes import sequence_input

    x = sequence_input("x", (T, F))
    y = sd.input("y", CLASSES)
    built = sd.nn.LSTM(UNITS).build_both(1, x, x)
    Wd, bd = sd.param("Wd", (UNITS, CLASSES)), sd.param("bd", CLASSES)
    loss = sd.losses.softmax_cross_entropy(built.train @ Wd + bd, y)
    params = built.params + [Wd, bd]
    w, v = _lstm_weights()
    xs, ys = _data()
    f = sd.value_and_grad(loss, params, backend=backend, dtype="float64")
    grad_ms = timeit(lambda: f(x=xs, y=ys, **w))
    run, derive, kernels = _compiled_hvp(loss, params, backend, "auto")
    arrays = {"x": xs, "y": ys, **w, **{f"v__{k}": a for k, a in v.items()}}
    hvp_ms = timeit(lambda: run(arrays))
    result({"grad": grad_ms, "hvp": hvp_ms, "derive": derive, "kernels": kernels})


def torch_lstm(threads):
    import torch

    torch.set_num_threads(threads)
    w, v = _lstm_weights()
    xs, ys = _data()
    x, labels = torch.from_numpy(xs), torch.from_numpy(ys.argmax(1))
    theta = {k: torch.tensor(a, requires_grad=True) for k, a in w.items()}
    vt = [torch.from_numpy(v[k]) for k in w]
    lstm = torch.nn.LSTM(F, UNITS, batch_first=True).double()

    def loss_fn():
        p = {"weight_ih_l0": theta["kernel1"].T, "weight_hh_l0": theta["recurrent_kernel1"].T,
             "bias_ih_l0": theta["bias1"], "bias_hh_l0": torch.zeros_like(theta["bias1"])}
        out, _ = torch.func.functional_call(lstm, p, (x,))
        return torch.nn.functional.cross_entropy(out[:, -1] @ theta["Wd"] + theta["bd"], labels)

    def grad():
        return torch.autograd.grad(loss_fn(), list(theta.values()))

    def hvp():
        g = torch.autograd.grad(loss_fn(), list(theta.values()), create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(g, vt))
        return torch.autograd.grad(dot, list(theta.values()))

    result({"grad": timeit(grad), "hvp": timeit(hvp)})


def symdl_mlp(backend, by):
    import numpy as np

    import symdl as sd

    sizes = (64, 256, 256, 10)
    x, y = sd.input("x", sizes[0]), sd.input("y", sizes[-1])
    h, params = x, []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        W, c = sd.param(f"W{i}", (a, b)), sd.param(f"b{i}", b)
        params += [W, c]
        h = h @ W + c
        if i < len(sizes) - 2:
            h = sd.tanh(h)
    loss = sd.losses.softmax_cross_entropy(h, y)
    run, derive, kernels = _compiled_hvp(loss, params, backend, by)
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(128, sizes[0])), "y": np.eye(sizes[-1])[rng.integers(0, sizes[-1], 128)]}
    for p in params:
        arrays[str(p.name)] = rng.normal(size=p.value_shape) * 0.1
        arrays[f"v__{p.name}"] = rng.normal(size=p.value_shape)
    ms = timeit(lambda: run(arrays))
    check = float(np.abs(run(arrays)["hvp_W0"]).sum())
    result({"run": ms, "derive": derive, "kernels": kernels, "check": check})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="numpy,cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs="*")
    a = ap.parse_args()
    if a.one:
        what, arg = a.one[0], a.one[1:]
        {"symdl_lstm": lambda: symdl_lstm(arg[0]), "torch_lstm": lambda: torch_lstm(int(arg[0])),
         "symdl_mlp": lambda: symdl_mlp(arg[0], arg[1])}[what]()
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's symdl, not an installed one
    env = {**os.environ, "NUMBA_NUM_THREADS": str(a.threads), "OMP_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    me = os.path.abspath(__file__)
    backends = a.backends.split(",")
    print(f"LSTM({UNITS}), T={T}, {F} features, batch {N}, dense {CLASSES}, float64, {a.threads} threads "
          "(median ms)")
    print(f"  {'':14s} {'gradient':>9s} {'hvp':>9s} {'hvp/grad':>9s}  derive+lower hvp s  kernels")
    rows = {}
    for be in backends:
        r = spawn(me, ["--one", "symdl_lstm", be], env, timeout=1800)
        if r:
            rows[be] = r
            print(f"  symdl {be:8s} {r['grad']:9.2f} {r['hvp']:9.2f} {r['hvp'] / r['grad']:9.2f}  "
                  f"{r['derive']:18.3f}  {r['kernels']:7d}")
    r = spawn(me, ["--one", "torch_lstm", str(a.threads)], env, timeout=1800)
    if r:
        print(f"  {'torch eager':14s} {r['grad']:9.2f} {r['hvp']:9.2f} {r['hvp'] / r['grad']:9.2f}")
        for be, s in rows.items():
            print(f"  symdl {be} / torch: gradient {s['grad'] / r['grad']:.2f}x, hvp {s['hvp'] / r['hvp']:.2f}x")
    print("\nMLP 64-256-256-10 tanh, batch 128, float64: sd.hvp's two routes")
    print(f"  {'backend':8s} {'route':22s} {'derive+lower s':>15s} {'kernels':>8s} {'run ms':>9s}")
    for be in backends:
        got = {}
        for by, name in (("reverse", "reverse over reverse"), ("tangent", "reverse over forward")):
            r = spawn(me, ["--one", "symdl_mlp", be, by], env, timeout=1800)
            if r:
                got[by] = r
                print(f"  {be:8s} {name:22s} {r['derive']:15.3f} {r['kernels']:8d} {r['run']:9.3f}")
        if len(got) == 2:
            assert abs(got["reverse"]["check"] - got["tangent"]["check"]) <= 1e-9 * abs(got["reverse"]["check"])
            print(f"  {be:8s} forward/reverse run time {got['tangent']['run'] / got['reverse']['run']:.2f}x")


if __name__ == "__main__":
    main()
