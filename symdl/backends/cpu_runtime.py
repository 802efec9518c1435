"""The CPU backend's runtime: compiled kernels called by address from one fixed driver.

Every formula is compiled once into a C-callable kernel (``numba.cfunc``) that takes one
argument, a pointer to its *frame*: the addresses and sizes of its buffers, its other
sizes, and the addresses of the scalars it reads (``cpu_backend`` prints the code that
reads it). A step is a table of frames, one row per kernel of the program, each row
starting with the kernel's address; ``run(frames)`` calls them in order. ``run`` is
compiled once per machine, not per model: a model costs only its formulas that are not
yet in the cache.

Under ``NUMBA_DISABLE_JIT=1`` the same generated code runs as plain Python: ``kernel``
returns the function itself, "addresses" index ``_PYTHON_KERNELS``, and ``carray`` and
``as_ptr`` read memory through ``ctypes``.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

#: A kernel's C signature: ``void kernel(int64 *frame)``.
SIGNATURE = types.void(types.CPointer(types.int64))

_PYTHON_KERNELS: list = []


class Kernel:
    """A formula's compiled kernel, compiled (or loaded from Numba's cache) on first use of
    ``address``, so a step variant nobody runs never compiles."""

    def __init__(self, py_func, parallel: bool):
        self.py_func, self.parallel = py_func, parallel
        self._cfunc = None
        self.compiled = False  # whether this process compiled it (False: loaded from the cache)

    @property
    def address(self) -> int:
        if numba.config.DISABLE_JIT:
            if self._cfunc is None:
                _PYTHON_KERNELS.append(self.py_func)
                self._cfunc = len(_PYTHON_KERNELS) - 1
            return self._cfunc
        if self._cfunc is None:
            self._cfunc = numba.cfunc(SIGNATURE, cache=True, error_model="numpy", parallel=self.parallel)(self.py_func)
            self.compiled = self._cfunc.cache_hits == 0
        return self._cfunc.address

    def will_compile(self) -> bool:
        """Whether ``address`` compiles: not compiled or loaded yet, and no Numba cache index
        for it beside its module."""
        if self._cfunc is not None or numba.config.DISABLE_JIT:
            return False
        folder = Path(self.py_func.__code__.co_filename).parent / "__pycache__"
        return not any(folder.glob(f"*.{self.py_func.__name__}-*.nbi"))

    def inspect(self, what: str) -> str:
        """LLVM IR or assembly (an uncached twin: Numba cannot show code it loaded from its cache)."""
        twin = numba.cfunc(SIGNATURE, error_model="numpy", parallel=self.parallel)(self.py_func)
        return twin.inspect_llvm() if what == "llvm" else twin._library.get_asm_str()  # CFunc has no inspect_asm


def kernel(parallel: bool = False):
    """Decorator for a generated kernel ``def k(frame): ...``."""
    return lambda py_func: Kernel(py_func, parallel)


if numba.config.DISABLE_JIT:  # plain Python: pointers are (address, dtype) pairs read through ctypes

    def as_ptr(addr, dtype):
        return int(addr), np.dtype(str(dtype))

    def carray(ptr, shape):
        if isinstance(ptr, np.ndarray):  # the frame itself
            return ptr
        addr, dtype = ptr
        size = int(np.prod(shape)) * dtype.itemsize
        return np.frombuffer((ctypes.c_char * size).from_address(addr), dtype).reshape(tuple(int(s) for s in shape))

    def load_f64(addr):
        return ctypes.c_double.from_address(int(addr)).value

    def run(frames):
        for row in frames:
            _PYTHON_KERNELS[row[0]](row[1:])
        return 0

else:
    from numba import carray  # noqa: F401 - the generated kernels import it from here

    @intrinsic
    def as_ptr(typingctx, addr, dtype):
        """An int64 address as a typed pointer (``carray`` views it as an array)."""
        sig = types.CPointer(dtype.dtype)(addr, dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    @intrinsic
    def load_f64(typingctx, addr):
        """The float64 at an int64 address (a scalar the step writes before each call)."""
        sig = types.float64(addr)

        def codegen(context, builder, signature, args):
            return builder.load(builder.inttoptr(args[0], ir.DoubleType().as_pointer()))

        return sig, codegen

    @intrinsic
    def _call(typingctx, addr, frame):
        """Call ``void f(int64 *frame)`` at ``addr`` with the data of the 1-D array ``frame``."""
        sig = types.void(addr, frame)

        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64).as_pointer()])
            data = context.make_array(signature.args[1])(context, builder, args[1]).data
            builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [data])
            return context.get_dummy_value()

        return sig, codegen

    @numba.njit(cache=True, nogil=True)
    def run(frames):
        """Run a step: each row is ``[kernel address, frame...]``."""
        for pc in range(frames.shape[0]):
            _call(frames[pc, 0], frames[pc, 1:])
        return 0


__all__ = ["Kernel", "SIGNATURE", "as_ptr", "carray", "kernel", "load_f64", "math", "run"]
