"""XOR: the classic problem a linear model cannot solve, with its gradients printed first."""
import symdl as sd
from _common import epochs

X, y = sd.datasets.xor(400, seed=0)
model = sd.nn.Sequential([sd.nn.Dense(8, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.05), backend="cpu", seed=0)
print(model.formulas())
model.fit(X, y, epochs=epochs(40), batch_size=32, verbose=0)
print(f"accuracy on XOR: {model.evaluate(X, y)['accuracy']:.3f}")
