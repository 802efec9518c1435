"""A small CNN on the 8x8 digits images (scikit-learn's copy, no download), with its conv formulas.

conv 3x3x16 (same) -> max-pool 2 -> conv 3x3x32 (same) -> max-pool 2 -> flatten -> dense 10.
The backward pass prints in textbook form: patches(A).T*δ is the correlation of the layer
input with δ (∂L/∂K), col2im(δ*K.T) the "full" correlation of δ with the flipped kernel (the
input gradient), route_max sends each window's gradient to its first arg-max.
"""
import os
import tempfile

import symdl as sd
from _common import epochs

X, y = sd.datasets.digits(images=True)  # (1797, 8, 8, 1), NHWC
Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=0)

model = sd.nn.Sequential([
    sd.nn.Conv2D(16, 3, padding="same", activation="relu"), sd.nn.MaxPooling2D(2),
    sd.nn.Conv2D(32, 3, padding="same", activation="relu"), sd.nn.MaxPooling2D(2),
    sd.nn.Flatten(), sd.nn.Dense(10)], input_shape=(8, 8, 1))
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(3e-3), backend="cpu", seed=0)
model.summary()
print(model.formulas())
model.fit(Xtr, ytr, epochs=epochs(25), batch_size=32, validation_data=(Xte, yte))
result = model.evaluate(Xte, yte)
print(f"held-out accuracy: {result['accuracy']:.4f}")

with tempfile.TemporaryDirectory() as folder:  # removed afterwards: the example leaves nothing behind
    path = os.path.join(folder, "digits_cnn.symdl")
    model.save(path)
    again = sd.nn.load(path)
print(f"saved and reloaded: accuracy {again.evaluate(Xte, yte)['accuracy']:.4f}")
