"""symdl: neural networks whose gradients are derived symbolically and compiled.

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 1)); y = sd.input("y", 1)
>>> loss = sd.losses.mse(x @ W, y)
>>> print(sd.grad(loss, [W])[W])
x.T*(2*(x*W - y)/n)
"""
from . import losses
from .expr import Input, Param, hadamard, input, mean, n, param, total
from .functions import activation, elu, gelu, leaky_relu, log_softmax, relu, sigmoid, silu, softmax, softplus, tanh
from .grad import adjoints, grad
from .printing import latex, text
from .regularizers import l1, l2

__version__ = "0.1.0"

from . import optim  # noqa: E402
from .api import value_and_grad  # noqa: E402
from .compile import compile  # noqa: E402
from .threads import get_num_threads, set_num_threads  # noqa: E402
from . import functions  # noqa: E402
from .explain import explain  # noqa: E402
from . import checkpoint, datasets, nn, train  # noqa: E402
