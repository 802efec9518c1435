"""MNIST from IDX files (the original format), when you have them.

    python examples/mnist_idx.py train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
                                 t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

symdl never downloads anything. Get the four files from the MNIST distribution you
trust (plain or .gz both work) and pass their paths. Without arguments this script
says so and exits.
"""
import sys

import symdl as sd
from _common import epochs

if len(sys.argv) != 5:
    print(__doc__)
    sys.exit(0)
train_x, train_y, test_x, test_y = (sd.datasets.load_idx(p) for p in sys.argv[1:])
Xtr = train_x.reshape(len(train_x), -1) / 255.0
Xte = test_x.reshape(len(test_x), -1) / 255.0
model = sd.nn.Sequential([sd.nn.Dense(256, activation="relu"), sd.nn.Dense(256, activation="relu"), sd.nn.Dense(10)],
                         input_dim=Xtr.shape[1])
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(1e-3), backend="cpu")
model.fit(Xtr, train_y, epochs=epochs(5, 1), batch_size=128, validation_data=(Xte, test_y))
print(f"test accuracy: {model.evaluate(Xte, test_y)['accuracy']:.4f}")
