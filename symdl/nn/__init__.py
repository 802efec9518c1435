"""Keras-style models: layers, ``Sequential``, the fit loop, callbacks and checkpoints.

* ``layers``      ``Dense``, ``Conv2D``, ``MaxPooling2D``, ``AveragePooling2D``, ``Flatten``, ``BatchNormalization``,
                  ``LayerNormalization``, ``Dropout``, ``Activation`` (build parameters and an expression; keeps no graph);
* ``model``       ``Sequential``: compile, predict, evaluate, summary, formulas, save; ``load``;
* ``fitting``     the fit loop, ``History``, mini-batches;
* ``callbacks``   ``EarlyStopping``, ``ModelCheckpoint``, ``LearningRateScheduler``, schedules;
* ``checkpoint``  the checkpoint file format (npz + JSON, atomic, no pickle).
"""
from . import callbacks, checkpoint, fitting, layers, model
from .callbacks import (
    Callback, EarlyStopping, LearningRateScheduler, ModelCheckpoint, cosine_decay, exponential_decay, step_decay,
)
from .fitting import History, batches
from .layers import (
    INITIALIZERS, Activation, AveragePooling2D, BatchNormalization, Conv2D, Dense, Dropout, Flatten, LayerNormalization, MaxPooling2D,
)
from .model import Model, Sequential, load

__all__ = [
    "Activation", "AveragePooling2D", "BatchNormalization", "Callback", "Conv2D", "Dense", "Dropout", "Flatten",
    "LayerNormalization", "MaxPooling2D", "EarlyStopping", "History", "INITIALIZERS", "LearningRateScheduler", "Model",
    "ModelCheckpoint", "Sequential", "batches", "callbacks", "checkpoint", "cosine_decay", "exponential_decay",
    "fitting", "layers", "load", "model", "step_decay",
]
