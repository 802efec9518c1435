"""Two moons: train a small MLP and save its decision boundary as moons.png."""
import sys

import symdl as sd
from _common import epochs
from symdl.nn.plotting import decision_boundary

X, y = sd.datasets.moons(600, noise=0.2, seed=0)
Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=0)
model = sd.nn.Sequential([sd.nn.Dense(32, activation="relu"), sd.nn.Dense(32, activation="relu"), sd.nn.Dense(2)],
                         input_dim=2)
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.01), backend="cpu", seed=0)
model.fit(Xtr, ytr, epochs=epochs(60), batch_size=32, validation_data=(Xte, yte), verbose=0)
print(f"held-out accuracy: {model.evaluate(Xte, yte)['accuracy']:.3f}")
out = sys.argv[1] if len(sys.argv) > 1 else "moons.png"
decision_boundary(model, X, y, out)
print(f"decision boundary saved to {out}")
