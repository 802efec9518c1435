"""The Numba CPU backend: one compiled kernel per *formula*, and a small step that calls them.

* Each kernel is reduced to its formula (``formulas.formula``: buffers become slots,
  sizes become runtime values) and compiled once into its own cached module: every
  hidden layer's activation, every parameter's update, every bias gradient's column
  sum is one compiled function, whatever the model's depth or widths.
* A step is a table of frames, one row per kernel: the address of its formula's compiled
  kernel and the addresses and sizes of its buffers at this batch size. One fixed driver
  (``cpu_runtime.run_table``, compiled once per machine) calls them in order, so a second model
  of another depth or width built from the same formulas compiles nothing.
* Every GEMM of every model calls one prebuilt kernel per dtype (``cpu_gemm``: BLAS
  with the orientation and ``alpha`` from its frame, loops when tiny); no copies.
  Elementwise kernels are explicit ``i, j`` loops; reductions accumulate in float64.
* Loops over large arrays use ``prange`` (see ``PARALLEL_MIN_WORK``); a column-sum
  parallelises over the output column, never with two threads writing one element.
* The whole step (forward, backward, update) is one call into compiled code; its
  buffers are views into the arenas (``base.Arena``).

Modules are written to the compile cache (``cache.module_path``) and imported from
there; each kernel's machine code is saved beside its module (``objects``), so a second
process loads it without starting Numba's compiler.
"""
from __future__ import annotations

from functools import singledispatch

import numba
import numpy as np
import sympy as sp

from .. import cache, threads
from . import runtime as cpu_runtime, llvm_code, llvm_image  # noqa: F401 - llvm_image registers its printers
from ...graph.nodes import n as N
from ...ir.kernels import (
    Elementwise, Gemm, ImageKernel, Program, ReduceAll, ReduceCols, ReduceLogSumExp, ReduceRows, Reshape, Update,
    at_batch,
)
from ..base import Runner as RunnerBase, Workspace, buf, indent
from ..formulas import Formula, formula, runs_flat, slot
from ..image_code import loop_rows as image_loop_rows, row_body as image_row_body
from .llvm_code import SLOT_FIELDS
from ..scalar_code import dims as _dims, helper_source, loop_body

#: Loops whose estimated work (elements x operations) is at least this use ``prange``.
PARALLEL_MIN_WORK = 1 << 17


def _loop(rows, var, parallel: bool) -> str:
    return f"for {var} in {'numba.prange' if parallel else 'range'}({rows}):"


def _branch(condition: sp.Expr, threshold: int, below, above) -> list:
    """``below`` or ``above`` when ``condition`` is a number; otherwise an ``if`` on it."""
    if not condition.free_symbols:
        return above if int(condition) >= threshold else below
    return [f"if {sp.pycode(condition)} >= {threshold}:"] + indent(above) + ["else:"] + indent(below)


def _parallel_branches(program, kernel, make) -> tuple:
    """``(serial, parallel)``: the serial code, and for the threaded step the same code
    beside a ``prange`` copy taken when the work is large."""
    serial = make(False)
    return serial, _branch(program.work_expr(kernel), PARALLEL_MIN_WORK, serial, make(True))


@singledispatch
def emit(kernel, program: Program, flavor: str) -> tuple:
    """``(serial lines, parallel lines)`` of a kernel's loops (its body printed once for both): one
    handler per kernel class (``ir.KERNELS``) but ``Gemm``, which every product's prebuilt
    ``cpu_gemm`` kernel computes (``kernel_source``)."""
    raise NotImplementedError(f"cpu backend: no printer for {type(kernel).__name__}")


#: Entries per ``prange`` iteration of a flat loop.
FLAT_CHUNK = 4096


def _flat_loop(size: str, parallel: bool) -> list:
    """``for i`` over ``size`` entries: ``prange`` over chunks of ``FLAT_CHUNK`` when parallel.

    Chunks, not ``prange(size)`` itself: with Numba 0.68 a ``prange`` that indexes a 1-D
    ``carray`` directly with its own variable wrote nothing in a cfunc (measured; a test runs
    both variants of every flat formula against NumPy).
    """
    if not parallel:
        return [f"for i in range({size}):"]
    return [f"for _chunk in numba.prange(({size} + {FLAT_CHUNK - 1}) // {FLAT_CHUNK}):",
            f"    for i in range(_chunk * {FLAT_CHUNK}, min({size}, _chunk * {FLAT_CHUNK} + {FLAT_CHUNK})):"]


@emit.register(Elementwise)
@emit.register(Update)
def _emit_loop(k, program, flavor):
    rows, cols = _dims(program.shape_of(k.out))
    if runs_flat(k):  # one loop over buffers viewed as vectors: long, so LLVM vectorises it (a conv
        lines, _ = loop_body(k, flavor, flat=True)  # layer's 6 channels would be a 6-long inner loop)
        def make(par):
            header = _flat_loop(f"{rows} * {cols}", par)
            return header + indent(lines, len(header))

        return _parallel_branches(program, k, make)
    lines, _ = loop_body(k, flavor)
    return _parallel_branches(program, k, lambda par: [_loop(rows, "i", par), f"    for j in range({cols}):"]
                              + indent(lines, 2))


def _reduction_parts(k, flavor) -> tuple:
    """``(body lines, value, rows, cols, out)``: what a reduction's loops are printed from."""
    body, result = loop_body(k, flavor)
    rows, cols = _dims(k.shape)
    return body, result, rows, cols, buf(k.out)


@emit.register
def _reduce_all(k: ReduceAll, program, flavor):
    body, result, rows, cols, out = _reduction_parts(k, flavor)
    # numba turns ``acc +=`` inside prange into a race-free reduction
    return _parallel_branches(program, k, lambda par: [
        "_acc = 0.0", _loop(rows, "i", par), f"    for j in range({cols}):", *indent(body, 2),
        f"        _acc += {result}", f"{out}[0, 0] = _acc"])


@emit.register
def _reduce_cols(k: ReduceCols, program, flavor):
    body, result, rows, cols, out = _reduction_parts(k, flavor)
    return _parallel_branches(program, k, lambda par: [
        _loop(rows, "i", par), "    _acc = 0.0", f"    for j in range({cols}):", *indent(body, 2),
        f"        _acc += {result}", f"    {out}[i, 0] = _acc"])


@emit.register
def _reduce_log_sum_exp(k: ReduceLogSumExp, program, flavor):
    body, result, rows, cols, out = _reduction_parts(k, flavor)
    return _parallel_branches(program, k, lambda par: [
        _loop(rows, "i", par), "    _mx = -np.inf", f"    for j in range({cols}):", *indent(body, 2),
        f"        _mx = max(_mx, {result})", "    _acc = 0.0", f"    for j in range({cols}):", *indent(body, 2),
        f"        _acc += math.exp({result} - _mx)", f"    {out}[i, 0] = _mx + math.log(_acc)"])


@emit.register
def _reduce_rows(k: ReduceRows, program, flavor):
    body, result, rows, cols, out = _reduction_parts(k, flavor)

    def make(par):
        if par:  # each thread owns whole output columns (no two threads write one element)
            return [_loop(cols, "j", True), "    _acc = 0.0", f"    for i in range({rows}):",
                    *indent(body, 2), f"        _acc += {result}", f"    {out}[0, j] = _acc"]
        return [f"for j in range({cols}):", f"    {out}[0, j] = 0.0", f"for i in range({rows}):",
                f"    for j in range({cols}):", *indent(body, 2), f"        {out}[0, j] += {result}"]

    return _parallel_branches(program, k, make)


@emit.register(ImageKernel)
@emit.register(Reshape)
def _image(k, program, flavor):
    """One loop over the output rows (pixels), or over the windows of a pooling gradient, ``prange``
    when the work is large; no two iterations write one entry (``image_code``)."""
    cols = _dims(program.shape_of(k.out))[1]
    rows = _dims(program.shape_of(image_loop_rows(k)))[0]
    body = image_row_body(k, cols)
    return _parallel_branches(program, k, lambda par: [_loop(rows, "i", par)] + indent(body))


#: Inputs at least this large are read where they lie; smaller ones are copied into the work
#: arena, which is cheaper than reading an array's address (a few µs in Python).
IN_PLACE_MIN_BYTES = 1 << 15



def _prologue(f: Formula, dtype: str) -> list:
    """Bind a formula's slots, sizes and scalars from its frame (``cpu_runtime``).

    The frame is ``[(address, rows, cols) per slot, sizes..., scalar addresses...]``;
    ``Runner.frames`` writes it in this order.
    """
    width = SLOT_FIELDS * len(f.slots) + len(f.size_symbols) + len(f.scalars)
    lines = [f"f = carray(frame, ({max(width, 1)},))"]
    flat = runs_flat(f.kernel)  # buffers viewed as vectors (``_emit_loop``)
    for i in range(len(f.slots)):
        at = SLOT_FIELDS * i
        r, c = f"_rows{i}", f"_cols{i}"  # the names formulas.formula gives slot i's sizes
        shape = f"({r} * {c},)" if flat else f"({r}, {c})"
        lines += [f"{r} = f[{at + 1}]", f"{c} = f[{at + 2}]",
                  f"{buf(slot(i))} = carray(as_ptr(f[{at}], numba.{dtype}), {shape})"]
    at = SLOT_FIELDS * len(f.slots)
    lines += [f"{sym} = f[{at + k}]" for k, sym in enumerate(f.size_symbols)]
    at += len(f.size_symbols)
    lines += [f"{s} = load_f64(f[{at + k}])" for k, s in enumerate(f.scalars)]
    return lines


def kernel_source(f: Formula, flavor: str, dtype: str) -> str:
    """The module of one formula: ``kernel_serial`` and ``kernel_parallel`` (``prange`` on
    large loops), each ``void(int64 *frame)``. Sizes are runtime values, so every use of the
    formula (any layer, any width, any model) calls the same compiled code. A matrix
    product's module names the prebuilt ``cpu_gemm`` kernel of its dtype."""
    if isinstance(f.kernel, Gemm):
        return (f"# generated by symdl (cpu backend, {dtype}): every matrix product, one prebuilt kernel\n"
                "# s0 = alpha*op(s1) @ op(s2), op and alpha from the frame (cpu_gemm)\n"
                f"from symdl.backends.cpu.gemm import gemm_{dtype} as kernel_serial\n\n"
                "kernel_parallel = kernel_serial  # BLAS threads itself\n")
    serial, parallel = emit(f.kernel, f.program, flavor)
    prologue = _prologue(f, dtype)
    llvm = llvm_code.kernel_ir(f, dtype)  # what runs serially; the Python below is the same loop, read
    header = "@kernel(parallel=False)\n"
    if llvm is not None:
        header = 'LLVM_SERIAL = """' + llvm + '"""\n\n\n@kernel(parallel=False, llvm=LLVM_SERIAL)\n'
    functions = header + "def kernel_serial(frame):\n" + "\n".join(indent(prologue + serial)) + "\n"
    if parallel == serial:  # nothing to thread (a GEMM: BLAS threads itself)
        functions += "\n\nkernel_parallel = kernel_serial\n"
    else:
        functions += ("\n\n@kernel(parallel=True)\ndef kernel_parallel(frame):\n"
                      + "\n".join(indent(prologue + parallel)) + "\n")
    return (
        f"# generated by symdl (cpu backend, {dtype}): one formula, compiled once for every use\n"
        f"# {f.program}\n"
        "import math\n\nimport numba\nimport numpy as np\n\n"
        "from symdl.backends.cpu.runtime import as_ptr, carray, kernel, load_f64\n"
        + "\n" + _helpers(f.program, flavor) + "\n" + functions
    )


def listing(program: Program, uses: list, ops: list) -> str:
    """The program as comments: each kernel, its shape and the formula it calls."""
    lines = ["# the step: cpu_runtime.run_table calls, in order, each kernel's formula k<i> on its buffers"]
    for k, f, op in zip(program.kernels, uses, ops):
        shape = "(" + ", ".join(map(str, program.shape_of(k.out))) + ")"
        lines.append(f"# {k.out} {shape}: {k.kind} -> k{op}({', '.join(f.slots)}){program.note(k.out)}")
    return "\n".join(lines) + "\n"


def max_work(program: Program, n_value: int) -> int:
    """The largest loop's work (elements x operations) at batch size ``n_value``."""
    return max((program.work(k, n_value) for k in program.kernels if not isinstance(k, Gemm)), default=0)


def loops_dominate(program: Program, n_value: int) -> bool:
    """Whether a step at ``n_value`` should thread its loops (and keep BLAS to one thread).

    Two spinning thread pools on a small machine starve each other, so a step uses
    one: BLAS threads when matrix products dominate (every MLP measured: serial loops
    about ten times faster than both pools, docs/performance.md), Numba threads only when
    elementwise loops both dominate the work and are large.
    """
    loops = gemms = 0
    for k in program.kernels:
        if isinstance(k, Gemm):
            gemms += program.work(k, n_value)
        else:
            loops += program.work(k, n_value)
    return loops > gemms and max_work(program, n_value) >= PARALLEL_MIN_WORK


class Runner(RunnerBase):
    """Runs the step as a table of frames; BLAS and Numba threads are coordinated.

    The frames of a batch size are computed once: every buffer lives at a fixed address
    for the runner's lifetime. Externals (inputs, parameters passed per call) are copied
    into the work arena, except large ones, whose addresses are written into the frames
    at each call (``IN_PLACE_MIN_BYTES``; one that is not C-contiguous in the runner's
    dtype is still copied).
    """

    def __init__(self, program: Program, dtype):
        super().__init__(program, dtype)
        flavor = "scalar32" if self.dtype == np.float32 else "scalar"
        self.uses = [formula(k, program) for k in program.kernels]
        printed, sources = {}, []  # a deep net uses each formula many times: print it once
        for f in self.uses:
            key = f.key
            if key not in printed:
                printed[key] = kernel_source(f, flavor, self.dtype.name)
            sources.append(printed[key])
        self.kernel_sources = sorted(set(sources), key=lambda s: cache.key(s, "cpu"))
        self.ops = [self.kernel_sources.index(s) for s in sources]
        self._load()
        self.workspace = Workspace({**program.buffers, **{e: program.shape_of(e) for e in self.external}}, self.dtype)
        index = {s: i for i, s in enumerate(program.scalars)}
        index[N] = len(program.scalars)
        self._scalar_index = index
        self._scal = np.zeros(len(program.scalars) + 1)  # scalar values, then n: kernels read them by address
        self._usual = None  # the first batch size seen: the model's usual one
        self._use_parallel = {}  # batch size -> whether the step threads its loops
        self._ready = {}  # batch size -> (frames, flat view, external views, external spots, loss view, parallel)

    @property
    def source(self) -> str:
        """The step's listing (each kernel, its shape, its formula and what ``explain`` calls it),
        then every formula's module."""
        return "\n\n".join([listing(self.program, self.uses, self.ops), *(
            f"# ---- k{i}: {m.__name__}\n{s}" for i, (m, s) in enumerate(zip(self.kernel_modules, self.kernel_sources)))])

    def _load(self):
        self.kernel_modules = [cache.load_module(s, backend="cpu") for s in self.kernel_sources]

    def kernels(self, parallel: bool) -> list:
        """The compiled kernels (``cpu_runtime.Kernel``) a step variant calls, one per formula."""
        return [m.kernel_parallel if parallel else m.kernel_serial for m in self.kernel_modules]

    def frames(self, n: int, parallel: bool) -> np.ndarray:
        """The step at batch size ``n``: one row per kernel, ``[kernel address, frame...]``
        (see ``_prologue``). Getting an address compiles the kernel or loads it from the cache."""
        work = self.workspace.get(n)
        kernels = self.kernels(parallel)
        scalar_address = self._scal.ctypes.data
        rows = []
        for op, f in zip(self.ops, self.uses):
            row = [kernels[op].address]
            for b in f.slots:
                arena = self.persist if b in self.persist.offsets else work
                r, c = arena.shapes[b]
                row += [arena.flat.ctypes.data + arena.offsets[b] * self.dtype.itemsize, r, c]
            row += [at_batch(d, n) for d in f.sizes]
            row += [scalar_address + 8 * self._scalar_index[s] for s in f.scalars]
            row += f.constants
            rows.append(row)
        table = np.zeros((len(rows), max((len(r) for r in rows), default=1)), np.int64)
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        return table

    def _external_spots(self, frames: np.ndarray, views: list) -> list:
        """For each external read in place: where its address sits in the flattened frames, and
        the address of its copy in the work arena (for an array not already contiguous and
        typed). None for a small external: copying it costs less than finding its address."""
        spots = []
        for name, view in zip(self.external, views):
            if view.nbytes < IN_PLACE_MIN_BYTES:
                spots.append(None)
                continue
            where = [i * frames.shape[1] + 1 + SLOT_FIELDS * j for i, f in enumerate(self.uses)  # 1: the kernel
                     for j, b in enumerate(f.slots) if b == name]
            spots.append((np.array(where, dtype=np.intp), view.__array_interface__["data"][0]))
        return spots

    def uses_parallel(self, n: int) -> bool:
        """Whether a call at batch size ``n`` runs the threaded kernels.

        The first batch size seen is the model's usual one and picks the variant; a
        smaller batch (the short last one) keeps it, so it never compiles the other.
        """
        if n not in self._use_parallel:
            if self._usual is None:
                self._usual = n
            self._use_parallel[n] = loops_dominate(self.program, max(n, self._usual))
        return self._use_parallel[n]

    def will_compile(self, n: int) -> bool:
        """Whether the first call at batch size ``n`` compiles (a kernel neither in memory nor on disk)."""
        if n in self._ready or numba.config.DISABLE_JIT:
            return False
        return any(k.will_compile() for k in self.kernels(self.uses_parallel(n)))

    def call(self, external: list, scalars: list, n: int) -> float:
        """The hot path: externals and scalars in the program's order."""
        ready = self._ready.get(n)
        if ready is None:
            return self._first_call(external, scalars, n)
        frames, flat, views, spots, loss, parallel, table = ready
        for view, array, spot in zip(views, external, spots):
            if spot is None:  # small: copied, and the frames point at the copy for good
                view[...] = array
            elif array.dtype == self.dtype and array.flags.c_contiguous and array.shape == view.shape:
                flat[spot[0]] = array.__array_interface__["data"][0]  # read in place, no copy
            else:
                view[...] = array
                flat[spot[0]] = spot[1]
        scal = self._scal
        scal[:-1] = scalars
        scal[-1] = n
        if parallel:
            with threads.blas_single_threaded():
                self._driver(*table)
        else:
            self._driver(*table)
        return float(loss[0, 0]) if loss is not None else 0.0

    def _first_call(self, external, scalars, n):
        """The first call at a batch size compiles its kernels or loads them from Numba's
        cache; corrupt cache entries are deleted and the modules reloaded, once."""
        parallel = self.uses_parallel(n)
        arena = self.workspace.get(n)
        views = [arena.views[e] for e in self.external]
        out = self.program.outputs.get("loss")
        loss = self.buffers(n)[out] if out is not None else None
        for attempt in (1, 2):
            try:
                frames = self.frames(n, parallel)
                self._driver = cpu_runtime.driver()
                table = (frames.ctypes.data, *frames.shape)  # the driver's arguments
                self._ready[n] = (frames, frames.reshape(-1), views, self._external_spots(frames, views), loss,
                                  parallel, table)
                return self.call(external, scalars, n)
            except Exception:
                self._ready.pop(n, None)
                if attempt == 2:
                    raise
                for s in self.kernel_sources:
                    cache.clear_compiled(cache.module_path(s, "cpu"))
                self._load()

    def inspect(self, what: str, n: int) -> str:
        """LLVM IR or assembly of the kernels the step ran at batch size ``n``, one per formula."""
        if numba.config.DISABLE_JIT:
            raise RuntimeError("inspect needs the JIT (NUMBA_DISABLE_JIT is set)")
        return "\n".join(k.inspect(what) for k in self.kernels(self.uses_parallel(n)))


def compile_program(program: Program, dtype) -> Runner:
    return Runner(program, dtype)


def _helpers(program: Program, flavor: str) -> str:
    """The scalar helpers a formula's bodies call (dropout's uniform, float32 ``tanh``: see
    ``formulas.scalars``), defined in its module."""
    return helper_source(program, flavor, '@numba.njit(inline="always", error_model="numpy", cache=True)')
