"""A new activation is just a formula: define Mish, read its derived derivative, train with it."""
import sympy as sp

import symdl as sd
from _common import epochs

mish = sd.activation("mish", lambda t: t * sp.tanh(sp.log(1 + sp.exp(t))))
print("mish(t)  =", mish.function.formula_body)
print("mish'(t) =", mish.function.derivative_body)

X, y = sd.datasets.spirals(600, seed=0)
model = sd.nn.Sequential([sd.nn.Dense(32, activation=mish), sd.nn.Dense(32, activation=mish), sd.nn.Dense(2)],
                         input_dim=2)
model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.01), backend="cpu", seed=0)
print(model.formulas())
model.fit(X, y, epochs=epochs(80), batch_size=32, verbose=0)
print(f"accuracy on spirals with Mish: {model.evaluate(X, y)['accuracy']:.3f}")
