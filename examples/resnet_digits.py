"""A small residual CNN on the 8x8 digits images (scikit-learn's copy, no download), built with the
functional API: conv -> two residual blocks (conv-BN-ReLU-conv-BN, + the block's input, ReLU) ->
global average pooling -> dense 10.

Each skip connection is a tensor used twice, so its δ is a sum, one term per branch: in the
printed backward pass the δ of a block's input adds the δ through the block's convolutions
(col2im(δ*K.T)) to the δ that skipped them, and the "Fan-out" section names the first block's input
and prints that sum one term per branch.
"""
import os
import tempfile

import symdl as sd
from _common import epochs

X, y = sd.datasets.digits(images=True)  # (1797, 8, 8, 1), NHWC
Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=0)
Xtr, Xte = Xtr / 16.0, Xte / 16.0


def residual_block(h, filters):
    r = sd.nn.Conv2D(filters, 3, padding="same", use_bias=False)(h)
    r = sd.nn.Activation("relu")(sd.nn.BatchNormalization(momentum=0.9)(r))
    r = sd.nn.BatchNormalization(momentum=0.9)(sd.nn.Conv2D(filters, 3, padding="same", use_bias=False)(r))
    return sd.nn.Activation("relu")(sd.nn.Add()([h, r]))  # the skip connection (momentum 0.9: quick runs too)


inputs = sd.nn.Input(shape=(8, 8, 1), name="digit")
h = sd.nn.Conv2D(8, 3, padding="same", activation="relu")(inputs)
for _ in range(2):
    h = residual_block(h, 8)
outputs = sd.nn.Dense(10)(sd.nn.GlobalAveragePooling2D()(h))
model = sd.nn.Model(inputs, outputs, name="resnet_digits")
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(1e-2), backend="cpu", seed=0)
model.summary()
print(model.formulas())
model.fit(Xtr, ytr, epochs=epochs(15), batch_size=32, validation_data=(Xte, yte))
result = model.evaluate(Xte, yte)
print(f"held-out accuracy: {result['accuracy']:.4f}")

with tempfile.TemporaryDirectory() as folder:  # removed afterwards: the example leaves nothing behind
    path = os.path.join(folder, "resnet_digits.symdl")
    model.save(path)
    again = sd.nn.load(path)
print(f"saved and reloaded: accuracy {again.evaluate(Xte, yte)['accuracy']:.4f}")
