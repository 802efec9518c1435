"""The CPU backend's runtime: compiled kernels called by address from one fixed driver.

Every formula is compiled once into a C-callable kernel ``void kernel(int64 *frame, int64 begin,
int64 end)``: ``frame`` points at the addresses and sizes of its buffers, its other sizes, and
the addresses of the scalars it reads (``cpu_backend`` prints the code that reads it);
``begin, end`` is the range of its outer loop's iterations to run (its *units*: rows of an
elementwise loop or an image kernel, entries of a flat loop, columns of a column sum, rows of a
product's output). A step is a table of frames, one row per kernel of the program,
``[kernel address, units, split, frame...]``; the driver (``run_table``, called through
``driver()``) calls them in order. The driver is compiled once per machine, not per model: a
model costs only its formulas that are not yet in the cache. Compiled code is saved and loaded
by ``objects``, so a warm process never starts Numba's compiler.

Threads come from the driver, not from the kernels: ``Pool`` runs the same table on ``t``
threads at once, thread ``k`` calling each *split* kernel on its ``k``-th share of the units
and every other kernel only on thread 0, with a spin barrier (in the driver's IR) wherever a
split kernel starts or ends. One kernel, one compiled loop, serial or threaded.

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

#: A kernel's C signature: ``void kernel(int64 *frame, int64 begin, int64 end)``.
SIGNATURE = types.void(types.CPointer(types.int64), types.int64, types.int64)

#: The driver's: ``void run(table address, rows, width, thread, threads, barrier address)``.
RUN_SIGNATURE = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64)

#: A step table row's fields before the kernel's frame: its address, units, split flag.
HEADER = 3

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

    def __init__(self, py_func, signature=SIGNATURE, llvm: str | None = None):
        self.py_func, self.signature, self.llvm = py_func, signature, llvm
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
        compiled = numba.cfunc(self.signature, error_model="numpy")(self.py_func)
        self._keep = compiled
        return compiled._library, compiled.native_name

    def will_compile(self) -> bool:
        """Whether ``address`` compiles: not compiled or loaded yet, and no saved machine code."""
        if self._address is not None or numba.config.DISABLE_JIT:
            return False
        return not objects.object_path(self.stem).is_file()

    def inspect(self, what: str) -> str:
        """LLVM IR or assembly (of a copy compiled for the purpose: loaded code has no IR to show)."""
        library, _ = self._compile()
        return library.get_llvm_str() if what == "llvm" else library.get_asm_str()


def kernel(signature=SIGNATURE, llvm: str | None = None):
    """Decorator for a generated kernel ``def k(frame, begin, end): ...`` (``llvm``: the same
    kernel as LLVM IR)."""
    return lambda py_func: Kernel(py_func, signature, llvm)


def share(units: int, thread: int, threads: int) -> tuple:
    """``(begin, end)``: thread ``thread``'s contiguous share of ``units`` iterations (the driver's
    arithmetic, which every backend test reuses).

    >>> [share(10, k, 3) for k in range(3)]
    [(0, 3), (3, 6), (6, 10)]
    """
    return units * thread // threads, units * (thread + 1) // threads


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

    def run_table(address, rows, width, thread=0, threads=1, barrier=0):
        """The driver in Python: every kernel on its whole range (one thread)."""
        table = np.frombuffer((ctypes.c_int64 * (rows * width)).from_address(address), np.int64).reshape(rows, width)
        for row in table:
            if row[1] > 0:
                _PYTHON_KERNELS[row[0]](row[HEADER:], 0, row[1])

    def driver():
        return run_table

    def serial_driver():
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
    def _call(typingctx, addr, frame, begin, end):
        """Call ``void f(int64 *frame, int64 begin, int64 end)`` at address ``addr``."""
        sig = types.void(addr, frame, begin, end)

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            fnty = ir.FunctionType(ir.VoidType(), [i64.as_pointer(), i64, i64])
            builder.call(builder.inttoptr(args[0], fnty.as_pointer()),
                         [builder.inttoptr(args[1], i64.as_pointer()), args[2], args[3]])
            return context.get_dummy_value()

        return sig, codegen

    def run_table(address, rows, width, thread, threads, barrier):
        """Run a step: the table at ``address`` has ``rows`` rows ``[kernel address, units, split,
        frame...]`` of ``width`` int64 each (the reference ``RUN_TABLE_IR`` follows; it alone has
        the barrier, so this one runs single-threaded only)."""
        table = carray(as_ptr(address, numba.int64), (rows * width,))
        for pc in range(rows):
            units = table[pc * width + 1]
            if units > 0:
                _call(table[pc * width], address + 8 * (pc * width + HEADER), 0, units)

    #: ``run_table`` as LLVM IR: what runs (LLVM compiles it in milliseconds). Thread ``thread`` of
    #: ``threads`` runs its share of each split kernel and, on thread 0 only, the other kernels;
    #: a sense-reversing spin barrier (``[count, generation]`` at ``barrier``) runs before every
    #: kernel that is split or follows a split one, so each kernel reads what the last wrote.
    RUN_TABLE_IR = """
declare i32 @sched_yield()
PAUSE_DECLARE
define void @symdl_run_table(i64 %table, i64 %rows, i64 %width, i64 %thread, i64 %threads, i64 %barrier) {
entry:
  %any = icmp sgt i64 %rows, 0
  %many = icmp sgt i64 %threads, 1
  %count.ptr = inttoptr i64 %barrier to i64*
  %generation.address = add i64 %barrier, 64
  %generation.ptr = inttoptr i64 %generation.address to i64*
  %last.arrival = sub i64 %threads, 1
  %first = icmp eq i64 %thread, 0
  br i1 %any, label %loop, label %done
loop:
  %pc = phi i64 [0, %entry], [%next, %after]
  %previous.split = phi i64 [0, %entry], [%split, %after]
  %start = mul i64 %pc, %width
  %offset = mul i64 %start, 8
  %address = add i64 %table, %offset
  %row = inttoptr i64 %address to i64*
  %kernel = load i64, i64* %row
  %units.ptr = getelementptr i64, i64* %row, i64 1
  %units = load i64, i64* %units.ptr
  %split.ptr = getelementptr i64, i64* %row, i64 2
  %split.flag = load i64, i64* %split.ptr
  %split = select i1 %many, i64 %split.flag, i64 0
  %either = or i64 %split, %previous.split
  %wait = icmp ne i64 %either, 0
  br i1 %wait, label %arrive, label %share
arrive:
  %generation = load atomic i64, i64* %generation.ptr acquire, align 8
  %arrived = atomicrmw add i64* %count.ptr, i64 1 acq_rel
  %last = icmp eq i64 %arrived, %last.arrival
  br i1 %last, label %release, label %spin
release:
  store atomic i64 0, i64* %count.ptr monotonic, align 8
  %generation.next = add i64 %generation, 1
  store atomic i64 %generation.next, i64* %generation.ptr release, align 8
  br label %share
spin:
  %spins = phi i64 [0, %arrive], [%spins.next, %spin.more], [%spins.next, %yield]
  %now = load atomic i64, i64* %generation.ptr acquire, align 8
  %same = icmp eq i64 %now, %generation
  br i1 %same, label %spin.more, label %share
spin.more:
  PAUSE_CALL
  %spins.next = add i64 %spins, 1
  %yield.due = icmp ugt i64 %spins.next, 512
  br i1 %yield.due, label %yield, label %spin
yield:
  %ignored = call i32 @sched_yield()
  br label %spin
share:
  %is.split = icmp ne i64 %split, 0
  br i1 %is.split, label %part, label %whole
part:
  %low = mul i64 %units, %thread
  %begin.split = sdiv i64 %low, %threads
  %thread.next = add i64 %thread, 1
  %high = mul i64 %units, %thread.next
  %end.split = sdiv i64 %high, %threads
  br label %call.maybe
whole:
  %end.whole = select i1 %first, i64 %units, i64 0
  br label %call.maybe
call.maybe:
  %begin = phi i64 [%begin.split, %part], [0, %whole]
  %end = phi i64 [%end.split, %part], [%end.whole, %whole]
  %nonempty = icmp slt i64 %begin, %end
  br i1 %nonempty, label %call, label %after
call:
  %call.fn = inttoptr i64 %kernel to void (i64*, i64, i64)*
  %frame = getelementptr i64, i64* %row, i64 3
  call void %call.fn(i64* %frame, i64 %begin, i64 %end)
  br label %after
after:
  %next = add i64 %pc, 1
  %more = icmp slt i64 %next, %rows
  br i1 %more, label %loop, label %done
done:
  ret void
}
"""
    import platform as _platform

    if _platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
        RUN_TABLE_IR = RUN_TABLE_IR.replace("PAUSE_DECLARE", "declare void @llvm.x86.sse2.pause()").replace(
            "PAUSE_CALL", "call void @llvm.x86.sse2.pause()")
    else:
        RUN_TABLE_IR = RUN_TABLE_IR.replace("PAUSE_DECLARE", "").replace("PAUSE_CALL", "")

    _RUN = Kernel(run_table, RUN_SIGNATURE, llvm=RUN_TABLE_IR)

    #: The driver on one thread, ``void run(table address, rows, width)``: what a serial step calls
    #: (three arguments, not six: on a 12 µs step each ctypes argument shows).
    RUN_SERIAL_IR = ("define void @symdl_run_serial(i64 %table, i64 %rows, i64 %width) {\nentry:\n"
                     "  call void @symdl_run_table_one(i64 %table, i64 %rows, i64 %width, i64 0, i64 1, i64 0)\n"
                     "  ret void\n}\n"
                     + RUN_TABLE_IR.replace("define void @symdl_run_table(", "define internal void @symdl_run_table_one("))

    def run_serial(address, rows, width):
        """``run_table`` on one thread (``RUN_SERIAL_IR`` is what runs)."""
        run_table(address, rows, width, 0, 1, 0)

    _RUN_SERIAL = Kernel(run_serial, types.void(types.int64, types.int64, types.int64), llvm=RUN_SERIAL_IR)

    @functools.cache
    def serial_driver():
        """The compiled one-thread driver as a ctypes function ``(table, rows, width)``."""
        return ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 3)(_RUN_SERIAL.address)

    @functools.cache
    def driver():
        """The compiled ``run_table`` as a ctypes function (which releases the GIL while it runs)."""
        return ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 6)(_RUN.address)


def run(frames: np.ndarray, threads: int = 1) -> None:
    """Run the step table ``frames`` (C-contiguous int64, one row per kernel) on ``threads``
    threads (``pool``); ``Runner`` calls the pool with the table's address directly."""
    frames = np.ascontiguousarray(frames, np.int64)
    pool().run(frames.ctypes.data, frames.shape[0], frames.shape[1], threads)


class Pool:
    """Threads that run a step table together: thread 0 is the caller, the others wait on a
    semaphore between steps (they spin only inside a step, at the driver's barriers).

    One pool per process (``pool()``), one step at a time (a lock), so two models trained from
    two Python threads take turns rather than sharing one barrier. Rebuilt after a ``fork``.
    """

    def __init__(self):
        import os
        import threading

        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._workers: list = []
        self._done = threading.Semaphore(0)
        self._job = None
        self._barrier = np.zeros(16, np.int64)  # count at [0], generation at [8]: separate cache lines

    def _grow(self, helpers: int) -> None:
        import threading

        while len(self._workers) < helpers:
            go = threading.Semaphore(0)
            index = len(self._workers) + 1
            thread = threading.Thread(target=self._work, args=(go, index), name=f"symdl-step-{index}", daemon=True)
            self._workers.append(go)
            thread.start()

    def _work(self, go, index: int) -> None:
        run = driver()
        while True:
            go.acquire()
            table, rows, width, threads = self._job
            try:
                run(table, rows, width, index, threads, self._barrier.ctypes.data)
            finally:
                self._done.release()

    def run(self, table: int, rows: int, width: int, threads: int) -> None:
        """Run the table at address ``table`` on ``threads`` threads (1: this one alone)."""
        if threads <= 1 or numba.config.DISABLE_JIT:
            serial_driver()(table, rows, width)
            return
        run = driver()
        with self._lock:
            self._grow(threads - 1)
            self._job = (table, rows, width, threads)
            for go in self._workers[: threads - 1]:
                go.release()
            try:
                run(table, rows, width, 0, threads, self._barrier.ctypes.data)
            finally:
                for _ in range(threads - 1):
                    self._done.acquire()


_POOL: list = []


def pool() -> Pool:
    """The process's step pool (a new one in a forked child: threads do not survive ``fork``)."""
    import os

    if not _POOL or _POOL[0]._pid != os.getpid():
        _POOL[:] = [Pool()]
    return _POOL[0]


__all__ = ["HEADER", "Kernel", "Pool", "SIGNATURE", "as_ptr", "carray", "driver", "kernel", "load_f64", "math",
           "pool", "run", "serial_driver", "share"]
