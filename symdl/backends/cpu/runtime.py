"""The CPU backend's runtime: compiled kernels called by address from one fixed driver.

Every formula is compiled once into a C-callable kernel (``numba.cfunc``) that takes one
argument, a pointer to its *frame*: the addresses and sizes of its buffers, its other
sizes, and the addresses of the scalars it reads (``cpu_backend`` prints the code that
reads it). A step is a table of frames, one row per kernel of the program, each row
starting with the kernel's address; the driver (``run_table``, called through ``driver()``)
calls them in order. The driver is compiled once per machine, not per model: a model costs
only its formulas that are not yet in the cache. Compiled code is saved and loaded by
``objects``, so a warm process never starts Numba's compiler.

Under ``NUMBA_DISABLE_JIT=1`` the same generated code runs as plain Python: ``kernel``
returns the function itself, "addresses" index ``_PYTHON_KERNELS``, and ``carray`` and
``as_ptr`` read memory through ``ctypes``.
"""
from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .. import cache
from . import llvm_code, objects

#: A kernel's C signature: ``void kernel(int64 *frame)``.
SIGNATURE = types.void(types.CPointer(types.int64))

#: The driver's: ``void run(int64 table_address, int64 rows, int64 width)``.
RUN_SIGNATURE = types.void(types.int64, types.int64, types.int64)

_PYTHON_KERNELS: list = []


class Kernel:
    """A formula's compiled kernel, compiled (or loaded from the compile cache) on first use of
    ``address``, so a step variant nobody runs never compiles.

    ``llvm``: the kernel printed as LLVM IR (``llvm_code``), compiled by LLVM alone in tens of
    milliseconds; ``py_func`` is then the same kernel as Python, run under
    ``NUMBA_DISABLE_JIT``. Without it, Numba compiles ``py_func`` (about ten times slower).
    The machine code is saved beside the formula's module (``objects``) and loaded from
    there by later processes without starting a compiler. Kernels of symdl's own modules
    (the driver, the products) are saved under ``cache.prebuilt_dir``.
    """

    def __init__(self, py_func, parallel: bool, signature=SIGNATURE, llvm: str | None = None):
        self.py_func, self.parallel, self.signature, self.llvm = py_func, parallel, signature, llvm
        self._address = None
        self.compiled = False  # whether this process compiled it (False: loaded from the cache)

    @property
    def stem(self) -> Path:
        """Where its machine code is saved, less the machine suffix (``objects.object_path``)."""
        source = Path(self.py_func.__code__.co_filename)
        generated = self.py_func.__module__.startswith("symdl_")  # a formula's module: its name is its key
        folder = source.parent if generated else cache.prebuilt_dir(source)
        name = f"{self.py_func.__module__}.{self.py_func.__name__}"
        if self.llvm is not None and not generated:  # IR printed by code outside the file: keyed on it too
            name += "." + cache.key(self.llvm, "llvm")[:16]
        return folder / name

    @property
    def address(self) -> int:
        if self._address is not None:
            return self._address
        if numba.config.DISABLE_JIT:
            _PYTHON_KERNELS.append(self.py_func)
            self._address = len(_PYTHON_KERNELS) - 1
            return self._address
        stem = self.stem
        try:
            self._address = objects.load(stem)
        except Exception:  # unreadable or unloadable code: compiled afresh below, the file replaced
            self._address = None
        if self._address is None:
            library, symbol = self._compile()
            self._address, self.compiled = library.get_pointer_to_function(symbol), True
            if not self._address:
                raise RuntimeError(f"compiled {self.py_func.__module__}.{self.py_func.__name__}, but its entry "
                                   f"point {symbol!r} has no address")
            objects.save(stem, library, symbol)
        return self._address

    def _compile(self):
        """``(library, entry symbol)``: LLVM compiles the printed IR; Numba the Python function
        (also when the IR calls a function the JIT engine does not know)."""
        if self.llvm is not None:
            symbol = llvm_code.entry_symbol(self.llvm)
            library = objects.compile_llvm(self.llvm, symbol)
            if library is not None:
                return library, symbol
        compiled = numba.cfunc(self.signature, error_model="numpy", parallel=self.parallel)(self.py_func)
        self._keep = compiled
        return compiled._library, compiled.native_name

    def will_compile(self) -> bool:
        """Whether ``address`` compiles: not compiled or loaded yet, and no saved machine code."""
        if self._address is not None or numba.config.DISABLE_JIT:
            return False
        return not objects.object_path(self.stem).is_file()

    def inspect(self, what: str) -> str:
        """LLVM IR or assembly (of a twin compiled for the purpose: loaded code has no IR to show)."""
        library, _ = self._compile()
        return library.get_llvm_str() if what == "llvm" else library.get_asm_str()


def kernel(parallel: bool = False, signature=SIGNATURE, llvm: str | None = None):
    """Decorator for a generated kernel ``def k(frame): ...`` (``llvm``: the same kernel as LLVM IR)."""
    return lambda py_func: Kernel(py_func, parallel, signature, llvm)


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

    def run_table(address, rows, width):
        table = np.frombuffer((ctypes.c_int64 * (rows * width)).from_address(address), np.int64).reshape(rows, width)
        for row in table:
            _PYTHON_KERNELS[row[0]](row[1:])

    def driver():
        return run_table

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
        """Call ``void f(int64 *frame)`` at address ``addr`` with the frame at address ``frame``."""
        sig = types.void(addr, frame)

        def codegen(context, builder, signature, args):
            i64p = ir.IntType(64).as_pointer()
            fnty = ir.FunctionType(ir.VoidType(), [i64p])
            builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.inttoptr(args[1], i64p)])
            return context.get_dummy_value()

        return sig, codegen

    def run_table(address, rows, width):
        """Run a step: the table at ``address`` has ``rows`` rows ``[kernel address, frame...]``
        of ``width`` int64 each."""
        table = carray(as_ptr(address, numba.int64), (rows * width,))
        for pc in range(rows):
            _call(table[pc * width], address + 8 * (pc * width + 1))

    #: ``run_table`` as LLVM IR: what runs (LLVM compiles it in milliseconds, Numba in 0.2 s).
    RUN_TABLE_IR = """
define void @symdl_run_table(i64 %table, i64 %rows, i64 %width) {
entry:
  %any = icmp sgt i64 %rows, 0
  br i1 %any, label %loop, label %done
loop:
  %pc = phi i64 [0, %entry], [%next, %loop]
  %start = mul i64 %pc, %width
  %offset = mul i64 %start, 8
  %address = add i64 %table, %offset
  %row = inttoptr i64 %address to i64*
  %kernel = load i64, i64* %row
  %call = inttoptr i64 %kernel to void (i64*)*
  %frame = getelementptr i64, i64* %row, i64 1
  call void %call(i64* %frame)
  %next = add i64 %pc, 1
  %more = icmp slt i64 %next, %rows
  br i1 %more, label %loop, label %done
done:
  ret void
}
"""

    _RUN = Kernel(run_table, False, RUN_SIGNATURE, llvm=RUN_TABLE_IR)

    @functools.cache
    def driver():
        """The compiled ``run_table`` as a ctypes function (which releases the GIL while it runs)."""
        return ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)(_RUN.address)


def run(frames: np.ndarray) -> None:
    """Run the step table ``frames`` (C-contiguous int64, one row per kernel); ``Runner`` calls
    ``driver()`` with the table's address directly."""
    frames = np.ascontiguousarray(frames, np.int64)
    driver()(frames.ctypes.data, *frames.shape)


__all__ = ["Kernel", "SIGNATURE", "as_ptr", "carray", "driver", "kernel", "load_f64", "math", "run"]
