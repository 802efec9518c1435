"""Check the arrays a user passes before any compiled code sees them.

Every error names the array, the expected and the given shape, so a mistake never
surfaces as a Numba typing traceback.

>>> import numpy as np, symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 1))
>>> check_arrays({"x": np.ones((3, 2)), "W": np.ones((3, 1))}, [x], [W], np.float64)
Traceback (most recent call last):
...
symdl.run.validate.ArrayError: array 'W' has shape (3, 1), expected (2, 1)
"""
from __future__ import annotations

import numpy as np

from ..graph.nodes import SequenceInput, TokenInput, VectorParam
from ..ops.embedding import id_limits


class ArrayError(ValueError):
    """A missing, unknown, mis-shaped, mistyped or non-finite array."""


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


def check_arrays(arrays: dict, inputs, params, dtype, *, check_finite=True) -> tuple:
    """Validate and convert ``arrays``; returns ``(converted, batch_size)``."""
    expected = {str(l.name): l for l in list(inputs) + list(params)}
    missing = [k for k in expected if k not in arrays]
    unknown = [k for k in arrays if k not in expected]
    if missing:
        what = ", ".join(f"{k!r} {_fmt(_expected_shape(expected[k]))}" for k in missing)
        raise ArrayError(f"missing array(s): {what}")
    if unknown:
        raise ArrayError(f"unknown array(s) {', '.join(map(repr, unknown))}; expected: {', '.join(expected)}")
    out, batch, batch_from = {}, None, None
    for name, value in arrays.items():
        leaf = expected[name]
        a = np.asarray(value)
        if a.dtype.kind not in "fiub":
            raise ArrayError(f"array {name!r} has dtype {a.dtype}, expected numbers (converted to {np.dtype(dtype).name})")
        image = getattr(leaf, "image_shape", None)
        if leaf in inputs and isinstance(leaf, TokenInput):  # (n, T) integer ids -> the (n·T, 1) column
            a = _token_ids(name, a, leaf)
            rows = a.shape[0] // leaf.sequence_length
        elif leaf in inputs and isinstance(leaf, SequenceInput):  # (n, T, d) -> (n·T, d) token rows
            T, d = leaf.sequence_shape
            a = a[..., None] if a.ndim == 2 and d == 1 else a
            if a.ndim != 3 or a.shape[1:] != (T, d):
                raise ArrayError(f"array {name!r} has shape {_fmt(a.shape)}, expected sequences (n, {T}, {d})")
            rows = a.shape[0]
            a = a.reshape(-1, d)
        elif leaf in inputs and image is not None:  # (n, H, W, C) images -> (n·H·W, C) pixel rows
            a = a[..., None] if a.ndim == 3 and image[2] == 1 else a
            if a.ndim != 4 or a.shape[1:] != tuple(image):
                raise ArrayError(f"array {name!r} has shape {_fmt(a.shape)}, expected images (n, "
                                 f"{', '.join(map(str, image))})")
            rows = a.shape[0]
            a = a.reshape(-1, image[2])
        elif leaf in inputs:
            a = a.reshape(-1, 1) if a.ndim == 1 and int(leaf.shape[1]) == 1 else a
            if a.ndim != 2 or a.shape[1] != int(leaf.shape[1]):
                raise ArrayError(f"array {name!r} has shape {_fmt(a.shape)}, expected (n, {leaf.shape[1]})")
            rows = a.shape[0]
        if leaf in inputs:
            if a.shape[0] == 0:
                raise ArrayError(f"array {name!r} is empty (0 rows)")
            if batch is None:
                batch, batch_from = rows, name
            elif rows != batch:
                raise ArrayError(f"batch sizes differ: {batch_from!r} has {batch} rows, {name!r} has {rows}")
        else:
            want = _value_shape(leaf)
            if isinstance(leaf, VectorParam) and a.shape == (1, want[0]):
                a = a.reshape(want)
            if a.shape != want:
                raise ArrayError(f"array {name!r} has shape {_fmt(a.shape)}, expected {_fmt(want)}")
            a = a.reshape(int(leaf.shape[0]), int(leaf.shape[1]))  # a vector is a row, a kernel a matrix
        a = np.ascontiguousarray(a, dtype=dtype)
        if check_finite and not np.isfinite(a).all():
            raise ArrayError(f"array {name!r} contains NaN or Inf")
        out[name] = a
    return out, (batch if batch is not None else 1)


def _token_ids(name, a, leaf):
    """Token ids ``(n, T)`` checked (integers, inside every embedding's vocabulary that reads them:
    ``ops.embedding.id_limits``) and made the column ``(n·T, 1)``."""
    T = leaf.sequence_length
    if a.ndim == 1 and T == 1:
        a = a.reshape(-1, 1)
    if a.ndim != 2 or a.shape[1] != T:
        raise ArrayError(f"array {name!r} has shape {_fmt(a.shape)}, expected token ids (n, {T})")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise ArrayError(f"array {name!r} holds token ids: expected integers, got non-integer values "
                             f"(dtype {a.dtype})")
    elif a.dtype.kind == "b":
        raise ArrayError(f"array {name!r} holds token ids: expected integers, got dtype {a.dtype}")
    message = token_id_error(a, leaf, name)
    if message:
        raise ArrayError(f"{message}; array {name!r} has shape {_fmt(a.shape)}")
    return a.reshape(-1, 1)


def token_id_error(a, leaf, name: str) -> str | None:
    """Why the ids ``a`` ``(n, T)`` cannot be read by the embeddings on the token input ``leaf``
    (``ops.embedding.id_limits``): the first id outside one's vocabulary, named by layer and
    place; None when every id fits.

    >>> import symdl as sd
    >>> from symdl.ops.embedding import embedding
    >>> ids = sd.input("ids", (2,), dtype="int32"); _ = embedding(sd.param("E", (3, 2)), ids, where="Embedding 1")
    >>> token_id_error(np.array([[0, 1], [2, 3]]), ids, "ids")
    'Embedding 1: token id 3 at ids[1, 1] is outside [0, 3) (input_dim=3)'
    """
    for V, where in id_limits(leaf):
        bad = (a < 0) | (a >= V)
        if bad.any():
            at = tuple(int(k) for k in np.argwhere(bad)[0])
            return f"{where}: token id {a[at].item()} at {name}[{at[0]}, {at[1]}] is outside [0, {V}) (input_dim={V})"
    return None


def fast_inputs(arrays: dict, spec: list, dtype):
    """``(list of arrays, n)`` when every array is already exactly what compiled code
    wants (the right dtype, 2-D, C-contiguous, right width, one batch size), else None.

    ``spec`` is ``[(name, features), ...]``. Anything unusual goes through ``check_arrays``.
    """
    if len(arrays) != len(spec):
        return None
    out, n = [], None
    for name, features in spec:
        a = arrays.get(name)
        if (
            a.__class__ is not np.ndarray or a.dtype != dtype or a.ndim != 2
            or a.shape[1] != features or not a.flags.c_contiguous or a.shape[0] == 0
        ):
            return None
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            return None
        out.append(a)
    return out, n


def _expected_shape(leaf):
    from ..graph.nodes import Input  # noqa

    if isinstance(leaf, Input):
        return ("n", *getattr(leaf, "image_shape", (int(leaf.shape[1]),)))
    return _value_shape(leaf)


def _value_shape(leaf) -> tuple:
    """A parameter's array shape outside the graph; a state leaf's (batch norm's running
    statistics, which have no ``value_shape``): a (1, k) row is a (k,) vector."""
    if hasattr(leaf, "value_shape"):
        return leaf.value_shape
    r, c = (int(d) for d in leaf.shape)
    return (c,) if r == 1 else (r, c)
