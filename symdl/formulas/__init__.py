"""Stage 2, formulas: what a network is made of, each a SymPy formula.

* ``activations``    elementwise and row-wise functions, ``sd.activation`` for new ones (``sd.functions``);
* ``losses``         ``mse``, ``mae``, ``huber``, ``bce_with_logits``, ``softmax_cross_entropy``;
* ``regularizers``   ``l1``, ``l2``;
* ``optimizers``     updates as graph writes: SGD, momentum, Nesterov, Adam, AdamW, RMSProp, Adagrad (``sd.optim``);
* ``normalization``  ``batch_norm``, ``layer_norm``;
* ``dropout``        ``dropout`` and its counter-based uniform hash (``sd.stochastic``).
"""
from . import activations, dropout, losses, normalization, optimizers, regularizers  # noqa: F401
