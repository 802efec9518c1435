"""``value_and_grad``: a loss and its gradients as one compiled call on any backend.

>>> import numpy as np, symdl as sd
>>> x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1))
>>> f = sd.value_and_grad(sd.losses.mse(x @ W, y), [W], backend="numpy")
>>> value, grads = f(x=np.eye(2), y=np.ones((2, 1)), W=np.zeros((2, 1)))
>>> value, grads["W"].ravel().tolist()
(1.0, [-1.0, -1.0])
"""
from __future__ import annotations

import numpy as np

from . import backends
from .backends.runtime import as_dtype
from .grad import grad
from .lower import lower_program
from .validate import check_arrays


class ValueAndGrad:
    """Callable ``f(**arrays) -> (loss: float, {param name: gradient ndarray})``."""

    def __init__(self, loss, params, backend="numpy", dtype="float64"):
        self.params = list(params)
        self.dtype = as_dtype(dtype)
        self.gradients = grad(loss, self.params)
        outputs = {"loss": loss}
        outputs.update({f"grad_{p.name}": g for p, g in self.gradients.items()})
        self.program = lower_program(outputs)
        self.backend = backend
        self.runner = backends.get(backend).compile_program(self.program, self.dtype)

    @property
    def source(self) -> str:
        """The generated module (readable Python)."""
        return self.runner.source

    def __call__(self, **arrays):
        arrays, n = check_arrays(arrays, self.program.inputs, self.program.params, self.dtype)
        bufs = self.runner.run(arrays, {}, n)
        value = float(np.asarray(bufs["loss"]).reshape(-1)[0])
        grads = {str(p.name): np.array(bufs[f"grad_{p.name}"]).reshape(p.value_shape) for p in self.params}
        return value, grads


def value_and_grad(loss, params, *, backend: str = "numpy", dtype: str = "float64") -> ValueAndGrad:
    """Compile ``loss`` and ``∂loss/∂param`` for every param into one call.

    Arrays are passed by name; a vector parameter's gradient has its ``(k,)`` shape.
    """
    return ValueAndGrad(loss, params, backend=backend, dtype=dtype)
