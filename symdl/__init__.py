"""symdl: neural networks whose gradients are derived symbolically and compiled.

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 1)); y = sd.input("y", 1)
>>> loss = sd.losses.mse(x @ W, y)
>>> print(sd.grad(loss, [W])[W])
x.T*(2*(x*W - y)/n)

The modules read in pipeline order: ``graph`` (+ ``printing``, ``functions``, ``losses``,
``regularizers``) -> ``autodiff`` (+ ``simplify``, ``explanation``) -> ``optim`` (updates as
graph writes) -> ``ir`` and ``lowering`` -> ``backends`` -> ``pipeline`` (``compile``,
``value_and_grad``) -> ``nn`` (Keras-style models) -> ``distributed`` (Dask).
"""
from .version import __version__  # noqa: F401 - first: the compile cache keys on it

from . import datasets, functions, higher, losses, nn, optim, printing, proofs  # noqa: F401 - printing fills the print rules
from . import distributed  # noqa: F401 - registers fit(cluster=...); imports dask only when used
from .autodiff import adjoints, grad
from .backends.threads import get_num_threads, set_num_threads
from .explanation import explain
from .functions import activation, elu, gelu, leaky_relu, log_softmax, relu, sigmoid, silu, softmax, softplus, tanh
from .graph import Input, Param, hadamard, input, mean, n, param, sum_squares, total
from .conv import avg_pool2d, conv2d, flatten, max_pool2d
from .higher import hessian, hvp, jacobian
from .pipeline import compile, value_and_grad
from .printing import latex, text
from .proofs import check_grad, prove
from .regularizers import l1, l2
from .distributed import sweep

__all__ = [
    "avg_pool2d", "conv2d", "flatten", "max_pool2d", "activation", "adjoints", "check_grad", "compile", "datasets", "elu", "explain", "functions", "gelu", "get_num_threads",
    "grad", "hadamard", "hessian", "higher", "hvp", "input", "Input", "jacobian", "l1", "l2", "latex", "leaky_relu",
    "log_softmax", "losses", "mean", "n", "nn", "optim", "param", "Param", "proofs", "prove", "relu", "set_num_threads", "sigmoid",
    "silu", "softmax", "softplus", "sum_squares", "sweep", "tanh", "text", "total", "value_and_grad",
]
