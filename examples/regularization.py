"""L1 against L2 on digits: how many weights each drives to (near) zero, and what it costs."""
import numpy as np

import symdl as sd
from _common import epochs

X, y = sd.datasets.digits()
Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=0)
Xtr, Xte = sd.datasets.standardize(Xtr, Xte)
print(f"{'penalty':<12} {'accuracy':>9} {'|w| < 1e-3':>11} {'mean |w|':>9}")
for name, reg in [("none", None), ("l2(1e-3)", sd.l2(1e-3)), ("l1(1e-3)", sd.l1(1e-3))]:
    model = sd.nn.Sequential([sd.nn.Dense(64, activation="relu"), sd.nn.Dense(10)], input_dim=64)
    model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(5e-3), regularizer=reg, backend="cpu", seed=0)
    model.fit(Xtr, ytr, epochs=epochs(40), batch_size=64, verbose=0)
    w = np.concatenate([v.ravel() for k, v in model.get_weights().items() if k.startswith("W")])
    acc = model.evaluate(Xte, yte)["accuracy"]
    print(f"{name:<12} {acc:>9.4f} {np.mean(np.abs(w) < 1e-3):>11.1%} {np.abs(w).mean():>9.4f}")
