"""What every backend shares: the ``Runner`` contract, dtypes, buffer names and the arenas.

Buffers live in two flat arrays ("arenas"): the *persistent* one holds parameters
and optimizer state for the whole run; a *work* arena per batch size holds every
intermediate. Each buffer is an aligned C-contiguous view. A compiled step then
takes a handful of arrays instead of one per buffer (Numba's dispatch cost grows
with the argument count), and the layout code below is the one the generated
code repeats, so Python and compiled code agree on every offset.
"""
from __future__ import annotations

import numpy as np

from ..ir.kernels import Program, at_batch

DTYPES = {"float32": np.float32, "float64": np.float64}
ALIGN = 16  # elements: 64 bytes in float32, 128 in float64


def as_dtype(dtype) -> np.dtype:
    """``"float32"``/``"float64"`` (or the NumPy types) as a NumPy dtype; anything else is an error."""
    try:
        key = np.dtype(dtype).name
    except TypeError:
        key = None
    if key not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return np.dtype(DTYPES[key])


def concrete_shape(shape, n_value: int) -> tuple:
    """A buffer's symbolic shape at batch size ``n_value``."""
    return tuple(at_batch(d, n_value) for d in shape)


def aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    """Named buffers as aligned views into one flat zero-initialised array."""

    def __init__(self, shapes: dict, n_value: int, dtype, alloc=np.zeros):
        self.offsets, self.shapes, pos = {}, {}, 0
        for name, shape in shapes.items():
            r, c = concrete_shape(shape, n_value)
            self.offsets[name], self.shapes[name] = pos, (r, c)
            pos += aligned(r * c)
        self.flat = alloc(max(pos, ALIGN), dtype=dtype)
        self.views = {
            name: self.flat[o : o + r * c].reshape(r, c)
            for (name, o), (r, c) in zip(self.offsets.items(), self.shapes.values())
        }


class Workspace:
    """The work arena for each batch size seen (allocated once, reused every step)."""

    def __init__(self, shapes: dict, dtype, alloc=np.zeros):
        self.shapes, self.dtype, self.alloc = shapes, dtype, alloc
        self.by_n = {}

    def get(self, n_value: int) -> Arena:
        if n_value not in self.by_n:
            self.by_n[n_value] = Arena(self.shapes, n_value, self.dtype, self.alloc)
        return self.by_n[n_value]


def buf(name: str) -> str:
    """The local variable holding buffer ``name`` in generated code."""
    return f"b_{name}"


def indent(lines, depth: int = 1) -> list:
    """``lines`` indented by ``depth`` levels of four spaces."""
    return [" " * (4 * depth) + l for l in lines]


class Runner:
    """A program compiled for one backend. The contract every backend keeps:

    * ``call(external, scalars, n) -> float``: the hot path. ``external`` are the arrays of
      ``program.externals`` in order, ``scalars`` the values of ``program.scalars``; returns
      the ``"loss"`` output (0.0 when the program has none).
    * ``run(external: dict, scalars: dict, n) -> {output name: ndarray}``: the same call by
      name, returning every output as a host array (valid until the next call).
    * ``output(name, n)``: one buffer after the last call at batch size ``n``, on the host.
    * ``persistent_arrays(spec)``: arrays that read and write the persistent buffers.
    * ``will_compile(n)``: whether a call at batch size ``n`` compiles first (``fit`` says so).
    * ``source``: the generated module.
    """

    source = ""

    def __init__(self, program: Program, dtype):
        self.program, self.dtype = program, as_dtype(dtype)
        self.persist = Arena(program.persistent, 0, self.dtype)
        self.workspace = Workspace(program.buffers, self.dtype)
        self.external = program.externals
        self.scalar_names = [str(s) for s in program.scalars]

    def call(self, external: list, scalars: list, n: int) -> float:
        raise NotImplementedError

    def run(self, external: dict, scalars: dict, n: int) -> dict:
        self.call([external[k] for k in self.external], [scalars[s] for s in self.scalar_names], n)
        return {name: self.output(b, n) for name, b in self.program.outputs.items()}

    def buffers(self, n_value: int) -> dict:
        """Every host buffer by name at batch size ``n_value`` (views: reading them costs nothing)."""
        return {**self.persist.views, **self.workspace.get(n_value).views}

    def output(self, name: str, n_value: int):
        """One buffer after a call at batch size ``n_value``."""
        return self.buffers(n_value)[name]

    def persistent_arrays(self, spec: dict) -> dict:
        """``{key: array}`` for ``spec = {key: (buffer name, shape)}``; writes reach the compiled step."""
        return {key: self.persist.views[name].reshape(shape) for key, (name, shape) in spec.items()}

    def will_compile(self, n: int) -> bool:
        """Whether the first call at batch size ``n`` compiles code (a moment or more)."""
        return False

    def inspect(self, what: str, n: int) -> str:
        raise ValueError(f"inspect needs backend='cpu' (this program runs on {type(self).__module__})")
