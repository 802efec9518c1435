"""Which waveform is it? An LSTM classifies generated sequences (sine, square, sawtooth; random
frequency, phase and noise), read one step at a time: 24 steps of one feature each.

The layer is one scan node: ``X W`` for every step in one product, then the cell's formula run over
the steps in one compiled loop per sequence; its gradient is one backward loop (backpropagation
through time) whose local derivatives SymPy derived from the cell's formula. The printed backward
pass shows it as the ``lstm_bptt`` node.
"""
import numpy as np

import symdl as sd
from _common import QUICK, epochs

T = 24
CLASSES = ("sine", "square", "sawtooth")


def waveforms(count, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=count)
    t = np.arange(T)[None, :]
    freq = rng.uniform(0.08, 0.2, size=(count, 1))
    phase = rng.uniform(0, 1, size=(count, 1))
    cycle = (t * freq + phase) % 1.0  # where each step is in its period
    waves = np.stack([np.sin(2 * np.pi * cycle), np.where(cycle < 0.5, 1.0, -1.0), 2 * cycle - 1])
    X = waves[labels, np.arange(count)] + rng.normal(scale=0.2, size=(count, T))
    return X[..., None], labels  # (count, T, 1)


Xtr, ytr = waveforms(300 if QUICK else 1500, seed=0)
Xte, yte = waveforms(300, seed=1)

inputs = sd.nn.Input(shape=(T, 1), name="signal")
h = sd.nn.LSTM(16)(inputs)
outputs = sd.nn.Dense(len(CLASSES))(h)
model = sd.nn.Model(inputs, outputs, name="waveforms")
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(2e-2), backend="cpu", seed=0)
model.summary()
print(model.formulas())
before = model.evaluate(Xtr, ytr)
history = model.fit(Xtr, ytr, epochs=epochs(20, 3), batch_size=32, validation_data=(Xte, yte))
after = model.evaluate(Xtr, ytr)
print(f"training loss: {before['loss']:.4f} before, {after['loss']:.4f} after")
print(f"held-out accuracy: {model.evaluate(Xte, yte)['accuracy']:.4f}")
