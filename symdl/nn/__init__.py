"""Keras-style models: layers, ``Sequential``, the fit loop, callbacks and checkpoints.

* ``layers``      ``Dense``, ``Conv2D``, ``MaxPooling2D``, ``AveragePooling2D``, ``Flatten``, ``BatchNormalization``,
                  ``LayerNormalization``, ``Dropout``, ``Activation``, ``Reshape``,
                  ``ZeroPadding2D``, ``Embedding``, ``TokenAndPositionEmbedding`` (build parameters and an
                  expression; keeps no graph);
* ``attention``   ``MultiHeadAttention`` (products within each sequence, causal mask);
* ``functional``  ``Input``, symbolic tensors, layers called on them (Keras 3's functional API);
* ``merging``     ``Add``, ``Subtract``, ``Multiply``, ``Average``, ``Maximum``, ``Minimum``, ``Concatenate``,
                  ``GlobalAveragePooling2D``, ``GlobalMaxPooling2D``;
* ``model``       ``Model`` (functional) and ``Sequential``: compile, predict, evaluate, summary, formulas, save;
                  ``load``;
* ``fitting``     the fit loop, ``History``, mini-batches;
* ``callbacks``   ``EarlyStopping``, ``ModelCheckpoint``, ``LearningRateScheduler``, schedules;
* ``checkpoint``  the checkpoint file format (npz + JSON, atomic, no pickle).
"""
from . import attention, callbacks, checkpoint, fitting, functional, layers, merging, model
from .attention import MultiHeadAttention
from .callbacks import (
    Callback, EarlyStopping, LearningRateScheduler, ModelCheckpoint, cosine_decay, exponential_decay, step_decay,
)
from .fitting import History, batches
from .layers import (
    INITIALIZERS, Activation, AveragePooling2D, BatchNormalization, Conv2D, Dense, Dropout, Embedding, Flatten, LayerNormalization,
    MaxPooling2D, Reshape, TokenAndPositionEmbedding, ZeroPadding2D,
)
from .functional import Input
from .merging import (
    Add, Average, Concatenate, GlobalAveragePooling2D, GlobalMaxPooling2D, Maximum, Minimum, Multiply, Subtract,
)
from .model import Model, Sequential, load

__all__ = [
    "Add", "Average", "Concatenate", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Input", "Maximum", "Minimum",
    "Multiply", "Subtract", "functional", "merging",
    "Activation", "AveragePooling2D", "BatchNormalization", "Callback", "Conv2D", "Dense", "Dropout", "Flatten",
    "LayerNormalization", "MaxPooling2D", "Reshape", "ZeroPadding2D", "EarlyStopping", "History", "INITIALIZERS", "LearningRateScheduler", "Model",
    "ModelCheckpoint", "Sequential", "batches", "callbacks", "checkpoint", "cosine_decay", "exponential_decay",
    "fitting", "layers", "load", "model", "step_decay", "Embedding", "TokenAndPositionEmbedding",
    "MultiHeadAttention",
]

# Logging, curves, and weights in and out (files of their own: see each module).
from . import curves, logging, torch_weights, weights  # noqa: E402
from .curves import PlotLosses  # noqa: E402
from .logging import CSVLogger, TensorBoard  # noqa: E402
from .torch_weights import load_torch_weights, to_torch_state_dict  # noqa: E402
from .weights import load_weights, save_weights  # noqa: E402

__all__ += ["CSVLogger", "PlotLosses", "TensorBoard", "curves", "load_torch_weights", "load_weights", "logging",
            "save_weights", "to_torch_state_dict", "torch_weights", "weights"]

# Recurrent layers (issue 28): one scan node per layer (ops.recurrence).
from . import recurrent  # noqa: E402
from .recurrent import GRU, LSTM, Bidirectional, SimpleRNN  # noqa: E402

__all__ += ["Bidirectional", "GRU", "LSTM", "SimpleRNN", "recurrent"]
