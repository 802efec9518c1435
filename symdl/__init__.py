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

from . import datasets, functions, higher, losses, nn, normalization, optim, printing, proofs, stochastic  # noqa: F401 - printing fills the print rules
from . import distributed  # noqa: F401 - registers fit(cluster=...); imports dask only when used
from .autodiff import adjoints, grad
from .backends.threads import get_num_threads, set_num_threads
from .explanation import explain, explain_hvp
from .functions import activation, elu, gelu, leaky_relu, log_softmax, relu, sigmoid, silu, softmax, softplus, tanh
from .graph import Input, Param, hadamard, input, mean, n, param, sum_squares, total
from .conv import avg_pool2d, conv2d, flatten, max_pool2d
from .higher import hessian, hvp, jacobian
from .normalization import batch_norm, layer_norm
from .pipeline import compile, value_and_grad
from .printing import latex, text
from .proofs import check_grad, prove
from .regularizers import l1, l2
from .stochastic import dropout
from .distributed import sweep

__all__ = [
    "activation", "adjoints", "avg_pool2d", "batch_norm", "check_grad", "compile", "conv2d", "datasets", "dropout", "elu",
    "explain", "explain_hvp", "flatten", "functions", "gelu", "get_num_threads", "grad", "hadamard", "hessian", "higher",
    "hvp", "input", "Input", "jacobian", "l1", "l2", "latex", "layer_norm", "leaky_relu", "log_softmax", "losses",
    "max_pool2d", "mean", "n", "nn", "normalization", "optim", "param", "Param", "proofs", "prove", "relu",
    "set_num_threads", "sigmoid", "silu", "softmax", "softplus", "stochastic", "sum_squares", "sweep", "tanh", "text",
    "total", "value_and_grad",
]
