"""PyTorch weights in and out: a state dict (or a safetensors file of one) mapped onto a symdl
model of the same architecture, and back.

Layouts and conventions (PyTorch -> symdl, which holds Keras 3's layouts):

* ``nn.Linear``: ``weight (out, in)`` is the Dense kernel transposed; ``bias`` is the bias. A
  Linear right after a flatten of images reads PyTorch's NCHW order ``(c, h, w)``; symdl (and
  Keras) flatten NHWC ``(h, w, c)``: its columns are reordered (``torch_flatten=True``).
* ``nn.Conv2d``: ``weight (out, in, kh, kw)`` (OIHW) -> ``(kh, kw, in, out)`` (HWIO).
* ``nn.BatchNorm1d/2d``: ``weight, bias, running_mean, running_var`` -> ``gamma, beta,
  moving_mean, moving_variance``; ``num_batches_tracked`` has no counterpart. Both store the
  *unbiased* batch variance in the running variance and normalise a batch with the biased one.
  PyTorch's ``eps`` defaults to 1e-5, Keras's ``epsilon`` to 1e-3: build
  ``BatchNormalization(epsilon=1e-5)`` to match a PyTorch model. Momentum conventions are
  inverse: PyTorch ``momentum=m`` is Keras ``momentum=1 - m`` (0.1 <-> 0.9).
* ``nn.LayerNorm``: ``weight, bias`` -> ``gamma, beta`` (eps as above).
* ``nn.Embedding``: ``weight (num_embeddings, embedding_dim)`` is ``Embedding``'s ``embeddings``
  as it is (no transpose).
* ``TokenAndPositionEmbedding`` (keras-hub's: a token embedding plus a learned position
  embedding) is two ``nn.Embedding``: a module with the children ``token_embedding`` and
  ``position_embedding`` (keras-hub's names: ``<prefix>.token_embedding.weight (V, d)``,
  ``<prefix>.position_embedding.weight (T, d)``), or two sibling modules in that order (GPT-2's
  ``wte``, ``wpe``; with ``mapping``, name both for the layer, tokens first). PyTorch adds the
  positions ``arange(T)``, as symdl does.
* ``nn.MultiheadAttention`` -> ``MultiHeadAttention(num_heads=H, key_dim=E // H)``:
  ``in_proj_weight (3E, E)`` is ``[Wq; Wk; Wv]`` (rows) and ``query_kernel = Wqᵀ``,
  ``key_kernel = Wkᵀ``, ``value_kernel = Wvᵀ`` (each ``(E, E)``); ``in_proj_bias (3E,)`` is
  ``[query_bias, key_bias, value_bias]``; ``out_proj.weight`` is ``output_kernel`` transposed,
  ``out_proj.bias`` ``output_bias``. With ``kdim``/``vdim`` other than ``E`` PyTorch stores
  ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` instead of ``in_proj_weight`` (each the
  transpose of its kernel). Both split a projection's ``E`` columns into heads contiguously
  (head ``h``: columns ``h·E/H .. (h+1)·E/H``) and scale scores by ``1/√(E/H)``, so nothing is
  permuted. ``add_bias_kv``'s ``bias_k``/``bias_v`` have no counterpart (an error).
* ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (``batch_first`` changes no weight) ->
  ``SimpleRNN`` / ``LSTM`` / ``GRU`` (``k`` = 1, 4, 3 gate blocks of ``u`` units):
  ``weight_ih_l0 (k·u, f)`` is the ``kernel (f, k·u)`` transposed, ``weight_hh_l0 (k·u, u)`` the
  ``recurrent_kernel (u, k·u)`` transposed. LSTM gates ``i, f, g, o`` are Keras's ``i, f, c, o``;
  GRU gates ``r, z, n`` are Keras's ``z, r, h`` with the first two blocks swapped (in kernels and
  biases). The RNN's and LSTM's ``bias_ih_l0`` and ``bias_hh_l0`` are added in every step: symdl's
  ``bias (k·u,)`` is their sum (saved as ``bias_ih = bias``, ``bias_hh = 0``); the GRU's
  ``bias_hh`` sits inside the reset gate's product, ``r ⊙ (h W_hn + b_hn)``, as in Keras's
  ``GRU(reset_after=True)``, whose ``bias (2, 3·u)`` rows are ``bias_ih`` and ``bias_hh``.
  ``bidirectional=True``: the ``_reverse`` parameters are the backward layer of
  ``Bidirectional(layer, merge_mode="concat")`` (PyTorch's final states ``h_n`` are Keras's
  ``return_sequences=False``; PyTorch's ``out[:, -1]`` holds the backward layer's first step).
  The activations match by default (``tanh``, ``sigmoid`` gates; ``nn.RNN(nonlinearity="relu")``
  is ``SimpleRNN(activation="relu")``). ``num_layers > 1``: one symdl layer per PyTorch layer (the
  module ``rnn``'s ``weight_ih_l1``... are the module ``rnn[l1]`` in a ``mapping``; on export, recurrent
  layers given the same prefix are stacked). ``proj_size`` (``weight_hr_l0``) has no counterpart.

By default the PyTorch modules with weights (the key prefixes before ``.weight``..., in state
dict order) are matched in order with symdl's layers that have weights; ``mapping`` ``{torch
module: symdl layer name}`` matches them by name instead. Any mismatch raises one error listing
every unmatched or mis-shaped name with its shape, and nothing is loaded. A safetensors file keeps
its keys sorted by name, not in module order: numbered modules (``nn.Sequential``'s ``0``, ``2``,
``10``) are put back in order; give ``mapping`` for named ones.

>>> import numpy as np, symdl as sd
>>> model = sd.nn.Sequential([sd.nn.Dense(3)], input_dim=2)
>>> model.compile(backend="numpy")
>>> load_torch_weights(model, {"fc.weight": np.arange(6.0).reshape(3, 2), "fc.bias": np.ones(3)})
>>> model.get_weights()["W1"].tolist()
[[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]
>>> sorted(to_torch_state_dict(model))
['dense_1.bias', 'dense_1.weight']
>>> tokens = sd.nn.Sequential([sd.nn.Input(shape=(3,), dtype="int32"), sd.nn.Embedding(4, 2)])
>>> tokens.compile(backend="numpy")
>>> load_torch_weights(tokens, {"emb.weight": np.arange(8.0).reshape(4, 2)})  # nn.Embedding(4, 2): as it is
>>> tokens.predict(np.array([[3, 0, 1]]))[0].tolist()
[[6.0, 7.0], [0.0, 1.0], [2.0, 3.0]]
>>> gru = sd.nn.Sequential([sd.nn.GRU(1)], input_shape=(2, 1))  # nn.GRU(1, 1): gates r, z, n
>>> gru.compile(loss="mse", backend="numpy")
>>> load_torch_weights(gru, {"gru.weight_ih_l0": np.array([[1.0], [2.0], [3.0]]),
...                          "gru.weight_hh_l0": np.array([[4.0], [5.0], [6.0]]),
...                          "gru.bias_ih_l0": np.array([1.0, 2.0, 3.0]), "gru.bias_hh_l0": np.array([4.0, 5.0, 6.0])})
>>> {k: v.tolist() for k, v in gru.get_weights().items()}  # Keras's z, r, h; the bias rows: input, recurrent
{'kernel1': [[2.0, 1.0, 3.0]], 'recurrent_kernel1': [[5.0, 4.0, 6.0]], 'bias1': [[2.0, 1.0, 3.0], [5.0, 4.0, 6.0]]}
"""
from __future__ import annotations

import os
import re
from typing import Callable, NamedTuple

import numpy as np

from .attention import MultiHeadAttention
from .layers import (BatchNormalization, Conv2D, Dense, Embedding, Flatten, LayerNormalization,
                     TokenAndPositionEmbedding)
from .recurrent import GRU, LSTM, Bidirectional, SimpleRNN
from .weights import WeightsError, assign, model_arrays, read_safetensors, weight_names

#: symdl role -> PyTorch parameter name, per layer class (a name with a dot lives in a child module).
ROLES = {
    Dense: {"kernel": "weight", "bias": "bias"},
    Conv2D: {"kernel": "weight", "bias": "bias"},
    BatchNormalization: {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                         "moving_variance": "running_var"},
    LayerNormalization: {"gamma": "weight", "beta": "bias"},
    Embedding: {"embeddings": "weight"},
    TokenAndPositionEmbedding: {"embeddings": "token_embedding.weight",
                                "position_embeddings": "position_embedding.weight"},
}
IGNORED = ("num_batches_tracked",)  # PyTorch's batch counter: symdl keeps its own step count
#: ``nn.MultiheadAttention``'s parameters (``in_proj_weight`` packs the query, key and value rows;
#: ``q_proj_weight``... when the key or value width differs from the query's).
MHA_PACKED = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
MHA_SPLIT = ("q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
#: Child modules that belong to their parent's parameters: an attention module's ``out_proj`` (when
#: the parent holds the input projections), the two ``nn.Embedding`` of a token-and-position embedding.
CHILDREN = {"out_proj": ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
            "token_embedding": None, "position_embedding": None}
#: ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: for each of symdl's (Keras's) gate blocks, the PyTorch block
#: that holds it (LSTM ``i, f, g, o`` as Keras's ``i, f, c, o``; GRU ``r, z, n`` for Keras's ``z, r, h``).
GATES = {SimpleRNN: (0,), LSTM: (0, 1, 2, 3), GRU: (1, 0, 2)}
#: ``Bidirectional``'s two layers: PyTorch's suffix for each (``weight_ih_l0_reverse``: the backward one).
DIRECTIONS = {"forward": "", "backward": "_reverse"}


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _natural(key: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def read_state_dict(source) -> dict:
    """``{key: ndarray}`` from a state dict (tensors or arrays), a module (``.state_dict()``), or
    the path of a safetensors file."""
    if isinstance(source, (str, os.PathLike)):
        # a safetensors file keeps its keys sorted as text ("10.weight" before "2.weight"): numbered
        # modules (an ``nn.Sequential``'s) are put back in their order; named ones need ``mapping``
        state = read_safetensors(source, "load_torch_weights")
        return {k: state[k] for k in sorted(state, key=_natural)}
    if hasattr(source, "state_dict") and callable(source.state_dict):
        source = source.state_dict()
    if not hasattr(source, "items"):
        raise TypeError(f"load_torch_weights: give a state dict, a torch module or a safetensors path, "
                        f"got {type(source).__name__}")
    return {str(k): _as_numpy(v) for k, v in source.items()}


class Stacked(str):
    """Layer ``k`` of a stacked PyTorch recurrent module (``num_layers > 1``), named ``rnn[l1]``:
    its parameters are ``rnn.weight_ih_l1``..., held as ``weight_ih_l0``... (one symdl layer)."""

    def __new__(cls, prefix: str, k: int):
        self = super().__new__(cls, f"{prefix}[l{k}]")
        self.module, self.k = prefix, k
        return self


#: A recurrent module's parameter: its name, layer and direction (``weight_ih_l1_reverse``).
RECURRENT_PARAM = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?")


def _key(prefix, leaf: str) -> str:
    """The state dict key of parameter ``leaf`` of the module at ``prefix`` (a pair: two embeddings;
    ``Stacked``: one layer of a stacked recurrent module)."""
    if isinstance(prefix, tuple):
        child, _, leaf = leaf.partition(".")
        prefix = prefix[child == "position_embedding"]
    if isinstance(prefix, Stacked) and RECURRENT_PARAM.fullmatch(leaf):
        prefix, leaf = prefix.module, re.sub(r"_l0(?=_|$)", f"_l{prefix.k}", leaf)
    return f"{prefix}.{leaf}" if prefix else leaf


def _split_stacked(modules: dict) -> dict:
    """A recurrent module with ``num_layers > 1`` (``weight_ih_l1``...) as one module per layer
    (``rnn[l0]``, ``rnn[l1]``...: one symdl layer each), in layer order."""
    out = {}
    for prefix, params in modules.items():
        found = [RECURRENT_PARAM.fullmatch(leaf) for leaf in params]
        layers = sorted({int(m.group(2)) for m in found if m})
        if not layers or not all(found) or layers[-1] == 0:
            out[prefix] = params
            continue
        for k in layers:
            out[Stacked(prefix, k)] = {f"{m.group(1)}_l0{m.group(3) or ''}": v for m, v in zip(found, params.values())
                                       if int(m.group(2)) == k}
    return out


def _modules(state: dict) -> dict:
    """``{module prefix: {parameter name: array}}`` in state dict order (ignored entries dropped).
    An attention module's ``out_proj`` is part of it (``out_proj.weight``), and a module whose
    children are ``token_embedding`` and ``position_embedding`` (keras-hub's names) is one module
    (at the place of its first entry)."""
    grouped = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf not in IGNORED:
            grouped.setdefault(prefix, {})[leaf] = value
    modules = {}
    for prefix, params in grouped.items():
        parent, _, child = prefix.rpartition(".")
        owner = CHILDREN.get(child, ())
        both = all(_key(parent, c) in grouped for c in ("token_embedding", "position_embedding"))
        if (owner is None and both) or (owner and any(k in grouped.get(parent, {}) for k in owner)):
            modules.setdefault(parent, {}).update({f"{child}.{leaf}": v for leaf, v in params.items()})
        else:
            modules.setdefault(prefix, {}).update(params)
    return _split_stacked(modules)


def _leaf_layers(model):
    """``(path, layer)`` of every layer that is not itself a model, in order (a nested model's
    layers at ``its name/their name``)."""
    for layer, name in zip(model.layers, model.layer_names):
        if hasattr(layer, "layer_params"):
            yield from ((f"{name}/{path}", inner) for path, inner in _leaf_layers(layer))
        else:
            yield name, layer


def _layers(model) -> list:
    """``[(layer path, layer, {role: Keras-style weight name})]`` for the layers with weights, in order."""
    leaves = list(_leaf_layers(model))
    paths = {path for path, _ in leaves}
    by_layer = {}
    for keras in weight_names(model).values():
        path, _, role = keras.rpartition("/")
        while path not in paths and "/" in path:  # a sublayer's weight: bidirectional_1/forward_lstm/kernel
            path, _, inner = path.rpartition("/")
            role = f"{inner}/{role}"
        by_layer.setdefault(path, {})[role] = keras
    return [(path, layer, by_layer[path]) for path, layer in leaves if path in by_layer]


def _flattened_image(model, layer):
    """``(H, W, C)`` when ``layer``'s input is a ``Flatten`` of images, else None (nested models searched)."""
    for t in model.calls:
        if t.layer is layer:
            source = t.inputs[0] if t.inputs else None
            if source is not None and isinstance(source.layer, Flatten):
                return tuple(source.inputs[0].shape)
            return None
    for inner in model.layers:
        if hasattr(inner, "calls") and inner is not model:
            found = _flattened_image(inner, layer)
            if found is not None:
                return found
    return None


def _nchw_to_nhwc_columns(kernel_in_out: np.ndarray, image) -> np.ndarray:
    """A Dense kernel ``(H·W·C, out)`` whose rows are in PyTorch's ``(c, h, w)`` order, reordered
    to symdl's ``(h, w, c)``."""
    H, W, C = image
    out = kernel_in_out.shape[1]
    return kernel_in_out.reshape(C, H, W, out).transpose(1, 2, 0, 3).reshape(H * W * C, out)


def _nhwc_to_nchw_columns(kernel_in_out: np.ndarray, image) -> np.ndarray:
    H, W, C = image
    out = kernel_in_out.shape[1]
    return kernel_in_out.reshape(H, W, C, out).transpose(2, 0, 1, 3).reshape(C * H * W, out)


def from_torch(layer, role: str, value: np.ndarray, image=None) -> np.ndarray:
    """One PyTorch array in the symdl layout of ``layer``'s weight ``role``."""
    if role == "kernel" and isinstance(layer, Conv2D):
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    if role.endswith("kernel") and value.ndim == 2:
        kernel = value.T
        return _nchw_to_nhwc_columns(kernel, image) if image is not None else kernel
    return value


def to_torch(layer, role: str, value: np.ndarray, image=None) -> np.ndarray:
    """``from_torch``'s inverse."""
    if role == "kernel" and isinstance(layer, Conv2D):
        return value.transpose(3, 2, 0, 1)
    if role.endswith("kernel"):
        return (_nhwc_to_nchw_columns(value, image) if image is not None else value).T
    return value


class Entry(NamedTuple):
    """One PyTorch parameter of a layer: its PyTorch shape, the symdl weights it fills (``names``,
    ``shapes``), and the conversions both ways. Loading adds up what the entries give one symdl
    weight (a recurrent layer's ``bias_ih`` and ``bias_hh`` are both parts of its ``bias``)."""
    shape: tuple
    names: list
    shapes: list
    load: Callable  # PyTorch array -> {Keras-style name: array (its part of the weight)}
    save: Callable  # {Keras-style name: array} -> PyTorch array


def _entries(layer, roles: dict, live: dict, image=None, present=()) -> dict:
    """``{PyTorch parameter name: Entry}`` of one symdl layer (``present``: the names the state
    dict has, to choose between ``nn.MultiheadAttention``'s packed and separate projections)."""
    if isinstance(layer, MultiHeadAttention):
        return _attention_entries(roles, live, present)
    if isinstance(layer, (Bidirectional, *GATES)):
        return _recurrent_entries(layer, roles, live)
    names = ROLES.get(type(layer))
    if names is None:
        return None
    entries = {}
    for role, keras in roles.items():
        shape = tuple(live[keras].shape)
        torch_shape = to_torch_shape(layer, shape) if role == "kernel" else shape
        entries[names[role]] = Entry(
            torch_shape, [keras], [shape],
            lambda v, role=role, keras=keras: {keras: from_torch(layer, role, v, image)},
            lambda w, role=role, keras=keras: to_torch(layer, role, w[keras], image))
    return entries


def _attention_entries(roles: dict, live: dict, present) -> dict:
    """``nn.MultiheadAttention`` <-> ``MultiHeadAttention``: ``in_proj_weight`` is ``[Wq; Wk; Wv]``
    (rows), each the transpose of a symdl kernel (``query_kernel = Wqᵀ``); ``in_proj_bias`` is
    ``[bq, bk, bv]``; ``out_proj`` is a Linear (``output_kernel = out_proj.weightᵀ``). Both split a
    projection's columns into heads contiguously and scale the scores by ``1/√head_dim``."""
    kernels = [roles[f"{s}_kernel"] for s in ("query", "key", "value")]
    entries = {}

    def rows(names, transpose):
        parts = [live[k].T if transpose else live[k] for k in names]
        sizes = [p.shape[0] for p in parts]
        shape = (sum(sizes),) + tuple(parts[0].shape[1:])
        bounds = np.cumsum([0] + sizes)

        def load(v):
            return {k: (v[a:b].T if transpose else v[a:b]) for k, a, b in zip(names, bounds[:-1], bounds[1:])}

        def save(w):
            return np.concatenate([w[k].T if transpose else w[k] for k in names])

        return Entry(shape, list(names), [tuple(live[k].shape) for k in names], load, save)

    same_input = len({live[k].shape[0] for k in kernels}) == 1
    if "in_proj_weight" in present or ("q_proj_weight" not in present and same_input):
        entries["in_proj_weight"] = rows(kernels, True)
    else:
        for letter, keras in zip("qkv", kernels):
            entries[f"{letter}_proj_weight"] = rows([keras], True)
    if "query_bias" in roles:
        entries["in_proj_bias"] = rows([roles[f"{s}_bias"] for s in ("query", "key", "value")], False)
    entries["out_proj.weight"] = rows([roles["output_kernel"]], True)
    if "output_bias" in roles:
        entries["out_proj.bias"] = rows([roles["output_bias"]], False)
    return entries


def _recurrent_entries(layer, roles: dict, live: dict) -> dict:
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (one layer) <-> ``SimpleRNN`` / ``LSTM`` / ``GRU``, or with
    ``bidirectional=True`` ``Bidirectional`` (its backward layer: the ``_reverse`` parameters).
    ``weight_ih_l0 (k·u, f)`` is the ``kernel`` transposed and ``weight_hh_l0 (k·u, u)`` the
    ``recurrent_kernel`` transposed, their gate blocks in PyTorch's order (``GATES``). PyTorch adds two
    biases; symdl's LSTM and SimpleRNN hold their sum (saved as ``bias_ih = bias``, ``bias_hh = 0``),
    the GRU both, as the rows of its ``(2, 3·u)`` bias (``bias_hh`` inside the reset gate's product,
    ``reset_after=True``: PyTorch's form)."""
    cell = layer.layer if isinstance(layer, Bidirectional) else layer
    order = next(blocks for kind, blocks in GATES.items() if isinstance(cell, kind))
    back = np.argsort(order)
    u = cell.units

    def gates(a, blocks):  # the gate blocks of the last axis, in the order ``blocks``
        return np.concatenate([a[..., g * u:(g + 1) * u] for g in blocks], axis=-1)

    def entry(keras, transpose=False, row=None):
        """The PyTorch parameter holding ``keras`` (a kernel: ``transpose``), or its row ``row`` (a GRU bias)."""
        shape = tuple(live[keras].shape)
        torch_shape = shape[::-1] if transpose else shape[-1:]

        def load(v):
            v = gates(v.T if transpose else v, order)
            if row is None:
                return {keras: v}
            part = np.zeros(shape, v.dtype)
            part[row] = v
            return {keras: part}

        def save(w):
            a = gates(w[keras] if row is None else w[keras][row], back)
            return a.T if transpose else a

        return Entry(torch_shape, [keras], [shape], load, save)

    def hh_bias(keras):  # LSTM, SimpleRNN: ``bias_hh`` adds to the bias; saved as zeros
        e = entry(keras)
        return e._replace(save=lambda w: np.zeros_like(e.save(w)))

    entries = {}
    by_direction = {}
    for role, keras in roles.items():
        # a Bidirectional's roles are its sublayers' paths: forward_lstm/kernel, backward_lstm/bias
        direction, base = re.fullmatch(r"(?:(forward|backward)_[^/]*/)?([a-z_]+)", role).groups()
        by_direction.setdefault(direction or "forward", {})[base] = keras
    for direction, names in by_direction.items():
        sfx = DIRECTIONS[direction]
        entries[f"weight_ih_l0{sfx}"] = entry(names["kernel"], transpose=True)
        entries[f"weight_hh_l0{sfx}"] = entry(names["recurrent_kernel"], transpose=True)
        if "bias" in names:
            if isinstance(cell, GRU):
                entries[f"bias_ih_l0{sfx}"] = entry(names["bias"], row=0)
                entries[f"bias_hh_l0{sfx}"] = entry(names["bias"], row=1)
            else:
                entries[f"bias_ih_l0{sfx}"] = entry(names["bias"])
                entries[f"bias_hh_l0{sfx}"] = hh_bias(names["bias"])
    return entries


def _two_embeddings(layer, first: dict, second: dict) -> bool:
    """Whether ``layer`` (a token-and-position embedding) takes two separate ``nn.Embedding``
    modules (GPT-2's ``wte`` and ``wpe``): tokens first, then positions."""
    return isinstance(layer, TokenAndPositionEmbedding) and set(first) == {"weight"} and set(second) == {"weight"}


def _joined(prefixes: tuple, modules: dict) -> dict:
    """The parameters of two ``nn.Embedding`` modules as one token-and-position embedding's."""
    return {f"{child}.{leaf}": v for child, p in zip(("token_embedding", "position_embedding"), prefixes)
            for leaf, v in modules[p].items()}


def _pairs(model, modules: dict, mapping) -> tuple:
    """``([(layer name, layer, roles, torch prefix, its parameters)], problems)``: symdl layers with their
    modules (a prefix is a pair ``(tokens, positions)`` for two embeddings read as one layer)."""
    layers, problems = _layers(model), []
    if mapping is None:
        prefixes, pairs, at = list(modules), [], 0
        for name, layer, roles in layers:
            if at >= len(prefixes):
                break
            if at + 1 < len(prefixes) and _two_embeddings(layer, modules[prefixes[at]], modules[prefixes[at + 1]]):
                both = (prefixes[at], prefixes[at + 1])
                pairs.append((name, layer, roles, both, _joined(both, modules)))
                at += 2
            else:
                pairs.append((name, layer, roles, prefixes[at], modules[prefixes[at]]))
                at += 1
        if at != len(prefixes) or len(pairs) != len(layers):
            problems.append(f"the state dict has {len(prefixes)} modules with weights "
                            f"({', '.join(f'{p} {_shapes(modules[p], p)}' for p in prefixes)}), the model "
                            f"{len(layers)} layers with weights ({', '.join(name for name, _, _ in layers)})")
        return pairs, problems
    by_name = {name: (name, layer, roles) for name, layer, roles in layers}
    unknown = [f"{layer_name} (for {prefix})" for prefix, layer_name in mapping.items() if layer_name not in by_name]
    missing_modules = [prefix for prefix in mapping if prefix not in modules]
    unmapped = [f"{p} {_shapes(modules[p], p)}" for p in modules if p not in mapping]
    unfilled = [name for name in by_name if name not in mapping.values()]
    for what, items in (("mapping names layers the model does not have", unknown),
                        ("mapping names modules the state dict does not have", missing_modules),
                        ("state dict modules not mapped", unmapped), ("model layers not mapped", unfilled)):
        if items:
            problems.append(f"{what}: {', '.join(items)}")
    grouped = {}  # layer name -> its modules, in mapping order
    for prefix, layer_name in mapping.items():
        if layer_name in by_name and prefix in modules:
            grouped.setdefault(layer_name, []).append(prefix)
    pairs = []
    for layer_name, prefixes in grouped.items():
        name, layer, roles = by_name[layer_name]
        if len(prefixes) == 2 and _two_embeddings(layer, modules[prefixes[0]], modules[prefixes[1]]):
            pairs.append((name, layer, roles, tuple(prefixes), _joined(tuple(prefixes), modules)))
        elif len(prefixes) > 1:
            problems.append(f"mapping names {len(prefixes)} modules for {layer_name} ({', '.join(prefixes)}): only a "
                            "TokenAndPositionEmbedding takes two (two nn.Embedding: tokens, then positions)")
        else:
            pairs.append((name, layer, roles, prefixes[0], modules[prefixes[0]]))
    return pairs, problems


def _shapes(params: dict, prefix="") -> str:
    return "{" + ", ".join(f"{_key(prefix, k).rpartition('.')[2]}: {tuple(v.shape)}" for k, v in params.items()) + "}"


def load_torch_weights(model, state_dict_or_safetensors_path, mapping=None, torch_flatten: bool = True) -> None:
    """Load PyTorch weights into ``model`` (compiled, same architecture); see the module notes for
    layouts. ``mapping``: ``{torch module prefix: symdl layer name}`` (default: by order).
    ``torch_flatten``: a Dense after a ``Flatten`` reads PyTorch's NCHW flatten order."""
    if getattr(model, "train_step", None) is None:
        raise RuntimeError("load_torch_weights: the model has no weights yet; call model.compile(...) first")
    modules = _modules(read_state_dict(state_dict_or_safetensors_path))
    pairs, problems = _pairs(model, modules, mapping)
    live = model_arrays(model)
    arrays = {}
    for layer_name, layer, roles, prefix, params in pairs:
        image = _flattened_image(model, layer) if torch_flatten and isinstance(layer, Dense) else None
        entries = _entries(layer, roles, live, image, present=params)
        if entries is None:
            problems.append(f"{layer_name}: no PyTorch layout known for {type(layer).__name__}")
            continue
        extra = [f"{_key(prefix, k)} {tuple(v.shape)}" for k, v in params.items() if k not in entries]
        lacking = [f"{_key(prefix, k)} (for {', '.join(f'{n} {s}' for n, s in zip(e.names, e.shapes))})"
                   for k, e in entries.items() if k not in params]
        if extra:
            problems.append(f"{layer_name} ({type(layer).__name__}) has no place for " + ", ".join(extra))
        if lacking:
            problems.append("missing " + ", ".join(lacking))
        for torch_name, entry in entries.items():
            if torch_name not in params:
                continue
            value = params[torch_name]
            if tuple(value.shape) == entry.shape:
                for keras, part in entry.load(value).items():
                    arrays[keras] = arrays[keras] + part if keras in arrays else part
            else:
                needs = ", ".join(entry.names) + (" needs " if len(entry.names) == 1 else " need ") + \
                    ", ".join(str(s) for s in entry.shapes)
                problems.append(f"{_key(prefix, torch_name)} has shape {tuple(value.shape)}; {needs} "
                                f"(PyTorch {entry.shape})")
    if problems:
        raise WeightsError("load_torch_weights: the state dict does not fit the model: " + "; ".join(problems))
    assign(model, arrays, "load_torch_weights")


def from_torch_shape(layer, shape) -> tuple:
    """The symdl shape of a PyTorch kernel of ``shape``."""
    return (shape[2], shape[3], shape[1], shape[0]) if isinstance(layer, Conv2D) else tuple(shape[::-1])


def to_torch_shape(layer, shape) -> tuple:
    return (shape[3], shape[2], shape[0], shape[1]) if isinstance(layer, Conv2D) else tuple(shape[::-1])


def to_torch_state_dict(model, prefixes=None, torch_flatten: bool = True, tensors: bool = False) -> dict:
    """``model``'s weights as a PyTorch state dict (``load_torch_weights``'s inverse): keys
    ``<prefix>.weight``... with the prefixes given (one per layer with weights, in order; default:
    the layer names), NumPy arrays, or torch tensors with ``tensors=True``; a batch norm also gets
    ``num_batches_tracked`` (the steps trained). Recurrent layers given the same prefix are the
    layers of one stacked PyTorch module (``num_layers``: ``weight_ih_l0``, ``weight_ih_l1``...)."""
    if getattr(model, "train_step", None) is None:
        raise RuntimeError("to_torch_state_dict: the model has no weights yet; call model.compile(...) first")
    layers = _layers(model)
    prefixes = [name for name, _, _ in layers] if prefixes is None else list(prefixes)
    if len(prefixes) != len(layers):
        raise ValueError(f"to_torch_state_dict: {len(prefixes)} prefixes for {len(layers)} layers with weights "
                         f"({', '.join(name for name, _, _ in layers)})")
    recurrent = [p for p, (_, layer, _) in zip(prefixes, layers) if isinstance(layer, (Bidirectional, *GATES))]
    seen = {}
    for j, ((_, layer, _), prefix) in enumerate(zip(layers, prefixes)):
        if isinstance(layer, (Bidirectional, *GATES)) and recurrent.count(prefix) > 1:
            prefixes[j] = Stacked(prefix, seen.setdefault(prefix, 0))
            seen[prefix] += 1
    live = model_arrays(model)
    out = {}
    for (layer_name, layer, roles), prefix in zip(layers, prefixes):
        image = _flattened_image(model, layer) if torch_flatten and isinstance(layer, Dense) else None
        entries = _entries(layer, roles, live, image)
        if entries is None:
            raise ValueError(f"to_torch_state_dict: no PyTorch layout known for {type(layer).__name__} {layer_name}")
        for torch_name, entry in entries.items():
            out[_key(prefix, torch_name)] = np.array(entry.save(live), order="C", copy=True)
        if isinstance(layer, BatchNormalization):
            out[f"{prefix}.num_batches_tracked"] = np.array(model.train_step.t, np.int64)
    if tensors:
        import torch

        out = {k: torch.from_numpy(v) for k, v in out.items()}
    return out


__all__ = ["load_torch_weights", "to_torch_state_dict", "read_state_dict"]
