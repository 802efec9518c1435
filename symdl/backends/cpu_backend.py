"""The Numba CPU backend: the kernel list printed as one ``@njit`` step function.

* GEMMs call ``np.dot(a, b, out)`` (BLAS) on views, transposes included: no copies.
* Elementwise kernels are explicit ``i, j`` loops; reductions accumulate in float64.
* Loops over large arrays use ``prange`` (see ``PARALLEL_MIN_WORK``); a column-sum
  parallelises over the output column, never with two threads writing one element.
* The whole step (forward, backward, update) is one call into compiled code; its
  buffers are views into the arenas (``base.Arena``), computed from ``n``.

The module is written to the compile cache (``cache.module_path``) and imported from
there, so Numba's ``cache=True`` works and a second process starts warm.
"""
from __future__ import annotations

from functools import singledispatch

import numba
import numpy as np
import sympy as sp

from . import cache, threads
from ..ir import Elementwise, Gemm, Program, Reduction, ReduceKind, Update
from .base import ALIGN, Runner as RunnerBase, buf, indent
from .scalar_code import TANH32, dims as _dims, loop_body

#: Loops whose estimated work (elements x operations) is at least this use ``prange``.
PARALLEL_MIN_WORK = 1 << 17


def _loop(rows, var, parallel: bool) -> str:
    return f"for {var} in {'numba.prange' if parallel else 'range'}({rows}):"


def _branch(condition: sp.Expr, threshold: int, below, above) -> list:
    """``below`` or ``above`` when ``condition`` is a number; otherwise an ``if`` on it."""
    if not condition.free_symbols:
        return above if int(condition) >= threshold else below
    return [f"if {sp.pycode(condition)} >= {threshold}:"] + indent(above) + ["else:"] + indent(below)


def _parallel_branches(program, kernel, make, parallel: bool):
    """Serial code; in the parallel step, a ``prange`` copy taken when the work is large."""
    if not parallel:
        return make(False)
    return _branch(program.work_expr(kernel), PARALLEL_MIN_WORK, make(False), make(True))


@singledispatch
def emit(kernel, program: Program, parallel: bool, flavor: str) -> list:
    raise NotImplementedError(f"cpu backend: no printer for {type(kernel).__name__}")


#: GEMMs with fewer multiply-adds than this are explicit loops: a BLAS call costs ~0.4 µs.
SMALL_GEMM = 8192


@emit.register
def _(k: Gemm, program, parallel, flavor):
    a = buf(k.a) + (".T" if k.trans_a else "")
    b = buf(k.b) + (".T" if k.trans_b else "")
    out = buf(k.out)
    blas = [f"np.dot({a}, {b}, {out})"]
    if k.alpha != 1:
        blas.append(f"{out} *= {float(k.alpha)!r}")
    rows, cols = _dims(program.shape_of(k.out))
    inner = _dims(program.shape_of(k.a))[0 if k.trans_a else 1]
    ai = "[q, i]" if k.trans_a else "[i, q]"
    bi = "[j, q]" if k.trans_b else "[q, j]"
    alpha = "" if k.alpha == 1 else f"{float(k.alpha)!r} * "
    if k.trans_b:  # rows of A against rows of B: a contiguous dot product per entry
        loops = [f"for i in range({rows}):", f"    for j in range({cols}):", "        _acc = 0.0",
                 f"        for q in range({inner}):", f"            _acc += {buf(k.a)}{ai} * {buf(k.b)}{bi}",
                 f"        {out}[i, j] = {alpha}_acc"]
    else:  # out row i += A[i, q] * row q of B: the inner loop runs along contiguous rows
        loops = [f"for i in range({rows}):", f"    for j in range({cols}):", f"        {out}[i, j] = 0.0",
                 f"    for q in range({inner}):", f"        _a = {alpha}{buf(k.a)}{ai}",
                 f"        for j in range({cols}):", f"            {out}[i, j] += _a * {buf(k.b)}{bi}"]
    return _branch(program.work_expr(k), SMALL_GEMM, loops, blas)


@emit.register(Elementwise)
@emit.register(Update)
def _emit_loop(k, program, parallel, flavor):
    lines, _ = loop_body(k, flavor)
    rows, cols = _dims(program.shape_of(k.out))
    return _parallel_branches(
        program, k, lambda par: [_loop(rows, "i", par), f"    for j in range({cols}):"] + indent(lines, 2), parallel
    )


@emit.register
def _emit_reduction(k: Reduction, program, parallel, flavor):
    body, result = loop_body(k, flavor)
    rows, cols = _dims(k.shape)
    out = buf(k.out)

    def make(par):
        if k.over == ReduceKind.ALL:
            # numba turns ``acc +=`` inside prange into a race-free reduction
            return ["_acc = 0.0", _loop(rows, "i", par), f"    for j in range({cols}):",
                    *indent(body, 2), f"        _acc += {result}", f"{out}[0, 0] = _acc"]
        if k.over == ReduceKind.COLS:
            return [_loop(rows, "i", par), "    _acc = 0.0", f"    for j in range({cols}):",
                    *indent(body, 2), f"        _acc += {result}", f"    {out}[i, 0] = _acc"]
        if k.over == ReduceKind.LOGSUMEXP:
            return [_loop(rows, "i", par), "    _mx = -np.inf", f"    for j in range({cols}):",
                    *indent(body, 2), f"        _mx = max(_mx, {result})", "    _acc = 0.0",
                    f"    for j in range({cols}):", *indent(body, 2), f"        _acc += math.exp({result} - _mx)",
                    f"    {out}[i, 0] = _mx + math.log(_acc)"]
        # over rows: each thread owns whole output columns (no two threads write one element)
        if par:
            return [_loop(cols, "j", True), "    _acc = 0.0", f"    for i in range({rows}):",
                    *indent(body, 2), f"        _acc += {result}", f"    {out}[0, j] = _acc"]
        return [f"for j in range({cols}):", f"    {out}[0, j] = 0.0", f"for i in range({rows}):",
                f"    for j in range({cols}):", *indent(body, 2), f"        {out}[0, j] += {result}"]

    return _parallel_branches(program, k, make, parallel)


def _carve(arena: str, shapes: dict) -> list:
    """Views into a flat arena, in the exact layout ``base.Arena`` uses."""
    lines = ["_o = 0"]
    for name, shape in shapes.items():
        r, c = _dims(shape)
        size = f"({r}) * ({c})"
        lines.append(f"{buf(name)} = {arena}[_o:_o + {size}].reshape(({r}, {c}))")
        lines.append(f"_o += ({size} + {ALIGN - 1}) // {ALIGN} * {ALIGN}")
    return lines


def _function(program: Program, parallel: bool, flavor: str) -> str:
    ext = program.externals
    scalars = [str(s) for s in program.scalars]
    body = [f"{buf(nm)} = {nm}" for nm in ext]
    body += _carve("persist", program.persistent) + _carve("work", program.buffers)
    for k in program.kernels:
        body.append(f"# {k.out}: {k.kind}")
        body += emit(k, program, parallel, flavor)
    body.append(f"return {buf(program.outputs['loss'])}[0, 0]" if "loss" in program.outputs else "return 0.0")
    args = ", ".join(ext + ["persist", "work", "n"] + scalars)
    name = "step_parallel" if parallel else "step"
    return (
        f'@numba.njit(cache=True, parallel={parallel}, error_model="numpy", nogil=True)\n'
        f"def {name}({args}):\n" + "\n".join(indent(body)) + "\n"
    )


def generate(program: Program, dtype=np.float64) -> str:
    """The module: ``step`` (serial loops) and ``step_parallel`` (``prange`` on large loops).

    Both take ``(externals..., persist, work, n, scalars...)`` and return the loss.
    Numba compiles a function on its first call, so a model whose batches never
    need threads never pays for compiling the parallel one. In float32, ``tanh`` is
    Eigen's rational approximation (``scalar_code.TANH32``); float64 keeps libm's.
    """
    float32 = np.dtype(dtype) == np.float32
    flavor = "scalar32" if float32 else "scalar"
    functions = _function(program, False, flavor) + "\n\n" + _function(program, True, flavor)
    return (
        "# generated by symdl (cpu backend): one compiled call per step\n"
        "import math\n\nimport numba\nimport numpy as np\n\n"
        + (TANH32 + "\n" if float32 else "\n") + functions
    )


def max_work(program: Program, n_value: int) -> int:
    """The largest loop's work (elements x operations) at batch size ``n_value``."""
    return max((program.work(k, n_value) for k in program.kernels if not isinstance(k, Gemm)), default=0)


def loops_dominate(program: Program, n_value: int) -> bool:
    """Whether a step at ``n_value`` should thread its loops (and keep BLAS to one thread).

    Two spinning thread pools on a small machine starve each other, so a step uses
    one: BLAS threads when matrix products dominate (every MLP measured here:
    mnist 1.08 ms serial loops vs 10.9 ms with both pools), Numba threads only when
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
    """Calls the compiled step with the arenas; BLAS and Numba threads are coordinated."""

    def __init__(self, program: Program, dtype):
        super().__init__(program, dtype)
        self.source = generate(program, self.dtype)
        self.module = cache.load_module(self.source, backend="cpu")
        self._use_parallel = {}  # batch size -> whether any loop is worth threads
        self._ready = {}  # batch size -> (compiled function, work arena, parallel)

    def function_for(self, n: int):
        """The compiled function a call at batch size ``n`` uses (``step`` or ``step_parallel``)."""
        if n not in self._use_parallel:
            self._use_parallel[n] = loops_dominate(self.program, n)
        return self.module.step_parallel if self._use_parallel[n] else self.module.step

    def call(self, external: list, scalars: list, n: int) -> float:
        """The hot path: externals and scalars in the program's order."""
        ready = self._ready.get(n)
        if ready is None:
            return self._first_call(external, scalars, n)
        fn, work, parallel = ready
        if parallel:
            with threads.blas_single_threaded():
                return fn(*external, self.persist.flat, work, n, *scalars)
        return fn(*external, self.persist.flat, work, n, *scalars)

    def _first_call(self, external, scalars, n):
        """The first call at a batch size compiles or loads from Numba's cache; a corrupt
        cache entry is deleted and the module reloaded, once."""
        name = self.function_for(n).__name__
        work = self.workspace.get(n).flat
        for attempt in (1, 2):
            self._ready[n] = (getattr(self.module, name), work, self._use_parallel[n])
            try:
                return self.call(external, scalars, n)
            except Exception:
                del self._ready[n]
                if attempt == 2:
                    raise
                cache.clear_compiled(cache.module_path(self.source, "cpu"))
                self.module = cache.load_module(self.source, backend="cpu")

    def inspect(self, what: str, n: int) -> str:
        """LLVM IR or assembly of the function that ran at batch size ``n``."""
        dispatcher = self.function_for(n)
        if not hasattr(dispatcher, "py_func"):
            raise RuntimeError("inspect needs the JIT (NUMBA_DISABLE_JIT is set)")
        # Numba cannot show code it loaded from its cache: compile an uncached twin.
        options = dict(dispatcher.targetoptions)
        options.pop("cache", None)
        options.pop("nopython", None)
        twin = numba.njit(**options)(dispatcher.py_func)
        for sig in dispatcher.signatures:
            twin.compile(sig)
        getter = twin.inspect_llvm if what == "llvm" else twin.inspect_asm
        return "\n".join(getter().values())


def compile_program(program: Program, dtype) -> Runner:
    return Runner(program, dtype)


# --------------------------------------------------------------------------- image kernels (issue 10)
# Convolution and pooling (``ir.ImageOp``): one gather loop over the output rows (pixels),
# ``prange`` when the work is large; no two rows write one entry (see ``image_code``).

from ..ir import ImageOp  # noqa: E402 - kept with the printer that uses it
from .image_code import row_body as _image_row_body  # noqa: E402


@emit.register
def _emit_image(k: ImageOp, program, parallel, flavor):
    rows, cols = _dims(program.shape_of(k.out))
    body = _image_row_body(k, cols)
    return _parallel_branches(program, k, lambda par: [_loop(rows, "i", par)] + indent(body), parallel)
