"""Regularisers side by side on digits: L1 and L2 penalties, dropout and batch norm.

For each: held-out accuracy, how many weights are (near) zero, their mean size, and the gap
between training and held-out accuracy (what a regulariser is meant to shrink).
"""
import numpy as np

import symdl as sd
from _common import epochs

X, y = sd.datasets.digits()
Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=0)
Xtr, Xte = sd.datasets.standardize(Xtr, Xte)


def dense_relu(extra=()):
    """64 hidden ReLU units, with ``extra`` layers between the hidden layer and the output."""
    if not extra:
        return [sd.nn.Dense(64, activation="relu"), sd.nn.Dense(10)]
    return [sd.nn.Dense(64, use_bias=False), *extra, sd.nn.Dense(10)]


RUNS = [
    ("none", dense_relu(), None),
    ("l2(1e-3)", dense_relu(), sd.l2(1e-3)),
    ("l1(1e-3)", dense_relu(), sd.l1(1e-3)),
    ("dropout(0.3)", dense_relu([sd.nn.Activation("relu"), sd.nn.Dropout(0.3)]), None),
    ("batch norm", dense_relu([sd.nn.BatchNormalization(), sd.nn.Activation("relu")]), None),
]

print(f"{'regulariser':<14} {'accuracy':>9} {'|w| < 1e-3':>11} {'mean |w|':>9} {'train gap':>10}")
for name, layers, reg in RUNS:
    model = sd.nn.Sequential(layers, input_dim=64)
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(5e-3), regularizer=reg, backend="cpu", seed=0)
    model.fit(Xtr, ytr, epochs=epochs(40), batch_size=64, verbose=0)
    w = np.concatenate([v.ravel() for k, v in model.get_weights().items() if k.startswith("W")])
    acc = model.evaluate(Xte, yte)["accuracy"]
    gap = model.evaluate(Xtr, ytr)["accuracy"] - acc
    print(f"{name:<14} {acc:>9.4f} {np.mean(np.abs(w) < 1e-3):>11.1%} {np.abs(w).mean():>9.4f} {gap:>10.4f}")
