"""Data that needs no download: scikit-learn's digits, seeded synthetic sets, IDX files.

>>> import symdl as sd
>>> X, y = sd.datasets.digits()
>>> X.shape, y.shape, int(y.max())
((1797, 64), (1797,), 9)
>>> X, y = sd.datasets.xor(8, seed=0); X.shape, sorted(set(y.tolist()))
((8, 2), [0, 1])
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Data a model cannot train on, with the reason and the offending shapes or values."""


def digits(images: bool = False):
    """scikit-learn's 8x8 handwritten digits: ``X`` (1797, 64) scaled to [0, 1], ``y`` labels 0-9.

    ``images=True``: ``X`` is the NHWC image batch (1797, 8, 8, 1) for convolutional models.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.data / 16.0).astype(np.float64)
    return (X.reshape(-1, 8, 8, 1) if images else X), d.target.astype(np.int64)


def xor(n: int = 400, noise: float = 0.1, seed: int = 0):
    """Four Gaussian blobs at (±1, ±1); the label is 1 where the signs differ."""
    rng = np.random.default_rng(seed)
    centers = np.array([[1, 1], [-1, -1], [1, -1], [-1, 1]], dtype=float)
    idx = rng.integers(0, 4, n)
    X = centers[idx] + rng.normal(scale=noise * 4, size=(n, 2))
    return X, (idx >= 2).astype(np.int64)


def moons(n: int = 400, noise: float = 0.15, seed: int = 0):
    """Two interleaving half circles (scikit-learn's ``make_moons``)."""
    from sklearn.datasets import make_moons

    X, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    return X, y.astype(np.int64)


def spirals(n: int = 600, classes: int = 2, noise: float = 0.1, seed: int = 0):
    """``classes`` interleaved spiral arms, ``n`` points in all."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    r = rng.uniform(0.1, 1.0, n)
    theta = 3.5 * r * np.pi + 2 * np.pi * y / classes + rng.normal(scale=noise, size=n)
    X = np.stack([r * np.cos(theta), r * np.sin(theta)], 1) * 2
    return X, y.astype(np.int64)


def sine(n: int = 500, noise: float = 0.05, seed: int = 0):
    """Regression: ``x`` uniform on [-π, π], ``y = sin(x) + noise``; both (n, 1)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-np.pi, np.pi, (n, 1))
    return X, np.sin(X) + rng.normal(scale=noise, size=(n, 1))


def train_test_split(X, y, test_size: float = 0.25, seed: int = 0):
    """A seeded random split: ``Xtr, Xte, ytr, yte``."""
    X, y = np.asarray(X), np.asarray(y)
    if len(X) != len(y):
        raise DataError(f"X has {len(X)} rows but y has {len(y)}")
    if not 0 < test_size < 1:
        raise DataError(f"test_size must be between 0 and 1, got {test_size}")
    order = np.random.default_rng(seed).permutation(len(X))
    k = int(round(len(X) * test_size))
    test, train = order[:k], order[k:]
    return X[train], X[test], y[train], y[test]


def standardize(X_train, *others):
    """Scale to zero mean and unit variance using the *training* statistics.

    Returns the scaled training array followed by each other array scaled the same way.
    """
    X_train = np.asarray(X_train, dtype=np.float64)
    mean = X_train.mean(0)
    std = X_train.std(0)
    std[std == 0] = 1.0
    out = [(X_train - mean) / std] + [(np.asarray(o, dtype=np.float64) - mean) / std for o in others]
    return out[0] if not others else tuple(out)


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped, into an array.

    >>> import tempfile, os, numpy as np
    >>> folder = tempfile.TemporaryDirectory(); p = os.path.join(folder.name, "labels.idx1-ubyte")
    >>> save_idx(p, np.array([3, 1, 4], dtype=np.uint8)); load_idx(p).tolist()
    [3, 1, 4]
    >>> folder.cleanup()
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    data = raw[4 + 4 * ndim :]
    if len(data) != expected:
        raise DataError(f"{path}: expected {expected} bytes of data for shape {dims}, found {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def save_idx(path, array) -> None:
    """Write ``array`` as an IDX file (gzipped if the name ends in .gz); tests use it."""
    array = np.asarray(array)
    by_kind = {(np.dtype(v).kind, np.dtype(v).itemsize): k for k, v in _IDX_TYPES.items()}
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in by_kind:
        raise DataError(f"IDX cannot store dtype {array.dtype}")
    code = by_kind[key]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.dtype(_IDX_TYPES[code])).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def check_features(X, *, input_dim, what: str = "data", dtype=np.float64) -> np.ndarray:
    """Validate a feature matrix: numeric, 2-D, ``input_dim`` columns, not empty, finite;
    returned C-contiguous in ``dtype`` (the model's: ``X`` itself when it already is, so a
    float32 set trained in float32 is never copied).

    ``input_dim = (h, w, c)``: images ``(n, h, w, c)`` (``(n, h, w)`` when ``c`` is 1).

    >>> X = np.zeros((3, 2), np.float32)
    >>> check_features(X, input_dim=2, dtype=np.float32) is X
    True
    """
    try:
        X = np.asarray(X)
    except ValueError as exc:  # NumPy refuses a ragged list (sequences of different lengths)
        raise DataError(f"{what}: X is ragged (rows or sequences of different lengths: {exc}); pad them to one "
                        "length") from None
    if X.dtype.kind not in "fiub":
        raise DataError(f"{what}: X has dtype {X.dtype}; expected numbers")
    if isinstance(input_dim, tuple):
        X = X[..., None] if X.ndim == len(input_dim) and input_dim[-1] == 1 else X
        if X.shape[1:] != input_dim:
            kind = "sequences" if len(input_dim) == 2 else "images"
            raise DataError(f"{what}: X has shape {X.shape}, the model expects {kind} (n, "
                            f"{', '.join(map(str, input_dim))})")
        if len(X) == 0 or not np.isfinite(X).all():
            raise DataError(f"{what}: X is empty or contains NaN or Inf")
        return np.ascontiguousarray(X, dtype)
    if X.ndim != 2:
        raise DataError(f"{what}: X must be 2-D (samples, features), got shape {X.shape}")
    if X.shape[1] != input_dim:
        raise DataError(f"{what}: X has {X.shape[1]} features, the model expects {input_dim}")
    if len(X) == 0:
        raise DataError(f"{what}: X is empty")
    if not np.isfinite(X).all():
        bad = np.argwhere(~np.isfinite(X))[0]
        raise DataError(f"{what}: X contains NaN or Inf (first at row {bad[0]}, column {bad[1]})")
    return np.ascontiguousarray(X, dtype)


def check_tokens(X, *, sequence_length: int, what: str = "data", dtype=np.float64, leaf=None) -> np.ndarray:
    """Validate token ids ``(n, T)``: an integer array (``(n,)`` when ``T`` is 1), not empty; with the
    graph's token ``leaf``, every id inside the vocabulary of each embedding that reads it (the error
    names the layer: ``run.validate.token_id_error``). Returned C-contiguous in ``dtype``: the
    compiled code reads ids as exact integers in the model's float dtype.

    >>> check_tokens(np.array([[1, 2, 3]]), sequence_length=3).tolist()
    [[1.0, 2.0, 3.0]]
    >>> check_tokens(np.zeros((2, 4)), sequence_length=3)
    Traceback (most recent call last):
    ...
    symdl.nn.datasets.DataError: data: X holds token ids: expected an integer array (n, 3), got float64
    """
    X = np.asarray(X)
    T = int(sequence_length)
    if X.dtype.kind not in "iu":
        raise DataError(f"{what}: X holds token ids: expected an integer array (n, {T}), got {X.dtype}")
    if X.ndim == 1 and T == 1:
        X = X.reshape(-1, 1)
    if X.ndim != 2 or X.shape[1] != T:
        raise DataError(f"{what}: X has shape {X.shape}; the model reads token ids (n, {T}) (sequences of {T} "
                        "tokens)")
    if len(X) == 0:
        raise DataError(f"{what}: X is empty")
    if leaf is not None:
        from ..run.validate import token_id_error

        message = token_id_error(X, leaf, "X")
        if message:
            raise DataError(f"{what}: {message}")
    return np.ascontiguousarray(X, dtype)


def check_dataset(X, y, *, kind: str, outputs: int, input_dim: int, what: str = "training data", dtype=np.float64):
    """Validate and convert ``(X, y)`` for a model; returns ``X`` and target ``Y`` (n, outputs),
    both C-contiguous in ``dtype`` (``check_features``, ``check_targets``).

    ``kind`` is ``"classes"`` (integer labels or one-hot), ``"binary"`` (0/1 or
    probabilities) or ``"regression"``. Errors come before any compilation.
    """
    X = check_features(X, input_dim=input_dim, what=what, dtype=dtype)
    return X, check_targets(y, len(X), kind=kind, outputs=outputs, what=what, dtype=dtype)


def check_targets(y, rows: int, *, kind: str, outputs: int, what: str = "training data", dtype=np.float64,
                  sequence_length: int | None = None) -> np.ndarray:
    """Validate and convert the targets ``y`` of ``rows`` samples: ``(rows, outputs)`` in ``dtype``, or for
    a sequence output (``sequence_length=T``) per-token targets ``(rows, T, outputs)``: integer labels
    ``(rows, T)`` or one-hot ``(rows, T, outputs)`` for ``"classes"``, ``(rows, T, outputs)`` (``(rows, T)``
    when ``outputs`` is 1) otherwise.

    >>> check_targets(np.array([[0, 2]]), 1, kind="classes", outputs=3, sequence_length=2).tolist()
    [[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]
    >>> check_targets(np.zeros((1, 3)), 1, kind="classes", outputs=3, sequence_length=2)
    Traceback (most recent call last):
    ...
    symdl.nn.datasets.DataError: training data: y must be labels (n, 2) or one-hot (n, 2, 3) per token, got shape (1, 3)
    """
    y = np.asarray(y)
    if len(y) != rows:
        raise DataError(f"{what}: X has {rows} rows but y has {len(y)}")
    if y.dtype.kind not in "fiub":
        raise DataError(f"{what}: y has dtype {y.dtype}; expected numbers")
    if not np.isfinite(y.astype(np.float64)).all():
        raise DataError(f"{what}: y contains NaN or Inf")
    T = sequence_length
    lead = (rows,) if T is None else (rows, T)  # a sample's leading axes: (n,) or per token (n, T)
    shown = "n" if T is None else f"n, {T}"
    if kind == "classes":
        if y.shape == lead:
            if not np.all(np.equal(np.mod(y, 1), 0)):
                raise DataError(f"{what}: class labels must be integers, got values like {y[np.mod(y, 1) != 0][:3]}")
            labels = y.astype(np.int64)
            if labels.min() < 0 or labels.max() >= outputs:
                raise DataError(f"{what}: labels must lie in 0..{outputs - 1} for {outputs} classes, "
                                f"found {labels.min()}..{labels.max()}")
            return np.eye(outputs, dtype=dtype)[labels]
        if y.shape == (*lead, outputs):
            return np.ascontiguousarray(y, dtype)
        per = "" if T is None else " per token"
        raise DataError(f"{what}: y must be labels ({shown}{',' if T is None else ''}) or one-hot ({shown}, "
                        f"{outputs}){per}, got shape {y.shape}")
    Y = y.reshape(*lead, 1) if y.shape == lead else y
    if Y.shape != (*lead, outputs):
        if T is None:
            raise DataError(f"{what}: y must have shape (n,) or (n, {outputs}), got {y.shape}")
        raise DataError(f"{what}: y must have shape ({shown}, {outputs}) per token"
                        + (f" or ({shown})" if outputs == 1 else "") + f", got {y.shape}")
    if kind == "binary" and (Y.min() < 0 or Y.max() > 1):
        raise DataError(f"{what}: binary targets must lie in [0, 1], found {Y.min()}..{Y.max()}")
    return np.ascontiguousarray(Y, dtype)
