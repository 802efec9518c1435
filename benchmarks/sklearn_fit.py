"""Fit time of ``symdl.sklearn.MLPClassifier`` against scikit-learn's ``MLPClassifier``.

Same data, same architecture, same solver (Adam), same batch size and the same number of
epochs (``tol=0`` with ``n_iter_no_change`` above the epoch count, so neither stops early);
held-out accuracy beside each time. Each estimator is fitted once before timing so that
Numba compilation (or loading from symdl's compile cache) is not counted; that first-fit
overhead is printed separately.

Both run under the same thread setting, once with every core and once with one thread
(``sd.set_num_threads`` limits BLAS, which scikit-learn's MLP runs on, and Numba together):
on a small or busy machine, spinning BLAS and Numba thread pools slow both libraries down.

    python benchmarks/sklearn_fit.py            # digits and 20,000 x 784
    python benchmarks/sklearn_fit.py --quick    # smaller, for a smoke test
"""
from __future__ import annotations

import argparse
import platform
import time
import warnings

import numpy as np
from sklearn.datasets import load_digits, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier as SkMLP
from sklearn.preprocessing import StandardScaler

import symdl as sd
import symdl.sklearn as sds


def datasets(quick: bool):
    X, y = load_digits(return_X_y=True)
    yield "digits 1797x64", X, y, (128,), 5 if quick else 30
    n = 2000 if quick else 20000
    X, y = make_classification(n_samples=n, n_features=784, n_informative=60, n_redundant=100, n_classes=10,
                               n_clusters_per_class=2, class_sep=2.0, random_state=0)
    yield f"synthetic {n}x784", X, y, (256,), 2 if quick else 10


def timed_fit(make, X, y, repeats):
    best = np.inf
    for _ in range(repeats):
        est = make()
        t0 = time.perf_counter()
        est.fit(X, y)
        best = min(best, time.perf_counter() - t0)
    return best, est


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="fits per row; the best time is reported")
    parser.add_argument("--threads", default="all,1", help="comma-separated thread counts ('all' = every core)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", ConvergenceWarning)
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"best of {args.repeats} fits; times in seconds")
    rows = [("data", "threads", "estimator", "epochs", "fit s", "first fit s", "ratio", "accuracy")]
    for threads in args.threads.split(","):
        sd.set_num_threads(None if threads == "all" else int(threads))
        rows += run(args, str(sd.get_num_threads()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def run(args, threads):
    rows = []
    for name, X, y, hidden, epochs in datasets(args.quick):
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
        scaler = StandardScaler().fit(Xtr)
        Xtr, Xte = scaler.transform(Xtr), scaler.transform(Xte)
        common = dict(hidden_layer_sizes=hidden, max_iter=epochs, tol=0.0, n_iter_no_change=epochs + 1,
                      random_state=0)
        candidates = [("sklearn MLPClassifier", lambda: SkMLP(**common)),
                      ("symdl float32", lambda: sds.MLPClassifier(**common, dtype="float32")),
                      ("symdl float64", lambda: sds.MLPClassifier(**common, dtype="float64"))]
        reference = None
        for label, make in candidates:  # the first (scikit-learn) is the reference of the ratio
            t0 = time.perf_counter()
            first = make().set_params(max_iter=1).fit(Xtr, ytr)  # compiles (or loads) the step
            first_s = time.perf_counter() - t0
            seconds, est = timed_fit(make, Xtr, ytr, args.repeats)
            assert est.n_iter_ == epochs, (label, est.n_iter_)
            reference = reference or seconds
            rows.append((name, threads, label, str(epochs), f"{seconds:.3f}", f"{first_s:.2f}", f"{seconds / reference:.2f}x",
                         f"{est.score(Xte, yte):.3f}"))
            del first
    return rows


if __name__ == "__main__":
    main()
