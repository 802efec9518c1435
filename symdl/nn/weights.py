"""A model's weights in safetensors files: Keras-style names, no pickle, atomic saves.

Each array is stored under a stable Keras-like name: the layer's name, a slash, the weight's
role (``dense_1/kernel``, ``dense_1/bias``, ``conv2d_2/kernel``, ``batch_normalization_3/gamma``,
``batch_normalization_3/moving_mean``, ``batch_normalization_3/moving_variance``), with the
shape the model uses outside its graph (a Dense kernel ``(in, out)``, a Conv2D kernel
``(kh, kw, c_in, c_out)``, vectors ``(k,)``) and the model's dtype; the safetensors header holds
names, shapes and dtypes. Loading checks every name and shape first and raises one error
listing everything missing, extra or mis-shaped, so a failed load changes no weight.

>>> import os, tempfile, numpy as np, symdl as sd
>>> model = sd.nn.Sequential([sd.nn.Dense(3, activation="relu"), sd.nn.Dense(2)], input_dim=4)
>>> model.compile(backend="numpy")
>>> sorted(weight_names(model).values())
['dense_1/bias', 'dense_1/kernel', 'dense_2/bias', 'dense_2/kernel']
>>> folder = tempfile.TemporaryDirectory(); path = os.path.join(folder.name, "w.safetensors")
>>> save_weights(model, path)
>>> other = sd.nn.Sequential([sd.nn.Dense(3, activation="relu"), sd.nn.Dense(2)], input_dim=4)
>>> other.compile(backend="numpy", seed=1)
>>> load_weights(other, path)
>>> bool(np.array_equal(other.get_weights()["W1"], model.get_weights()["W1"]))
True
>>> folder.cleanup()
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..backends import cache

FORMAT = "symdl-weights"
VERSION = "1"

#: The stem of an internal parameter or statistic name (``W3`` -> ``W``) -> its Keras role (a stem
#: not listed is its own role: a new layer's weights are saved before anyone names them here).
ROLES = {"W": "kernel", "K": "kernel", "b": "bias", "gamma": "gamma", "beta": "beta",
         "moving_mean": "moving_mean", "moving_var": "moving_variance"}


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


def _require_weights(model, what: str):
    if getattr(model, "train_step", None) is None:
        raise RuntimeError(f"{what}: the model has no weights yet; call model.compile(...) first")


def weight_names(model, legacy: bool = False) -> dict:
    """``{internal name: Keras-style name}`` for every parameter and running statistic of ``model``
    (internal names are what ``get_weights`` returns: ``W1``, ``b1``, ``K2``, ``moving_mean3``; a
    model used as a layer prefixes its own names with its layer name: ``functional_1/dense_1/kernel``).
    A layer with sublayers names its weights by their paths (``weight_roles``: a ``Bidirectional``'s
    ``bidirectional_1/forward_lstm/kernel``); ``legacy=True`` gives the names files saved before had
    (``bidirectional_1/kernel1_forward``)."""
    names = {}
    stats = [str(s.name) for s in model.writes]
    per_layer = getattr(model, "layer_writes", None) or [None] * len(model.layers)
    for k, (layer, layer_name, params, writes) in enumerate(
            zip(model.layers, model.layer_names, model.layer_params, per_layer), start=1):
        if hasattr(layer, "layer_params"):  # a nested model: its own names, matched in build order
            ours = dict(zip((str(p.name) for p in layer.params), (str(p.name) for p in params)))
            ours.update(zip((str(s.name) for s in layer.writes), (str(s.name) for s in writes or ())))
            names.update({ours[inner]: f"{layer_name}/{keras}"
                          for inner, keras in weight_names(layer, legacy).items()})
            continue
        own = [str(s.name) for s in writes] if writes is not None else \
            [s for s in stats if re.fullmatch(rf"[a-z_]+{k}", s)]
        paths = {} if legacy or not hasattr(layer, "weight_roles") else layer.weight_roles(params)
        for name in [str(p.name) for p in params] + own:
            stem = re.fullmatch(r"(.*?)\d+", name)
            stem = name if stem is None else stem.group(1)
            # a stem ROLES does not know names itself
            names[name] = f"{layer_name}/{paths.get(name) or ROLES.get(stem, stem)}"
    return names


def model_arrays(model) -> dict:
    """``{Keras-style name: the live array}`` (views of the compiled step's buffers)."""
    _require_weights(model, "weights")
    live = {**model.train_step.params, **model.train_step.statistics}
    return {keras: live[internal] for internal, keras in weight_names(model).items()}


def save_weights(model, path) -> None:
    """Write every weight of ``model`` to ``path`` (safetensors), atomically: a save that fails
    leaves the file that was there before untouched."""
    from safetensors.numpy import save

    _require_weights(model, "save_weights")
    arrays = {name: np.ascontiguousarray(a) for name, a in model_arrays(model).items()}
    data = save(arrays, metadata={"format": FORMAT, "version": VERSION})
    cache.save_file(path, lambda f: f.write(data), "save_weights: cannot save")


def read_safetensors(path, what: str = "load_weights") -> dict:
    """``{name: ndarray}`` from a safetensors file, or ``WeightsError`` saying what is wrong."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what}: no file at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{what}: {path} is not a readable safetensors file: {exc}") from exc


def check_arrays(expected: dict, given: dict, where: str) -> None:
    """Raise one ``WeightsError`` listing every missing, extra, mis-shaped or non-float name
    (``expected``: ``{name: shape}``; ``given``: ``{name: array}``)."""
    problems = []
    missing = [f"{k} {tuple(s)}" for k, s in expected.items() if k not in given]
    extra = [f"{k} {tuple(np.shape(v))}" for k, v in given.items() if k not in expected]
    shaped = [f"{k}: {tuple(np.shape(v))}, expected {tuple(expected[k])}" for k, v in given.items()
              if k in expected and tuple(np.shape(v)) != tuple(expected[k])]
    typed = [f"{k}: dtype {np.asarray(v).dtype}" for k, v in given.items()
             if k in expected and np.asarray(v).dtype.kind != "f"]
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if extra:
        problems.append("extra: " + ", ".join(extra))
    if shaped:
        problems.append("wrong shape: " + "; ".join(shaped))
    if typed:
        problems.append("not floating point: " + "; ".join(typed))
    if problems:
        raise WeightsError(f"{where}: the weights do not fit the model ({'; '.join(problems)})")


def assign(model, arrays: dict, where: str) -> None:
    """Check ``{Keras-style name: array}`` against ``model`` (all of it), then copy it in."""
    live = model_arrays(model)
    check_arrays({k: v.shape for k, v in live.items()}, arrays, where)
    for k, v in arrays.items():
        live[k][...] = np.asarray(v, dtype=live[k].dtype)


def _current_names(model, arrays: dict) -> dict:
    """``arrays`` with the names older files used (``weight_names(legacy=True)``) renamed to today's."""
    now = weight_names(model)
    renamed = {old: now[internal] for internal, old in weight_names(model, legacy=True).items() if old != now[internal]}
    return {k if k in now.values() else renamed.get(k, k): v for k, v in arrays.items()}


def load_weights(model, path) -> None:
    """Load a file written by ``save_weights`` (or any safetensors file with the model's names and
    shapes) into ``model``; nothing changes unless every weight fits. Files saved before a layer's
    weights got their Keras paths (a ``Bidirectional``'s ``bidirectional_1/kernel1_forward``, now
    ``bidirectional_1/forward_lstm/kernel``) load too."""
    _require_weights(model, "load_weights")
    assign(model, _current_names(model, read_safetensors(path)), f"load_weights({os.fspath(path)!r})")


__all__ = ["save_weights", "load_weights", "weight_names", "WeightsError"]
