"""Regression: fit y = sin(x) with mse, and compare the fit on a grid."""
import numpy as np

import symdl as sd
from _common import epochs

X, y = sd.datasets.sine(800, noise=0.05, seed=0)
model = sd.nn.Sequential([sd.nn.Dense(32, activation="tanh"), sd.nn.Dense(32, activation="tanh"), sd.nn.Dense(1)],
                         input_dim=1)
model.compile(loss="mse", optimizer=sd.optim.Adam(0.01), backend="cpu", seed=0)
model.fit(X, y, epochs=epochs(150), batch_size=64, validation_split=0.2, verbose=0)
grid = np.linspace(-np.pi, np.pi, 9).reshape(-1, 1)
pred = model.predict(grid)
for g, p in zip(grid[:, 0], pred[:, 0]):
    print(f"x={g:+.2f}  sin(x)={np.sin(g):+.3f}  model={p:+.3f}")
print(f"max error on the grid: {np.abs(pred[:, 0] - np.sin(grid[:, 0])).max():.3f}")
