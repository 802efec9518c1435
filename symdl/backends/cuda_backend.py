"""The CUDA backend: the same kernel list printed as ``numba.cuda`` kernels.

* ``Elementwise`` and ``Update``: one thread per entry, the fused body inlined.
* ``Gemm``: a register-tiled shared-memory GEMM; a transposed operand is read with
  swapped indices (four variants, ``gemm_nn/tn/nt/tt``), never copied.
* ``Reduction``: shared-memory tree reductions, deterministic, no atomics; column
  sums give each block a strip of columns, row reductions one block per row.
* Image kernels and ``Reshape``: one thread per output row (``image_code``).
* Parameters, optimizer state and workspace stay on the device (two arenas); a
  step copies its batch in and only the loss back. ``train.params`` gives host
  copies that write back to the device when assigned.

Launch shapes come from the buffer shapes at the batch size being run. Tile
and block sizes are module constants: large on a GPU, small under Numba's CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``), which runs every thread as a Python thread.
The kernel code is the same in both.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import singledispatch

import numpy as np

from . import cache
from ..ir.kernels import (
    BlockGemm, ColumnCopy, Elementwise, Gather, Gemm, ImageKernel, Program, ReduceAll, ReduceCols, ReduceLogSumExp, ReduceRows, Reshape,
    ScatterAdd, Update,
)
from .base import Runner as RunnerBase, buf, concrete_shape, indent
from .image_code import loop_rows as image_loop_rows, row_body as image_row_body
from .scalar_code import dims as _dims, helper_source, loop_body


class CudaUnavailable(RuntimeError):
    """``backend="cuda"`` on a machine where Numba finds no usable GPU."""


def simulating() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def check_available() -> None:
    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None:  # an optional extra, not a hard dependency
        raise CudaUnavailable(
            "backend='cuda' needs NVIDIA's numba-cuda, which is not installed: pip install 'symdl[cuda]' "
            "(it is needed for Numba's CUDA simulator, NUMBA_ENABLE_CUDASIM=1, too). Or use backend='cpu'."
        )
    from numba import cuda

    if simulating():
        return
    try:
        ok = cuda.is_available()
    except Exception as exc:  # a broken driver install raises rather than answering False
        ok, why = False, str(exc)
    else:
        why = "numba.cuda.is_available() is False"
    if not ok:
        raise CudaUnavailable(
            f"backend='cuda' needs an NVIDIA GPU with a working driver, and Numba found none ({why}). "
            "Use backend='cpu', or set NUMBA_ENABLE_CUDASIM=1 before importing symdl to run the CUDA "
            "kernels in Numba's simulator (slow; for testing)."
        )


def _scalar_params(program):
    return [str(s) for s in program.scalars]


# --------------------------------------------------------------------------- kernel printers
# Each printer returns (kernel definition lines, launch lines for the step function).


@singledispatch
def emit(kernel, program: Program, index: int) -> tuple:
    """``(kernel definition lines, launch lines)`` of program kernel ``index``: one handler per
    kernel class (``ir.KERNELS``)."""
    raise NotImplementedError(f"cuda backend: no printer for {type(kernel).__name__}")


def _operand_args(operands):
    return list(dict.fromkeys(buf(o.buffer) for o in operands))


def _signature(out_bufs, operands, program, extra=()):
    return list(dict.fromkeys(list(out_bufs) + _operand_args(operands))) + ["R", "C", "n"] + \
        _scalar_params(program) + list(extra)


@emit.register(Elementwise)
@emit.register(Update)
def _emit_thread_per_entry(k, program, index):
    """One thread per entry: the loop body every scalar backend shares, under a grid index."""
    outs = [buf(b) for b, _ in k.writes] if isinstance(k, Update) else [buf(k.out)]
    name = f"k{index}_{k.kind}" + (f"_{k.out}" if isinstance(k, Update) else "")
    args = _signature(outs, k.operands, program)
    lines, _ = loop_body(k, "scalar")
    body = ["idx = cuda.grid(1)", "if idx < R * C:", "    i = idx // C", "    j = idx - i * C"] + indent(lines)
    rows, cols = _dims(program.shape_of(k.out))
    return _kernel(name, args, body), _launch_1d(name, args, rows, cols)


@emit.register
def _gemm(k: Gemm, program, index):
    variant = f"gemm_{'t' if k.trans_a else 'n'}{'t' if k.trans_b else 'n'}"
    rows, cols = _dims(program.shape_of(k.out))
    inner = _dims(program.shape_of(k.a))[0 if k.trans_a else 1]
    launch = [f"{variant}[((({cols}) + TN - 1) // TN, (({rows}) + TM - 1) // TM), (TN // RN, TM // RM)]"
              f"({buf(k.a)}, {buf(k.b)}, {buf(k.out)}, {rows}, {cols}, {inner}, {float(k.alpha)!r})"]
    return [], launch


def _reduction_parts(k, program, index) -> tuple:
    """``(name, args, reads, value, rows, cols, out)``: what a reduction kernel is printed from."""
    name = f"k{index}_{k.label}"
    reads, result = loop_body(k, "scalar")
    rows, cols = _dims(k.shape)
    return name, _signature([buf(k.out)], k.operands, program), reads, result, rows, cols, buf(k.out)


@emit.register
def _reduce_rows(k: ReduceRows, program, index):
    """Block = (RX columns, RY row groups): each column summed by RY threads, then a tree."""
    name, args, reads, result, rows, cols, out = _reduction_parts(k, program, index)
    body = ["sm = cuda.shared.array((RY, RX), ACC)", "tx = cuda.threadIdx.x", "ty = cuda.threadIdx.y",
            "j = cuda.blockIdx.x * RX + tx", "acc = 0.0", "if j < C:", "    for i in range(ty, R, RY):",
            *indent(reads, 2), f"        acc += {result}", "sm[ty, tx] = acc", "cuda.syncthreads()",
            "s = RY // 2", "while s > 0:", "    if ty < s:", "        sm[ty, tx] += sm[ty + s, tx]",
            "    cuda.syncthreads()", "    s //= 2", "if ty == 0 and j < C:", f"    {out}[0, j] = sm[0, tx]"]
    launch = [f"{name}[((({cols}) + RX - 1) // RX,), (RX, RY)]({', '.join(_call_args(args, rows, cols))})"]
    return _kernel(name, args, body), launch


@emit.register
def _reduce_all(k: ReduceAll, program, index):
    """One block strides over every entry, then a tree."""
    name, args, reads, result, rows, cols, out = _reduction_parts(k, program, index)
    body = ["sm = cuda.shared.array(TR, ACC)", "tid = cuda.threadIdx.x", "acc = 0.0",
            "for idx in range(tid, R * C, TR):", "    i = idx // C", "    j = idx - i * C", *indent(reads, 1),
            f"    acc += {result}", "sm[tid] = acc", "cuda.syncthreads()", *_tree("sm[tid] += sm[tid + s]"),
            "if tid == 0:", f"    {out}[0, 0] = sm[0]"]
    launch = [f"{name}[1, TR]({', '.join(_call_args(args, rows, cols))})"]
    return _kernel(name, args, body), launch


def _by_row(name, args, rows, cols, body) -> tuple:
    """A reduction run one block per row (``i``), its threads striding over the columns."""
    head = ["sm = cuda.shared.array(TR, ACC)", "tid = cuda.threadIdx.x", "i = cuda.blockIdx.x"]
    launch = [f"{name}[{rows}, TR]({', '.join(_call_args(args, rows, cols))})"]
    return _kernel(name, args, head + body), launch


@emit.register
def _reduce_cols(k: ReduceCols, program, index):
    name, args, reads, result, rows, cols, out = _reduction_parts(k, program, index)
    return _by_row(name, args, rows, cols, [
        "acc = 0.0", "for j in range(tid, C, TR):", *indent(reads, 1), f"    acc += {result}",
        "sm[tid] = acc", "cuda.syncthreads()", *_tree("sm[tid] += sm[tid + s]"),
        "if tid == 0:", f"    {out}[i, 0] = sm[0]"])


@emit.register
def _reduce_log_sum_exp(k: ReduceLogSumExp, program, index):
    """The row's max (a tree), then the sum of ``exp(x - max)`` (another)."""
    name, args, reads, result, rows, cols, out = _reduction_parts(k, program, index)
    return _by_row(name, args, rows, cols, [
        "mx = -math.inf", "for j in range(tid, C, TR):", *indent(reads, 1),
        f"    mx = max(mx, {result})", "sm[tid] = mx", "cuda.syncthreads()",
        *_tree("sm[tid] = max(sm[tid], sm[tid + s])"), "mx = sm[0]", "cuda.syncthreads()", "acc = 0.0",
        "for j in range(tid, C, TR):", *indent(reads, 1), f"    acc += math.exp({result} - mx)",
        "sm[tid] = acc", "cuda.syncthreads()", *_tree("sm[tid] += sm[tid + s]"), "if tid == 0:",
        f"    {out}[i, 0] = mx + math.log(sm[0])"])


@emit.register(ImageKernel)
@emit.register(Reshape)
def _image(k, program, index):
    """One thread per output row (a pixel, all its channels), or per window of a pooling
    gradient, so no two threads write one entry (``image_code``)."""
    name = f"k{index}_{k.kind}"
    cols = _dims(program.shape_of(k.out))[1]
    rows = _dims(program.shape_of(image_loop_rows(k)))[0]
    args = list(dict.fromkeys([buf(k.out)] + [buf(o.buffer) for o in k.operands])) + ["R"]
    body = ["i = cuda.grid(1)", "if i < R:"] + indent(image_row_body(k, cols))
    launch = [f"{name}[((({rows}) + TPB - 1) // TPB,), TPB]({', '.join(args[:-1])}, ({rows}))"]
    return _kernel(name, args, body), launch


def _entry_kernel(k, program, index, reads, lines):
    """A kernel with one thread per output entry ``(i, j)``: ``lines`` compute it from ``reads``."""
    name = f"k{index}_{k.kind}"
    rows, cols = _dims(program.shape_of(k.out))
    args = list(dict.fromkeys([buf(k.out), *reads])) + ["R", "C"]
    body = ["idx = cuda.grid(1)", "if idx < R * C:", "    i = idx // C", "    j = idx - i * C"] + indent(lines)
    return _kernel(name, args, body), _launch_1d(name, args, rows, cols)


@emit.register
def _gather(k: Gather, program, index):
    """One thread per output entry ``(i, j)``: entry ``j`` of table row ``ids[i]``."""
    table, ids = (buf(o.buffer) for o in k.operands)
    return _entry_kernel(k, program, index, [table, ids], [f"{buf(k.out)}[i, j] = {table}[int({ids}[i, 0]), j]"])


@emit.register
def _scatter_add(k: ScatterAdd, program, index):
    """One thread per output column: it zeroes the column, then adds the rows of ``G`` in order
    (deterministic, no atomics; a repeated id accumulates)."""
    name = f"k{index}_{k.kind}"
    vocab, cols = _dims(program.shape_of(k.out))
    rows = _dims(program.shape_of(k.operands[1].buffer))[0]
    ids, G = (buf(o.buffer) for o in k.operands)
    out = buf(k.out)
    args = list(dict.fromkeys([out, ids, G])) + ["V", "R", "C"]
    body = ["j = cuda.grid(1)", "if j < C:", "    for v in range(V):", f"        {out}[v, j] = 0.0",
            "    for i in range(R):", f"        {out}[int({ids}[i, 0]), j] += {G}[i, j]"]
    launch = [f"{name}[((({cols}) + TPB - 1) // TPB,), TPB]({', '.join(args[:-3])}, ({vocab}), ({rows}), ({cols}))"]
    return _kernel(name, args, body), launch


@emit.register
def _column_copy(k: ColumnCopy, program, index):
    """One thread per output entry: its source entry, or 0 outside the copied columns."""
    out, x = buf(k.out), buf(k.operands[0].buffer)
    return _entry_kernel(k, program, index, [x], [
        f"if {k.at} <= j < {k.at + k.width}:", f"    {out}[i, j] = {x}[i, j - {k.at} + {k.start}]",
        "else:", f"    {out}[i, j] = 0.0"])


@emit.register
def _block_gemm(k: BlockGemm, program, index):
    """One thread per output entry ``(i, j)``: the dot product within row ``i``'s block (sequence)."""
    inner = _dims((k.inner(program),))[0]
    ro, ra, rb = k.rows
    a, b, out = buf(k.a), buf(k.b), buf(k.out)
    left = f"{a}[s * {ra} + q, t]" if k.trans_a else f"{a}[s * {ra} + t, q]"
    right = f"{b}[s * {rb} + j, q]" if k.trans_b else f"{b}[s * {rb} + q, j]"
    return _entry_kernel(k, program, index, [a, b], [
        f"s = i // {ro}", f"t = i - s * {ro}", "acc = 0.0", f"for q in range({inner}):",
        f"    acc += {left} * {right}", f"{out}[i, j] = {float(k.alpha)!r} * acc"])


def _tree(combine):
    return ["s = TR // 2", "while s > 0:", "    if tid < s:", f"        {combine}", "    cuda.syncthreads()", "    s //= 2"]


def _kernel(name, args, body):
    return ["@cuda.jit(cache=CACHE)", f"def {name}({', '.join(args)}):"] + indent(body) + [""]


def _call_args(args, rows, cols):
    return [{"R": f"({rows})", "C": f"({cols})"}.get(a, a) for a in args]


def _launch_1d(name, args, rows, cols):
    return [f"{name}[((({rows}) * ({cols}) + TPB - 1) // TPB,), TPB]({', '.join(_call_args(args, rows, cols))})"]


GEMM = '''
@cuda.jit(cache=CACHE)
def gemm_{ta}{tb}(A, B, Cm, M, N, K, alpha):
    # Cm = alpha * op(A) @ op(B); op(A) is M x K, op(B) is K x N. A block computes a TM x TN tile,
    # each thread an RM x RN patch from shared-memory tiles of TK columns of op(A) / rows of op(B).
    sA = cuda.shared.array((TK, TM), DT)
    sB = cuda.shared.array((TK, TN), DT)
    acc = cuda.local.array((RM, RN), ACC)
    ra = cuda.local.array(RM, ACC)
    rb = cuda.local.array(RN, ACC)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    nthreads = (TN // RN) * (TM // RM)
    tid = ty * (TN // RN) + tx
    row0 = cuda.blockIdx.y * TM
    col0 = cuda.blockIdx.x * TN
    for a in range(RM):
        for b in range(RN):
            acc[a, b] = 0.0
    for k0 in range(0, K, TK):
        for e in range(tid, TM * TK, nthreads):
            r = e // TK
            c = e - r * TK
            gr = row0 + r
            gc = k0 + c
            sA[c, r] = {a_read} if gr < M and gc < K else 0.0
        for e in range(tid, TK * TN, nthreads):
            r = e // TN
            c = e - r * TN
            gr = k0 + r
            gc = col0 + c
            sB[r, c] = {b_read} if gr < K and gc < N else 0.0
        cuda.syncthreads()
        for kk in range(TK):
            for a in range(RM):
                ra[a] = sA[kk, ty * RM + a]
            for b in range(RN):
                rb[b] = sB[kk, tx * RN + b]
            for a in range(RM):
                for b in range(RN):
                    acc[a, b] += ra[a] * rb[b]
        cuda.syncthreads()
    for a in range(RM):
        r = row0 + ty * RM + a
        if r < M:
            for b in range(RN):
                c = col0 + tx * RN + b
                if c < N:
                    Cm[r, c] = alpha * acc[a, b]
'''


def _gemms() -> str:
    out = []
    for ta in "nt":
        for tb in "nt":
            out.append(GEMM.format(ta=ta, tb=tb, a_read="A[gc, gr]" if ta == "t" else "A[gr, gc]",
                                   b_read="B[gc, gr]" if tb == "t" else "B[gr, gc]"))
    return "\n".join(out)


CONSTANTS = '''
SIM = config.ENABLE_CUDASIM
CACHE = not SIM  # numba-cuda caches compiled kernels; the simulator compiles nothing
DT = {dt}
ACC = {acc}
# GEMM tile: a block computes TM x TN, each thread RM x RN, over TK-wide slices.
TM, TN, TK, RM, RN = (8, 8, 4, 2, 2) if SIM else (64, 64, 16, 4, 4)
TPB = 16 if SIM else 256  # threads per block for elementwise kernels
TR = 8 if SIM else 256  # threads per block for row / full reductions (a power of two)
RX, RY = (4, 4) if SIM else (32, 8)  # column-sum blocks: RX columns x RY row groups
'''


def generate(program: Program, dtype) -> str:
    """The module: constants, the GEMMs, one kernel per program kernel, and ``step``."""
    dt = "float32" if np.dtype(dtype) == np.float32 else "float64"
    kernels, launches = [], []
    for i, k in enumerate(program.kernels):
        definition, launch = emit(k, program, i)
        kernels += definition
        launches += [f"# {k.out}: {k.kind}{program.note(k.out)}"] + launch
    names = program.externals + list(program.persistent) + list(program.buffers)
    unpack = [f"{buf(nm)} = b[{nm!r}]" for nm in names]
    scalars = _scalar_params(program)
    step = [f"def step(b, n{''.join(', ' + s for s in scalars)}):",
            '    """Launch every kernel of one step (buffers ``b`` are device arrays by name)."""']
    step += indent(unpack + launches)
    return (
        "# generated by symdl (cuda backend)\nimport math\n\nfrom numba import config, cuda, float32, float64\n"
        + CONSTANTS.format(dt=dt, acc="float64" if dt == "float64" else "float32")
        + _gemms() + "\n"
        + helper_source(program, "scalar", "@cuda.jit(device=True, inline=True)")
        + "\n" + "\n".join(kernels) + "\n\n" + "\n".join(step) + "\n"
    )


# --------------------------------------------------------------------------- runtime


class DeviceArray(np.ndarray):
    """A host copy of a device buffer; assigning into it writes the whole array back."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        upload = getattr(self, "_upload", None)
        if upload is not None:
            upload(np.asarray(self))


class DeviceMap(Mapping):
    """``{key: host copy}`` of device buffers (``spec = {key: (buffer, shape)}``), read fresh each access."""

    def __init__(self, device_views: dict, spec: dict):
        self._views, self._spec = device_views, spec

    def __getitem__(self, key):
        name, shape = self._spec[key]
        view = self._views[name]
        host = view.copy_to_host().reshape(shape).view(DeviceArray)
        host._upload = lambda a, v=view: v.copy_to_device(np.ascontiguousarray(a.reshape(v.shape)))
        return host

    def __iter__(self):
        return iter(self._spec)

    def __len__(self):
        return len(self._spec)


class Runner(RunnerBase):
    """Device arenas, batch buffers on the device, and the generated ``step``."""

    def __init__(self, program: Program, dtype):
        check_available()
        super().__init__(program, dtype)
        from numba import cuda

        self.cuda = cuda
        self.source = generate(program, self.dtype)
        self.module = cache.load_module(self.source, backend="cuda-sim" if simulating() else "cuda")
        self.persist_dev = cuda.to_device(self.persist.flat)
        self.persist_views = self._carve(self.persist_dev, self.persist)
        self._by_n = {}

    @staticmethod
    def _carve(device_flat, arena) -> dict:
        """Device views in exactly the layout of the host ``base.Arena`` mirrored to the device."""
        return {name: device_flat[o : o + r * c].reshape(r, c)
                for (name, o), (r, c) in zip(arena.offsets.items(), arena.shapes.values())}

    def _buffers_on_device(self, n: int) -> dict:
        if n not in self._by_n:
            arena = self.workspace.get(n)
            work = self.cuda.to_device(arena.flat)
            views = dict(self.persist_views)
            views.update(self._carve(work, arena))
            leaves = {str(l.name): l for l in self.program.inputs + self.program.params}
            for name in self.external:  # the batch (and, for value_and_grad, the params) arrive per call
                views[name] = self.cuda.device_array(concrete_shape(leaves[name].shape, n), dtype=self.dtype)
            self._by_n[n] = (views, work)
        return self._by_n[n][0]

    def call(self, external: list, scalars: list, n: int) -> float:
        views = self._buffers_on_device(n)
        for name, host in zip(self.external, external):
            views[name].copy_to_device(np.ascontiguousarray(host, dtype=self.dtype))
        self.module.step(views, n, *scalars)
        if "loss" not in self.program.outputs:
            return 0.0
        return float(views[self.program.outputs["loss"]].copy_to_host()[0, 0])  # the one value per step

    def output(self, name: str, n: int) -> np.ndarray:
        """Copy one buffer (an output, not every intermediate) back to the host."""
        return self._buffers_on_device(n)[name].copy_to_host()

    def persistent_arrays(self, spec: dict) -> Mapping:
        return DeviceMap(self.persist_views, spec)


def compile_program(program: Program, dtype) -> Runner:
    return Runner(program, dtype)


# --------------------------------------------------------------------------- recurrence
# ``ir.Scan`` / ``ir.ScanGrad``: one thread per sequence, looping over the steps in order (``scan_code``,
# the same scalar loops as the CPU kernel's; the recurrent product a loop in each thread).
from ..ir.kernels import Scan, ScanGrad  # noqa: E402
from .scan_code import sequence_lines  # noqa: E402


@emit.register(Scan)
@emit.register(ScanGrad)
def _scan(k, program, index):
    name = f"k{index}_{k.kind}"
    T = int(k.steps[0])
    u = (_dims(program.shape_of(k.operands[4].buffer))[0] if isinstance(k, ScanGrad)
         else _dims(program.shape_of(k.operands[1].buffer))[1])  # a Scan reads Uᵀ
    args = list(dict.fromkeys([buf(k.out)] + [buf(o.buffer) for o in k.operands])) + ["R"]
    body = ["i = cuda.grid(1)", "if i < R:"] + indent(sequence_lines(k, program, "scalar", str(T), u))
    rows = f"({_dims(program.shape_of(k.out))[0]}) // {T}"
    launch = [f"{name}[((({rows}) + TPB - 1) // TPB,), TPB]({', '.join(args[:-1])}, ({rows}))"]
    return _kernel(name, args, body), launch
