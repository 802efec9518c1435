"""What every backend's runner shares: dtypes, buffer shapes at a batch size, the workspace."""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..expr import n as N

DTYPES = {"float32": np.float32, "float64": np.float64}


def as_dtype(dtype) -> np.dtype:
    """``"float32"``/``"float64"`` (or the NumPy types) as a NumPy dtype; anything else is an error."""
    key = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if key not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return np.dtype(DTYPES[key])


def concrete_shape(shape, n_value: int) -> tuple:
    """A buffer's symbolic shape at batch size ``n_value``."""
    return tuple(int(d) if not isinstance(d, sp.Basic) or d.is_Integer else int(d.subs(N, n_value)) for d in shape)


class Workspace:
    """Buffers for one program, allocated once per batch size and reused every call."""

    def __init__(self, program, dtype, alloc=np.empty):
        self.program, self.dtype, self.alloc = program, dtype, alloc
        self.by_n = {}

    def get(self, n_value: int) -> dict:
        if n_value not in self.by_n:
            self.by_n[n_value] = {
                name: self.alloc(concrete_shape(shape, n_value), dtype=self.dtype)
                for name, shape in self.program.buffers.items()
            }
        return self.by_n[n_value]
