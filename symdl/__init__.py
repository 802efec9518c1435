"""symdl: neural networks whose gradients are derived symbolically and compiled.

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 1)); y = sd.input("y", 1)
>>> loss = sd.losses.mse(x @ W, y)
>>> print(sd.grad(loss, [W])[W])
x.T*(2*(x*W - y)/n)

The package is folders in pipeline order, each a stage that imports only earlier ones:
``graph`` (SymPy expressions, printing) -> ``formulas`` (activations, losses, optimizers, ...)
-> ``autodiff`` (VJP, JVP, explanations) -> ``ir`` (kernel program, lowering) -> ``ops`` (node
families: conv) -> ``backends`` (numpy, cpu, cuda, onnx) -> ``run`` (``compile``, ``value_and_grad``,
higher order, proofs) -> ``nn`` (Keras-style models) -> ``export`` (ONNX files) and ``show``
(drawings, notebook displays) -> ``distributed`` (Dask) -> ``sklearn``.
"""
from .version import __version__  # noqa: F401 - first: the compile cache keys on it

from . import graph, formulas, autodiff, ir, ops, backends, run, nn  # noqa: F401 - in pipeline order
# Short public names for the modules users reach through ``sd.``: ``sd.optim.Adam``, ``sd.losses.mse``.
from .formulas import activations as functions, dropout as stochastic, losses, normalization, optimizers as optim  # noqa: F401
from .graph import printing  # noqa: F401
from .nn import datasets  # noqa: F401
from .run import higher, pipeline, proofs, validate  # noqa: F401
from . import export, show  # noqa: F401 - show fills registry.DISPLAYS; export imports onnx only when used
from . import distributed  # noqa: F401 - registers fit(cluster=...); imports dask only when used
from .autodiff.vjp import adjoints, grad
from .backends.threads import get_num_threads, set_num_threads
from .autodiff.explain import explain, explain_hvp
from .formulas.activations import activation, elu, gelu, leaky_relu, log_softmax, relu, sigmoid, silu, softmax, softplus, tanh
from .graph.nodes import Input, Param, hadamard, input, mean, n, param, sequence_input, sum_squares, total
from .ops.conv import avg_pool2d, conv2d, flatten, max_pool2d
from .ops.embedding import embedding
from .run.higher import hessian, hvp, jacobian
from .formulas.normalization import batch_norm, layer_norm
from .run.pipeline import compile, value_and_grad
from .graph.printing import latex, text
from .run.proofs import check_grad, prove
from .formulas.regularizers import l1, l2
from .formulas.dropout import dropout
from .distributed import sweep
from .show import draw, plot_model


def export_onnx(outputs, path, **kwargs):
    """Expressions (``{name: expression}``) to an ONNX file: ``symdl.export.onnx.export_onnx`` (needs
    ``symdl[onnx]``; imported on first use)."""
    from .export import onnx as _onnx

    return _onnx.export_onnx(outputs, path, **kwargs)


__all__ = [
    "activation", "adjoints", "avg_pool2d", "batch_norm", "check_grad", "compile", "conv2d", "datasets", "draw", "dropout",
    "elu", "embedding", "explain", "explain_hvp", "export", "export_onnx", "flatten", "functions", "gelu", "get_num_threads", "grad", "hadamard", "hessian", "higher",
    "hvp", "input", "Input", "jacobian", "l1", "l2", "latex", "layer_norm", "leaky_relu", "log_softmax", "losses",
    "max_pool2d", "mean", "n", "nn", "normalization", "optim", "param", "Param", "plot_model", "proofs", "prove", "relu", "sequence_input",
    "set_num_threads", "sigmoid", "silu", "softmax", "softplus", "stochastic", "sum_squares", "sweep", "tanh", "text",
    "total", "value_and_grad",
]
