"""symdl: neural networks whose gradients are derived symbolically and compiled.

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 1)); y = sd.input("y", 1)
>>> loss = sd.losses.mse(x @ W, y)
>>> print(sd.grad(loss, [W])[W])
x.T*(2*(x*W - y)/n)
"""
__version__ = "0.1.0"  # before the submodules: the compile cache keys on it

from . import checkpoint, datasets, functions, losses, nn, optim, train
from .api import value_and_grad
from .compile import compile
from .explain import explain
from .expr import Input, Param, hadamard, input, mean, n, param, total
from .functions import activation, elu, gelu, leaky_relu, log_softmax, relu, sigmoid, silu, softmax, softplus, tanh
from .grad import adjoints, grad
from .printing import latex, text
from .regularizers import l1, l2
from .threads import get_num_threads, set_num_threads

__all__ = [
    "activation", "adjoints", "checkpoint", "compile", "datasets", "elu", "explain", "functions", "gelu", "get_num_threads",
    "grad", "hadamard", "input", "Input", "l1", "l2", "latex", "leaky_relu", "log_softmax", "losses", "mean", "n", "nn",
    "optim", "param", "Param", "relu", "set_num_threads", "sigmoid", "silu", "softmax", "softplus", "tanh", "text",
    "total", "train", "value_and_grad",
]
