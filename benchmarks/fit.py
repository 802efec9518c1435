"""First epoch (cold and warm), steady epoch and held-out accuracy, each framework with its own fit loop.

The same model (ReLU hidden layers, softmax cross-entropy, Adam 1e-3, float32) trained by

* symdl ``Sequential.fit`` (cpu backend),
* Keras 3 with the JAX backend (``pip install keras jax``),
* a plain PyTorch loop (``pip install torch==2.13.0``: the CPU build),
* scikit-learn ``MLPClassifier.partial_fit`` (one call per epoch),

on two MLP tasks: the digits (1,797 x 64 -> 128 -> 10, batch 64) and a 20,000 x 784 synthetic
10-class set (784 -> 256 -> 256 -> 10, batch 128); and two CNN tasks (Adam 1e-3, batch 64): the
digits as 8x8 images (conv 3x3x16 same, max-pool 2, conv 3x3x32 same, max-pool 2, dense 64,
dense 10) and 12,000 generated 28x28 images of 10 classes (LeNet-style: conv 5x5x6 same, max-pool
2, conv 5x5x16 valid, max-pool 2, dense 120, dense 84, dense 10). Keras and PyTorch train the
same CNNs (PyTorch in NCHW); scikit-learn has none. Every framework runs on ``--threads`` threads
(2 by default). Every run is its own process, the
frameworks interleaved round by round; each cell is the best over rounds of the run's
value. "first cold" starts from empty caches (symdl's and Numba's, a fresh temporary
folder per run), "first warm" from the caches a previous run filled; the first epoch is
timed from building the model to the end of its first ``fit`` epoch (importing the
framework is its own column: the interpreter's cost, paid once per process). Peers that are not
installed are skipped.

A second table times symdl's cold compile against depth (32-unit tanh layers, Adam), and a
new architecture built from formulas another model already compiled.

    python benchmarks/fit.py                 # every task, every installed peer, 3 rounds
    python benchmarks/fit.py --tasks digits_cnn,mnist_cnn --depths ""   # the CNN rows alone
    python benchmarks/fit.py --quick         # digits only, 1 round, short
    env -u OPENBLAS_CORETYPE python benchmarks/fit.py    # what a user's machine does
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

TASKS = {"digits": ([64, 128, 10], 64, 8), "synthetic": ([784, 256, 256, 10], 128, 4),
         "digits_cnn": ("cnn", 64, 6), "mnist_cnn": ("cnn", 64, 3)}
#: conv layers as (filters, kernel, padding), then dense widths, for each CNN task.
CNNS = {"digits_cnn": ([(16, 3, "same"), (32, 3, "same")], [64, 10], (8, 8, 1)),
        "mnist_cnn": ([(6, 5, "same"), (16, 5, "valid")], [120, 84, 10], (28, 28, 1))}
FRAMEWORKS = ["symdl", "keras", "torch", "sklearn"]
LR = 1e-3


def task_data(task):
    import numpy as np
    from sklearn.datasets import load_digits, make_classification
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    if task == "mnist_cnn":  # 10 classes of generated 28x28 images: a class's strokes, shifted, plus noise
        rng = np.random.default_rng(0)
        templates = rng.random((10, 28, 28)) < 0.12
        y = rng.integers(0, 10, 12000)
        shifts = rng.integers(-2, 3, (12000, 2))
        X = np.stack([np.roll(templates[c], tuple(s), (0, 1)) for c, s in zip(y, shifts)]).astype(np.float32)
        X += rng.normal(scale=0.5, size=X.shape).astype(np.float32)
        X = X[..., None]
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
        return Xtr, Xte, ytr.astype(np.int64), yte.astype(np.int64)
    if task in ("digits", "digits_cnn"):
        X, y = load_digits(return_X_y=True)
    else:
        X, y = make_classification(n_samples=20000, n_features=784, n_informative=60, n_redundant=100, n_classes=10,
                                   n_clusters_per_class=2, class_sep=2.0, random_state=0)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    if task == "digits_cnn":  # pixels 0..16 as 8x8x1 images
        return (Xtr.reshape(-1, 8, 8, 1).astype(np.float32) / 16, Xte.reshape(-1, 8, 8, 1).astype(np.float32) / 16,
                ytr.astype(np.int64), yte.astype(np.int64))
    scaler = StandardScaler().fit(Xtr)
    return (scaler.transform(Xtr).astype(np.float32), scaler.transform(Xte).astype(np.float32),
            ytr.astype(np.int64), yte.astype(np.int64))


def worker(framework, task):
    """One run: ``{"first": s, "steady": s (median epoch after the first), "accuracy": a}``."""
    import numpy as np

    widths, batch, epochs = TASKS[task]
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    if widths == "cnn":
        if framework == "sklearn":
            return {"error": "scikit-learn has no CNN"}
        return cnn_worker(framework, task, batch, epochs, threads)
    Xtr, Xte, ytr, yte = task_data(task)
    times = []
    started = time.perf_counter()  # the import is timed on its own: "first" starts at building the model
    if framework == "symdl":
        import symdl as sd
    elif framework == "keras":
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras
    elif framework == "torch":
        import torch
    else:
        from sklearn.neural_network import MLPClassifier
    t0 = time.perf_counter()
    imported = t0 - started
    if framework == "symdl":
        model = sd.nn.Sequential([sd.nn.Dense(w, activation="relu") for w in widths[1:-1]] + [sd.nn.Dense(widths[-1])],
                                 input_dim=widths[0])
        model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(LR), backend="cpu", dtype="float32")
        for _ in range(epochs):
            model.fit(Xtr, ytr, epochs=1, batch_size=batch, verbose=0)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        accuracy = model.evaluate(Xte, yte)["accuracy"]
    elif framework == "keras":
        model = keras.Sequential([keras.Input((widths[0],))] + [keras.layers.Dense(w, activation="relu") for w in
                                                                   widths[1:-1]] + [keras.layers.Dense(widths[-1])])
        model.compile(optimizer=keras.optimizers.Adam(LR), metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for _ in range(epochs):
            model.fit(Xtr, ytr, epochs=1, batch_size=batch, verbose=0)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        accuracy = float(np.mean(np.argmax(model.predict(Xte, verbose=0), 1) == yte))
    elif framework == "torch":
        layers = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(widths[-2], widths[-1]))
        times, accuracy = torch_fit(model, Xtr, ytr, Xte, yte, epochs, batch, t0)
    elif framework == "sklearn":
        import warnings

        warnings.simplefilter("ignore")
        model = MLPClassifier(hidden_layer_sizes=tuple(widths[1:-1]), solver="adam", batch_size=batch,
                              learning_rate_init=LR, random_state=0)
        classes = np.arange(widths[-1])
        for _ in range(epochs):
            model.partial_fit(Xtr, ytr, classes=classes)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        accuracy = float(model.score(Xte, yte))
    else:
        raise ValueError(framework)
    return {"first": times[0], "steady": statistics.median(times[1:]), "accuracy": accuracy, "import": imported}


def torch_fit(model, Xtr, ytr, Xte, yte, epochs, batch, t0):
    """A plain PyTorch fit loop (Adam, cross-entropy, shuffled batches): ``(epoch times, held-out
    accuracy)``, the first epoch timed from ``t0``."""
    import torch

    times = []
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    lossf = torch.nn.CrossEntropyLoss()
    X, Y = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    for epoch in range(epochs):
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(X), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss = lossf(model(X[idx]), Y[idx])
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(Xte)).argmax(1).numpy() == yte).mean())
    return times, accuracy


def cnn_worker(framework, task, batch, epochs, threads):
    """A CNN task (``CNNS``), trained by the framework's own fit loop on ``threads`` threads."""
    import numpy as np

    convs, dense, shape = CNNS[task]
    Xtr, Xte, ytr, yte = task_data(task)
    times = []
    started = time.perf_counter()
    if framework == "symdl":
        import symdl as sd

        sd.set_num_threads(threads)
    elif framework == "keras":
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras
    else:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    imported = t0 - started
    if framework in ("symdl", "keras"):
        lib = sd.nn if framework == "symdl" else keras.layers
        layers = []
        for filters, size, padding in convs:
            layers += [lib.Conv2D(filters, size, padding=padding, activation="relu"), lib.MaxPooling2D(2)]
        layers += [lib.Flatten()] + [lib.Dense(w, activation="relu") for w in dense[:-1]] + [lib.Dense(dense[-1])]
        if framework == "symdl":
            model = sd.nn.Sequential(layers, input_shape=shape)
            model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(LR), backend="cpu", dtype="float32")
        else:
            model = keras.Sequential([keras.Input(shape)] + layers)
            model.compile(optimizer=keras.optimizers.Adam(LR), metrics=["accuracy"],
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for _ in range(epochs):
            model.fit(Xtr, ytr, epochs=1, batch_size=batch, verbose=0)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        if framework == "symdl":
            accuracy = model.evaluate(Xte, yte)["accuracy"]
        else:
            accuracy = float(np.mean(np.argmax(model.predict(Xte, verbose=0), 1) == yte))
    else:
        nn = torch.nn
        layers, channels, side = [], shape[2], shape[0]
        for filters, size, padding in convs:
            layers += [nn.Conv2d(channels, filters, size, padding=padding), nn.ReLU(), nn.MaxPool2d(2)]
            side = (side if padding == "same" else side - size + 1) // 2
            channels = filters
        width = channels * side * side
        layers.append(nn.Flatten())
        for w in dense[:-1]:
            layers += [nn.Linear(width, w), nn.ReLU()]
            width = w
        model = nn.Sequential(*layers, nn.Linear(width, dense[-1]))
        nchw = (0, 3, 1, 2)  # PyTorch's images are NCHW
        times, accuracy = torch_fit(model, Xtr.transpose(nchw).copy(), ytr, Xte.transpose(nchw).copy(), yte, epochs,
                                    batch, t0)
    return {"first": times[0], "steady": statistics.median(times[1:]), "accuracy": accuracy, "import": imported}


def depth_worker(hidden, width=32):
    """symdl alone: build + compile + first step of a ``hidden``-layer tanh net."""
    import numpy as np

    started = time.perf_counter()
    import symdl as sd

    t0 = time.perf_counter()
    x = sd.input("x", width); y = sd.input("y", 10)
    h, params = x, []
    for i in range(hidden):
        W = sd.param(f"W{i}", (width, width)); b = sd.param(f"b{i}", width)
        h = sd.tanh(h @ W + b)
        params += [W, b]
    W = sd.param("Wo", (width, 10)); b = sd.param("bo", 10)
    train = sd.compile(sd.losses.softmax_cross_entropy(h @ W + b, y), params + [W, b], optimizer=sd.optim.Adam(LR),
                       backend="cpu")
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    train.step(x=rng.normal(size=(64, width)), y=np.eye(10)[rng.integers(0, 10, 64)])
    t2 = time.perf_counter()
    return {"total": t2 - t0, "derive": t1 - t0, "numba": t2 - t1, "import": t0 - started, "formulas": len(train.runner.kernel_sources),
            "kernels": len(train.program.kernels)}


def spawn(args, env=None):
    out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=1800)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def installed(framework):
    module = {"symdl": "symdl", "keras": "keras", "torch": "torch", "sklearn": "sklearn"}[framework]
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                           env=dict(os.environ, KERAS_BACKEND="jax"))
    return probe.returncode == 0


def table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cold_env(folder):
    return dict(os.environ, SYMDL_CACHE_DIR=os.path.join(folder, "symdl"), NUMBA_CACHE_DIR=os.path.join(folder, "numba"),
                KERAS_BACKEND="jax")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", default="digits,synthetic")
    parser.add_argument("--depths", default="2,8,16,32", help='"" skips the depth table')
    parser.add_argument("--threads", type=int, default=2, help="threads of the CNN tasks' frameworks")
    args = parser.parse_args(argv)
    os.environ["BENCH_THREADS"] = str(args.threads)  # the benchmark's children read it
    rounds = 1 if args.quick else args.rounds
    tasks = ["digits"] if args.quick else args.tasks.split(",")
    frameworks = [f for f in FRAMEWORKS if installed(f)]
    print(f"# OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, {os.cpu_count()} cores, "
          f"best of {rounds} rounds; seconds (steady: median epoch after the first)")
    with tempfile.TemporaryDirectory() as scratch:
        warm = cold_env(os.path.join(scratch, "warm"))
        results = {}
        def task_frameworks(task):
            return [f for f in frameworks if not (TASKS[task][0] == "cnn" and f == "sklearn")]

        for task in tasks:  # fill the warm caches once
            for fw in task_frameworks(task):
                spawn([fw, task], warm)
        for r in range(rounds):
            for task in tasks:
                for fw in task_frameworks(task):
                    cold = spawn([fw, task], cold_env(os.path.join(scratch, f"cold{r}{task}{fw}")))
                    again = spawn([fw, task], warm)
                    results.setdefault((task, fw), []).append((cold, again))
        rows = [("task", "framework", "import", "first cold", "first warm", "steady", "vs best peer", "accuracy")]
        for task in tasks:
            best = {}
            for fw in task_frameworks(task):
                runs = [x for pair in results[(task, fw)] for x in pair if "error" not in x]
                if not runs:
                    best[fw] = None
                    continue
                best[fw] = {"cold": min(c["first"] for c, _ in results[(task, fw)] if "error" not in c),
                            "warm": min(w["first"] for _, w in results[(task, fw)] if "error" not in w),
                            "steady": min(x["steady"] for x in runs),
                            "accuracy": max(x["accuracy"] for x in runs),
                            "import": min(x["import"] for x in runs)}
            peers = [v["steady"] for fw, v in best.items() if fw != "symdl" and v]
            for fw in task_frameworks(task):
                v = best[fw]
                if v is None:
                    errors = {x["error"] for pair in results[(task, fw)] for x in pair if "error" in x}
                    rows.append((task, fw, "", "failed", "; ".join(errors)[:60], "", "", ""))
                    continue
                ratio = f"{v['steady'] / min(peers):.2f}x" if fw == "symdl" and peers else ""
                rows.append((task, fw, f"{v['import']:.2f}", f"{v['cold']:.3f}", f"{v['warm']:.3f}", f"{v['steady'] * 1000:.2f} ms", ratio,
                             f"{v['accuracy']:.4f}"))
        print(table(rows))
        if installed("symdl") and args.depths:
            print("\n# symdl cold compile against depth (32-unit tanh, Adam, batch 64): build + derive + compile + step, after the import")
            rows = [("hidden layers", "kernels", "formulas", "derive s", "numba s", "total s", "vs 2 hidden")]
            first = None
            depths = [int(d) for d in args.depths.split(",")]
            runs = {hidden: [] for hidden in depths}
            for r in range(rounds):  # depths interleaved round by round, like the frameworks above
                for hidden in depths:
                    runs[hidden].append(spawn(["depth", hidden], cold_env(os.path.join(scratch, f"depth{hidden}{r}"))))
            for hidden in depths:
                v = min((x for x in runs[hidden] if "error" not in x), key=lambda x: x["total"])
                first = first or v["total"]
                rows.append((hidden, v["kernels"], v["formulas"], f"{v['derive']:.2f}", f"{v['numba']:.2f}",
                             f"{v['total']:.2f}", f"{v['total'] / first:.2f}x"))
            print(table(rows))
            reuse = os.path.join(scratch, "reuse")
            spawn(["depth", 3], cold_env(reuse))
            v = spawn(["depth", 12], cold_env(reuse))
            print(f"\n# a second architecture (12 hidden layers) after a 3-layer model compiled its formulas: "
                  f"numba {v['numba']:.2f} s, total {v['total']:.2f} s (SymPy included; importing symdl {v['import']:.2f} s more)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        what = sys.argv[2]
        result = depth_worker(int(sys.argv[3])) if what == "depth" else worker(what, sys.argv[3])
        print(json.dumps(result))
    else:
        main()
