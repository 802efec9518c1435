"""Handwritten digits (scikit-learn's copy, no download): >= 97% held-out accuracy in seconds."""
import os
import tempfile

import symdl as sd
from _common import epochs

X, y = sd.datasets.digits()
Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=0)
Xtr, Xte = sd.datasets.standardize(Xtr, Xte)

model = sd.nn.Sequential([sd.nn.Dense(128, activation="relu"), sd.nn.Dense(10)], input_dim=64)
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(1e-2), regularizer=sd.l2(1e-4), backend="cpu")
model.summary()
print(model.formulas())
history = model.fit(Xtr, ytr, epochs=epochs(30), batch_size=64, validation_data=(Xte, yte))
result = model.evaluate(Xte, yte)
print(f"held-out accuracy: {result['accuracy']:.4f}")

with tempfile.TemporaryDirectory() as folder:  # removed afterwards: the example leaves nothing behind
    path = os.path.join(folder, "digits.symdl")
    model.save(path)
    again = sd.nn.load(path)
print(f"saved and reloaded: accuracy {again.evaluate(Xte, yte)['accuracy']:.4f}")
