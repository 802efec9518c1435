"""Train a small CNN on the 8x8 digits, export it to ONNX, and score the file with ONNX Runtime.

Two files: the forward pass (what a server runs: input ``input_layer`` NHWC with a dynamic batch
axis, output ``dense_1``, logits) and, with ``gradients=True``, the loss and every weight's
gradient, printed from symdl's derived formulas, which a stock ONNX Runtime computes. The weights
also go to a safetensors file. ``--quick`` (or SYMDL_QUICK=1) trains two epochs.

    python examples/export_and_serve.py --quick
"""
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort

import symdl as sd
from _common import QUICK
from symdl.export import export_model
from symdl.nn.weights import load_weights, save_weights, weight_names

quick = QUICK or "--quick" in sys.argv[1:]
X, y = sd.datasets.digits(images=True)  # (1797, 8, 8, 1), NHWC
Xtr, Xte, ytr, yte = sd.datasets.train_test_split(X, y, test_size=0.25, seed=0)
Xte = Xte.astype(np.float32)

model = sd.nn.Sequential([
    sd.nn.Conv2D(16, 3, padding="same", activation="relu"), sd.nn.MaxPooling2D(2),
    sd.nn.Conv2D(32, 3, padding="same", activation="relu"), sd.nn.MaxPooling2D(2),
    sd.nn.Flatten(), sd.nn.Dense(10)], input_shape=(8, 8, 1))
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(3e-3), backend="cpu", seed=0)
model.fit(Xtr, ytr, epochs=2 if quick else 15, batch_size=32, verbose=0)
symdl_accuracy = model.evaluate(Xte, yte)["accuracy"]

options = ort.SessionOptions()
options.intra_op_num_threads = 1
with tempfile.TemporaryDirectory() as folder:  # removed afterwards: the example leaves nothing behind
    served = os.path.join(folder, "digits.onnx")
    export_model(model, served)
    session = ort.InferenceSession(served, options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["dense_1"], {"input_layer": Xte})
    onnx_accuracy = float(np.mean(logits.argmax(1) == yte))
    print(f"symdl accuracy:        {symdl_accuracy:.4f}")
    print(f"ONNX Runtime accuracy: {onnx_accuracy:.4f}   (largest logit difference "
          f"{np.abs(logits - model.predict(Xte)).max():.1e})")

    gradients = os.path.join(folder, "digits_grads.onnx")
    export_model(model, gradients, gradients=True)
    session = ort.InferenceSession(gradients, options, providers=["CPUExecutionProvider"])
    batch, targets = Xte[:32], np.eye(10, dtype=np.float32)[yte[:32]]
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(None, {"input_layer": batch, "target": targets})))
    value, grads = sd.value_and_grad(model.loss, model.params, backend="numpy", dtype="float32")(
        x=batch, y=targets, **model.get_weights())
    names = weight_names(model)  # W6 -> dense_1/kernel
    worst = max(np.abs(results[f"grad/{names[k]}"] - g).max() for k, g in grads.items())
    print(f"loss on a batch: ONNX Runtime {float(results['loss']):.6f}, symdl {value:.6f}; "
          f"largest gradient difference {worst:.1e} over {len(grads)} weights")

    weights = os.path.join(folder, "digits.safetensors")
    save_weights(model, weights)
    again = sd.nn.Sequential([
        sd.nn.Conv2D(16, 3, padding="same", activation="relu"), sd.nn.MaxPooling2D(2),
        sd.nn.Conv2D(32, 3, padding="same", activation="relu"), sd.nn.MaxPooling2D(2),
        sd.nn.Flatten(), sd.nn.Dense(10)], input_shape=(8, 8, 1))
    again.compile(loss="softmax_cross_entropy", backend="numpy")
    load_weights(again, weights)
    print(f"weights reloaded from safetensors: accuracy {again.evaluate(Xte, yte)['accuracy']:.4f}")
