"""Checkpoint files: arrays plus JSON metadata in a NumPy ``.npz`` zip, never pickle.

* Loading executes no code: ``np.load(..., allow_pickle=False)`` and ``json``.
* Saving is atomic: a temporary file in the same directory, flushed and fsynced,
  then ``os.replace``; if anything fails (even a SIGKILL) the previous file is untouched.
  A temporary file a killed save left behind is removed by the next save to that path.
* A truncated, corrupted or foreign file raises ``CheckpointError`` saying so.

>>> import os, tempfile, numpy as np
>>> folder = tempfile.TemporaryDirectory(); path = os.path.join(folder.name, "run.symdl")
>>> write(path, {"format": "demo"}, {"W": np.eye(2)})
>>> meta, arrays = read(path); meta["format"], arrays["W"].tolist()
('demo', [[1.0, 0.0], [0.0, 1.0]])
>>> folder.cleanup()
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ..backends import cache

FORMAT = "symdl-checkpoint"
VERSION = 1
_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def write(path, meta: dict, arrays: dict) -> None:
    """Atomically write ``meta`` (JSON-able) and ``arrays`` to ``path``."""
    payload = {_META: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for k, v in arrays.items():
        payload[k] = np.asarray(v)
    cache.save_file(path, lambda f: _savez(f, payload))


def _savez(f, payload):
    np.savez(f, **payload)


def read(path) -> tuple:
    """``(meta, arrays)`` from a checkpoint written by ``write``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # not even the start of a zip archive
        raise CheckpointError(f"{path} is not a symdl checkpoint (a symdl checkpoint is a .npz zip archive, "
                              "written by Model.save)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if _META not in z.files:
                raise CheckpointError(f"{path} is not a symdl checkpoint (no metadata)")
            meta = json.loads(bytes(z[_META]).decode())
            arrays = {k: z[k] for k in z.files if k != _META}
    except CheckpointError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # NumPy's advice to allow pickle is not ours to give: never load pickles
            raise CheckpointError(f"{path} is not a symdl checkpoint: it holds pickled Python objects, which "
                                  "symdl never writes and does not load") from exc
        raise CheckpointError(f"{path} is truncated or corrupted: {exc}") from exc
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupted: {exc}") from exc
    return meta, arrays
