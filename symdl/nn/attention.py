"""``MultiHeadAttention`` (Keras 3's layer): scaled dot-product attention per head, built from
products within each sequence (``ops.attention``), so its gradient is derived like any other.

For each head ``h`` (``Q = query @ Wq + bq`` and the others alike, the head's columns of each)::

    S_h = Q_h K_hᵀ / √key_dim      within each sequence: (n·T, S) scores
    P_h = softmax(S_h)             row by row (the row max subtracted); causal(S_h) first if asked
    O_h = P_h V_h                  the mix of each sequence's values
    out = concat(O_1, ..., O_H) @ Wo + bo

and the backward pass symdl derives is the textbook one: ``δV_h = P_hᵀ δO_h``,
``δS_h = P_h ⊙ (δP_h − rowsum(P_h ⊙ δP_h))``, ``δQ_h = δS_h K_h/√d``, ``δK_h = δS_hᵀ Q_h/√d``.

Weights as Keras stores them, read as matrices: ``query/kernel`` ``(d, H, key_dim)`` is
``query_kernel{i}`` ``(d, H·key_dim)`` (a reshape: head ``h`` is columns ``h·key_dim ..``), its bias
``(H, key_dim)`` the vector ``query_bias{i}``; ``key`` and ``value`` alike; ``attention_output/kernel``
``(H, value_dim, d_out)`` is ``output_kernel{i}`` ``(H·value_dim, d_out)``.

>>> import symdl as sd
>>> x = sd.nn.Input(shape=(6,), dtype="int32")
>>> h = sd.nn.Embedding(20, 8)(x)
>>> sd.nn.MultiHeadAttention(num_heads=2, key_dim=4)(h, h, use_causal_mask=True)
<SymbolicTensor shape=(None, 6, 8) from MultiHeadAttention>
"""
from __future__ import annotations

import math
import zlib

import numpy as np
import sympy as sp

from ..formulas import activations
from ..graph.nodes import param
from ..ops.attention import causal, mix, scores
from ..ops.concat import Cols, concat
from ..ops.embedding import sequence_length
from .functional import call_layer, label
from .layers import Built, Layer, _layer, _positive


def _head(x, h, width):
    """Columns ``h·width .. (h+1)·width`` of ``x`` (all of it when it is one head)."""
    if int(x.shape[1]) == width:
        return x
    return Cols(x, h * width, (h + 1) * width)


@_layer
class MultiHeadAttention(Layer):
    """Keras 3's ``MultiHeadAttention(num_heads, key_dim, value_dim=None, use_bias=True,
    output_shape=None)``, called as ``mha(query, value, key=None, use_causal_mask=False)``:
    self-attention ``mha(x, x)``, cross-attention ``mha(x, context)`` (a context of another length
    ``S``; the key defaults to the value). Inputs and output are sequences ``(None, T, d)``.
    """

    kind = "multi_head_attention"
    merges = True  # called on (query, value[, key])
    shareable = True

    def __init__(self, num_heads, key_dim, value_dim=None, dropout=0.0, use_bias=True, output_shape=None,
                 name=None, use_causal_mask=None):
        where = "MultiHeadAttention"
        self.num_heads = _positive(num_heads, "num_heads", where)
        self.key_dim = _positive(key_dim, "key_dim", where)
        self.value_dim = self.key_dim if value_dim is None else _positive(value_dim, "value_dim", where)
        if dropout:
            raise ValueError(f"{where}: attention dropout is not supported (dropout={dropout!r}); put a Dropout "
                             "layer after the attention instead")
        self.use_bias = bool(use_bias)
        self.output_dim = None if output_shape is None else _positive(
            output_shape[-1] if isinstance(output_shape, (tuple, list)) else output_shape, "output_shape", where)
        self.name = name
        self.causal = use_causal_mask  # set by the first call (a saved model's config restores it)

    def __call__(self, query, value=None, key=None, use_causal_mask=False, attention_mask=None):
        if value is None and isinstance(query, (list, tuple)) and len(query) in (2, 3):
            # [query, value(, key)]: how a saved model's graph replays the call; its config has the mask
            query, value, key = (*query, None)[:3]
            use_causal_mask = use_causal_mask or bool(self.causal)
        if value is None:
            raise TypeError(f"{label(self)}: call it as mha(query, value, key=None, use_causal_mask=False); "
                            "for self-attention pass the same tensor twice: mha(x, x)")
        if attention_mask is not None:
            raise ValueError(f"{label(self)}: attention_mask is not supported; use_causal_mask=True gives the "
                             "causal mask")
        if self.causal is not None and self.causal != bool(use_causal_mask):
            raise ValueError(f"{label(self)}: a shared attention layer is called with one use_causal_mask "
                             f"(first {self.causal}, now {bool(use_causal_mask)})")
        previous, self.causal = self.causal, bool(use_causal_mask)
        try:
            return call_layer(self, [query, value] + ([] if key is None else [key]))
        except Exception:
            self.causal = previous
            raise

    # ---------------------------------------------------------------- the graph
    def where(self, index) -> str:
        return f"MultiHeadAttention layer {index}" + (f" {self.name!r}" if self.name else "")

    def _lengths(self, hs, where):
        if len(hs) not in (2, 3):
            raise ValueError(f"{where}: called on (query, value[, key]), got {len(hs)} tensors")
        lengths = [sequence_length(h) for h in hs]
        for what, h, T in zip(("query", "value", "key"), hs, lengths):
            if T is None:
                raise ValueError(f"{where}: the {what} of shape {tuple(h.shape)} is not a batch of sequences "
                                 "(None, T, d): attention reads token sequences (an Embedding's output, or "
                                 "Input(shape=(T, d)))")
        if len(hs) == 3 and lengths[2] != lengths[1]:
            raise ValueError(f"{where}: the key holds sequences of {lengths[2]} tokens, the value of {lengths[1]}: "
                             "they must match")
        T, S = lengths[0], lengths[1]
        if self.causal and T != S:
            raise ValueError(f"{where}: a causal mask needs square attention: {T} queries against {S} keys")
        return T, S

    def make_params(self, index, features) -> list:
        """Kernels and biases (shapes from ``features = (d_query, d_value, d_key)``)."""
        dq, dv, dk = features
        H, k, v = self.num_heads, self.key_dim, self.value_dim
        out = self.output_dim or dq
        names = [("query", (dq, H * k), H * k), ("key", (dk, H * k), H * k), ("value", (dv, H * v), H * v),
                 ("output", (H * v, out), out)]
        params = []
        for stem, shape, width in names:
            params.append(param(f"{stem}_kernel{index}", shape))
            if self.use_bias:
                params.append(param(f"{stem}_bias{index}", width))
        return params

    def _parts(self, params):
        """``{query|key|value|output: (kernel, bias or None)}``."""
        step = 2 if self.use_bias else 1
        stems = ("query", "key", "value", "output")
        return {s: (params[step * i], params[step * i + 1] if self.use_bias else None) for i, s in enumerate(stems)}

    def apply(self, params, hs, where=None):
        where = where or label(self)
        T, S = self._lengths(hs, where)
        query, value = hs[0], hs[1]
        key = hs[2] if len(hs) == 3 else value
        parts = self._parts(params)

        def project(x, stem):
            W, b = parts[stem]
            return x @ W + b if b is not None else x @ W

        Q, K, V = project(query, "query"), project(key, "key"), project(value, "value")
        scale = 1 / sp.sqrt(self.key_dim)
        heads = []
        for h in range(self.num_heads):
            s = scale * scores(_head(Q, h, self.key_dim), _head(K, h, self.key_dim), T, S, where=where)
            if self.causal:
                s = causal(s, T, where=where)
            heads.append(mix(activations.softmax(s), _head(V, h, self.value_dim), T, S, where=where))
        return project(concat(*heads), "output")

    def build_both(self, index, hs, hs_infer) -> Built:
        where = self.where(index)
        self._lengths(hs, where)
        key = hs[2] if len(hs) == 3 else hs[1]
        params = self.make_params(index, (int(hs[0].shape[1]), int(hs[1].shape[1]), int(key.shape[1])))
        out = self.apply(params, hs, where)
        infer = out if list(hs_infer) == list(hs) else self.apply(params, hs_infer, where)
        return Built(params, out, infer, {}, self.initial(index, params))

    def initial(self, index, params) -> dict:
        """Kernels Glorot-uniform (fans as the matrix ``(d, H·key_dim)``), biases zero: seeded by the layer."""
        rng = np.random.default_rng(zlib.crc32(f"mha{index}".encode()))
        values = {}
        for p in params:
            shape = tuple(int(d) for d in p.shape)
            if "kernel" in str(p.name):
                limit = math.sqrt(6.0 / (shape[0] + shape[1]))
                values[str(p.name)] = rng.uniform(-limit, limit, shape)
        return values

    def describe(self) -> str:
        mask = ", causal" if self.causal else ""
        return f"{self.num_heads} heads x {self.key_dim}{mask}"

    def config(self, name=None) -> dict:
        return {"num_heads": self.num_heads, "key_dim": self.key_dim, "value_dim": self.value_dim,
                "use_bias": self.use_bias, "output_shape": self.output_dim, "name": name or self.name,
                "use_causal_mask": self.causal}


__all__ = ["MultiHeadAttention"]
