"""The Numba CPU backend: one compiled kernel per *formula*, and a small step that calls them.

* Each kernel is reduced to its formula (``formulas.formula``: buffers become slots,
  sizes become runtime values) and compiled once into its own cached module: every
  hidden layer's activation, every parameter's update, every bias gradient's column
  sum is one compiled function, whatever the model's depth or widths.
* A step is a table of frames, one row per kernel: the address of its formula's compiled
  kernel, its units (the iterations of its outer loop), whether threads split it, and the
  addresses and sizes of its buffers at this batch size. One fixed driver
  (``cpu_runtime.run_table``, compiled once per machine) calls them in order, so a second model
  of another depth or width built from the same formulas compiles nothing.
* Every GEMM of every model calls one prebuilt kernel per dtype (``cpu_gemm``: BLAS
  with the orientation and ``alpha`` from its frame, loops when tiny); no copies.
  Elementwise kernels are explicit ``i, j`` loops; reductions accumulate in float64.
* Threads come from the driver: in a step with enough work (``threaded``), every
  thread runs the table and takes its share of each large kernel's units (rows, entries, a
  column sum's columns, a product's rows: ``units``), BLAS held to one thread; otherwise
  one thread runs the step and BLAS threads its products. One kernel per formula, never a
  serial and a threaded twin; no two threads write one entry.
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
from . import runtime as cpu_runtime, llvm_code, llvm_gather, llvm_image  # noqa: F401 - llvm_image, llvm_gather register their printers
from ...graph.nodes import n as N
from ...ir.kernels import (
    BlockGemm, ColumnCopy, Elementwise, Gather, Gemm, ImageKernel, Program, ReduceAll, ReduceCols, ReduceLogSumExp, ReduceRows, Reshape,
    ScatterAdd, Update, at_batch,
)
from ..base import Runner as RunnerBase, Workspace, buf, indent
from ..formulas import Formula, formula, runs_flat, slot
from ..image_code import loop_rows as image_loop_rows, row_body as image_row_body
from .llvm_code import SLOT_FIELDS
from ..scalar_code import dims as _dims, helper_source, loop_body

#: A step runs on its threads when its work (multiply-adds and elements x operations, all kernels)
#: is at least this at its usual batch size: below it, waking the threads costs more than they save
#: (``benchmarks/threads.py`` measures both ways; docs/performance.md has the table).
THREAD_MIN_WORK = 1 << 22

#: In a threaded step, a kernel with at least this work is split across the threads; a smaller one
#: runs on thread 0 alone while the others wait at the next barrier. Each kernel timed alone
#: (benchmarks/threads.py) put the cost of a split at 2-4 µs, but that includes waking the second
#: thread; inside a running step the threads are awake, and splitting down to 2^15 made the GPT step
#: (hundreds of 768-row loops, docs/performance.md) 44.5 -> 39.8 ms with no loss elsewhere.
SPLIT_MIN_WORK = 1 << 15

#: ... and only when its loops (not products) are at least this share of the step's work: on
#: product-heavy steps (every MLP measured) BLAS's own threads did as well or better.
THREAD_MIN_LOOP_SHARE = 0.1

#: The outer loop over a kernel's units: the range the driver gives this call.
OUTER = "for i in range(_begin, _end):"


@singledispatch
def emit(kernel, program: Program, flavor: str) -> list:
    """A kernel's loops as Python lines (the readable view, and what runs under
    ``NUMBA_DISABLE_JIT``), its outer loop over ``range(_begin, _end)`` of its ``units``: one
    handler per kernel class (``ir.KERNELS``) but ``Gemm``, which every product's prebuilt
    ``cpu_gemm`` kernel computes (``kernel_source``). The LLVM printers (``llvm_code``) print the
    same loops."""
    raise NotImplementedError(f"cpu backend: no printer for {type(kernel).__name__}")


@singledispatch
def units(kernel, program: Program) -> sp.Expr:
    """The iterations of a kernel's outer loop, which the step's threads share: one handler per
    kernel class, as ``emit`` and the LLVM printers loop."""
    raise NotImplementedError(f"cpu backend: no units for {type(kernel).__name__}")


@emit.register(Elementwise)
@emit.register(Update)
def _emit_loop(k, program, flavor):
    if runs_flat(k):  # one loop over buffers viewed as vectors: long, so LLVM vectorises it (a conv
        lines, _ = loop_body(k, flavor, flat=True)  # layer's 6 channels would be a 6-long inner loop)
        return [OUTER] + indent(lines)
    cols = _dims(program.shape_of(k.out))[1]
    lines, _ = loop_body(k, flavor)
    return [OUTER, f"    for j in range({cols}):"] + indent(lines, 2)


@units.register(Elementwise)
@units.register(Update)
def _loop_units(k, program):
    rows, cols = program.shape_of(k.out)
    return sp.sympify(rows * cols if runs_flat(k) else rows)


def _reduction_parts(k, flavor) -> tuple:
    """``(body lines, value, rows, cols, out)``: what a reduction's loops are printed from."""
    body, result = loop_body(k, flavor)
    rows, cols = _dims(k.shape)
    return body, result, rows, cols, buf(k.out)


@emit.register
def _reduce_all(k: ReduceAll, program, flavor):
    body, result, rows, cols, out = _reduction_parts(k, flavor)
    return ["_acc = 0.0", f"for i in range({rows}):", f"    for j in range({cols}):", *indent(body, 2),
            f"        _acc += {result}", f"{out}[0, 0] = _acc"]


@units.register
def _reduce_all_units(k: ReduceAll, program):
    return sp.Integer(1)  # one thread sums, in one order: the loss is reproducible


@emit.register
def _reduce_cols(k: ReduceCols, program, flavor):
    body, result, rows, cols, out = _reduction_parts(k, flavor)
    return [OUTER, "    _acc = 0.0", f"    for j in range({cols}):", *indent(body, 2),
            f"        _acc += {result}", f"    {out}[i, 0] = _acc"]


@emit.register
def _reduce_log_sum_exp(k: ReduceLogSumExp, program, flavor):
    body, result, rows, cols, out = _reduction_parts(k, flavor)
    return [OUTER, "    _mx = -np.inf", f"    for j in range({cols}):", *indent(body, 2),
            f"        _mx = max(_mx, {result})", "    _acc = 0.0", f"    for j in range({cols}):", *indent(body, 2),
            f"        _acc += math.exp({result} - _mx)", f"    {out}[i, 0] = _mx + math.log(_acc)"]


@units.register(ReduceCols)
@units.register(ReduceLogSumExp)
def _row_units(k, program):
    return sp.sympify(k.shape[0])


@emit.register
def _reduce_rows(k: ReduceRows, program, flavor):
    """Units: the output's columns; a thread adds every row into its own columns, in order."""
    body, result, rows, cols, out = _reduction_parts(k, flavor)
    return ["for j in range(_begin, _end):", f"    {out}[0, j] = 0.0", f"for i in range({rows}):",
            "    for j in range(_begin, _end):", *indent(body, 2), f"        {out}[0, j] += {result}"]


@units.register
def _reduce_rows_units(k: ReduceRows, program):
    return sp.sympify(k.shape[1])


@emit.register(ImageKernel)
@emit.register(Reshape)
def _image(k, program, flavor):
    """One iteration per output row (pixel), or per window of a pooling gradient; no two
    iterations write one entry (``image_code``)."""
    cols = _dims(program.shape_of(k.out))[1]
    return [OUTER] + indent(image_row_body(k, cols))


@units.register(ImageKernel)
@units.register(Reshape)
def _image_units(k, program):
    return sp.sympify(program.shape_of(image_loop_rows(k))[0])


@emit.register
def _gather(k: Gather, program, flavor):
    """One iteration per output row: the id (an exact integer in the float dtype), then its row."""
    table, ids = (buf(o.buffer) for o in k.operands)
    cols = _dims(program.shape_of(k.out))[1]
    return [OUTER, f"    _r = int({ids}[i, 0])", f"    for j in range({cols}):",
            f"        {buf(k.out)}[i, j] = {table}[_r, j]"]


@emit.register
def _scatter_add(k: ScatterAdd, program, flavor):
    """Units: the output's columns; a thread zeroes its columns, then adds every row of ``G`` into
    row ``ids[i]`` of them, in order (a repeated id accumulates; no two threads write one entry)."""
    ids, G = (buf(o.buffer) for o in k.operands)
    out = buf(k.out)
    vocab = _dims(program.shape_of(k.out))[0]
    rows = _dims(program.shape_of(k.operands[1].buffer))[0]
    return [f"for v in range({vocab}):", "    for j in range(_begin, _end):", f"        {out}[v, j] = 0.0",
            f"for i in range({rows}):", f"    _r = int({ids}[i, 0])", "    for j in range(_begin, _end):",
            f"        {out}[_r, j] += {G}[i, j]"]


@units.register
def _scatter_add_units(k: ScatterAdd, program):
    return sp.sympify(program.shape_of(k.out)[1])


@emit.register
def _column_copy(k: ColumnCopy, program, flavor):
    """One iteration per row: the row's other columns zeroed, then its slice copied."""
    out, x = buf(k.out), buf(k.operands[0].buffer)
    cols = _dims(program.shape_of(k.out))[1]
    return [OUTER, f"    for j in range({cols}):", f"        {out}[i, j] = 0.0", f"    for j in range({k.width}):",
            f"        {out}[i, {k.at} + j] = {x}[i, {k.start} + j]"]


@units.register(Gemm)
@units.register(Gather)
@units.register(ColumnCopy)
def _output_row_units(k, program):
    return sp.sympify(program.shape_of(k.out)[0])  # rows of the output (of a product: split by rows)


@units.register
def _block_gemm_units(k: BlockGemm, program):
    return k.blocks(program)  # the blocks (sequences)


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
    """The module of one formula: ``formula_kernel``, ``void(int64 *frame, int64 begin, int64 end)``,
    printed as LLVM IR (``LLVM_IR``, what runs) and as the same loops in Python (what you read,
    and what runs under ``NUMBA_DISABLE_JIT`` or when a function has no LLVM builder). Sizes are
    runtime values, so every use of the formula (any layer, any width, any model) calls the same
    compiled code. A matrix product's module names the prebuilt ``cpu_gemm`` kernel of its dtype."""
    if isinstance(f.kernel, Gemm):
        return (f"# generated by symdl (cpu backend, {dtype}): every matrix product, one prebuilt kernel\n"
                "# s0[begin:end] = alpha*op(s1)[begin:end] @ op(s2), op and alpha from the frame (cpu_gemm)\n"
                f"from symdl.backends.cpu.gemm import gemm_{dtype} as formula_kernel\n")
    if isinstance(f.kernel, BlockGemm):
        return (f"# generated by symdl (cpu backend, {dtype}): every product within sequences, one prebuilt kernel\n"
                "# for blocks s in begin:end: s0[s] = alpha*op(s1[s]) @ op(s2[s]), s the rows of sequence s\n"
                f"from symdl.backends.cpu.gemm import block_gemm_{dtype} as formula_kernel\n")
    lines = _prologue(f, dtype) + emit(f.kernel, f.program, flavor)
    llvm = llvm_code.kernel_ir(f, dtype)
    header = "@kernel()\n"
    if llvm is not None:
        header = 'LLVM_IR = """' + llvm + '"""\n\n\n@kernel(llvm=LLVM_IR)\n'
    return (
        f"# generated by symdl (cpu backend, {dtype}): one formula, compiled once for every use\n"
        f"# {f.program}\n"
        "import math\n\nimport numba\nimport numpy as np\n\n"
        "from symdl.backends.cpu.runtime import as_ptr, carray, kernel, load_f64\n"
        + "\n" + _helpers(f.program, flavor) + "\n" + header
        + "def formula_kernel(frame, _begin, _end):\n" + "\n".join(indent(lines)) + "\n"
    )


def listing(program: Program, uses: list, ops: list) -> str:
    """The program as comments: each kernel, its shape and the formula it calls."""
    lines = ["# the step: cpu_runtime.run_table calls, in order, each kernel's formula k<i> on its buffers"]
    for k, f, op in zip(program.kernels, uses, ops):
        shape = "(" + ", ".join(map(str, program.shape_of(k.out))) + ")"
        lines.append(f"# {k.out} {shape}: {k.kind} -> k{op}({', '.join(f.slots)}){program.note(k.out)}")
    return "\n".join(lines) + "\n"


def threaded(program: Program, n_value: int) -> bool:
    """Whether a step at ``n_value`` runs on the step's threads (BLAS held to one thread) rather
    than on one thread (BLAS threading its products).

    Two spinning thread pools on a small machine starve each other (docs/performance.md), so
    a step uses one: its own threads when its work is large (``THREAD_MIN_WORK``) and not all
    products (``THREAD_MIN_LOOP_SHARE``: a CNN), each taking a share of every large kernel,
    products split by rows; one thread otherwise, BLAS threading the products (an MLP).
    """
    total = loops = 0
    for k in program.kernels:
        work = program.work(k, n_value)
        total += work
        loops += 0 if isinstance(k, Gemm) else work
    return total >= THREAD_MIN_WORK and loops >= THREAD_MIN_LOOP_SHARE * total


class Runner(RunnerBase):
    """Runs the step as a table of frames; BLAS's threads and the step's are never both busy.

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

    def kernels(self) -> list:
        """The compiled kernels (``cpu_runtime.Kernel``) the step calls, one per formula."""
        return [m.formula_kernel for m in self.kernel_modules]

    def frames(self, n: int, parallel: bool) -> np.ndarray:
        """The step at batch size ``n``: one row per kernel, ``[kernel address, units, split,
        frame...]`` (``cpu_runtime``; the frame as ``_prologue`` reads it). ``split``: whether the
        threads of a ``parallel`` step share the kernel (its work is at least ``SPLIT_MIN_WORK``).
        Getting an address compiles the kernel or loads it from the cache."""
        work = self.workspace.get(n)
        kernels = self.kernels()
        scalar_address = self._scal.ctypes.data
        rows = []
        for op, f, k in zip(self.ops, self.uses, self.program.kernels):
            count = at_batch(units(k, self.program), n)
            split = parallel and count > 1 and self.program.work(k, n) >= SPLIT_MIN_WORK
            row = [kernels[op].address, count, int(split)]
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
            where = [i * frames.shape[1] + cpu_runtime.HEADER + SLOT_FIELDS * j for i, f in enumerate(self.uses)
                     for j, b in enumerate(f.slots) if b == name]
            spots.append((np.array(where, dtype=np.intp), view.__array_interface__["data"][0]))
        return spots

    def uses_parallel(self, n: int) -> bool:
        """Whether a call at batch size ``n`` runs on the step's threads (``threaded``).

        The first batch size seen is the model's usual one and decides; a smaller batch (the
        short last one) keeps its choice.
        """
        if n not in self._use_parallel:
            if self._usual is None:
                self._usual = n
            self._use_parallel[n] = threaded(self.program, max(n, self._usual))
        return self._use_parallel[n]

    def will_compile(self, n: int) -> bool:
        """Whether the first call at batch size ``n`` compiles (a kernel neither in memory nor on disk)."""
        if n in self._ready or numba.config.DISABLE_JIT:
            return False
        return any(k.will_compile() for k in self.kernels())

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
        count = threads.get_num_threads() if parallel else 1
        if count > 1:  # the step's threads split its loops and products: BLAS keeps to one
            with threads.blas_single_threaded():
                cpu_runtime.pool().run(*table, count)
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
                self._driver = cpu_runtime.serial_driver()
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
        return "\n".join(k.inspect(what) for k in self.kernels())


def compile_program(program: Program, dtype) -> Runner:
    return Runner(program, dtype)


def _helpers(program: Program, flavor: str) -> str:
    """The scalar helpers a formula's bodies call (dropout's uniform, float32 ``tanh``: see
    ``formulas.scalars``), defined in its module."""
    return helper_source(program, flavor, '@numba.njit(inline="always", error_model="numpy", cache=True)')


# --------------------------------------------------------------------------- recurrence
# ``ir.Scan`` / ``ir.ScanGrad``: units are the sequences; each runs its steps in order (``scan_code``).
# ``llvm_scan`` prints the same loops as LLVM IR.
from ...ir.kernels import Scan, ScanGrad  # noqa: E402
from . import llvm_scan  # noqa: E402,F401 - registers the LLVM printers of Scan and ScanGrad
from ..scan_code import sequence_lines  # noqa: E402


def _scan_sizes(k, program) -> tuple:
    """``(T, u)`` as code: the step count (a size of the formula) and the units (``U``'s rows)."""
    if isinstance(k, ScanGrad):
        return sp.pycode(sp.sympify(k.steps[0])), _dims(program.shape_of(k.operands[4].buffer))[0]
    return sp.pycode(sp.sympify(k.steps[0])), _dims(program.shape_of(k.operands[1].buffer))[1]  # Uᵀ


@emit.register(Scan)
@emit.register(ScanGrad)
def _scan(k, program, flavor):
    T, u = _scan_sizes(k, program)
    return [OUTER] + indent(sequence_lines(k, program, flavor, T, u))


@units.register(Scan)
@units.register(ScanGrad)
def _scan_units(k, program):
    return sp.sympify(program.shape_of(k.out)[0] / k.steps[0])
