"""The Numba CPU backend: the kernel list printed as one ``@njit`` step function.

* GEMMs call ``np.dot(a, b, out)`` (BLAS) on views, transposes included: no copies.
* Elementwise kernels are explicit ``i, j`` loops; reductions accumulate in float64.
* Loops over large arrays use ``prange`` (see ``PARALLEL_MIN_WORK``); a column-sum
  parallelises over the output column, never with two threads writing one element.
* The whole step (forward, backward, update) is one call into compiled code; its
  buffers are views into the arenas (``runtime.Arena``), computed from ``n``.

The module is written to the compile cache (``cache.module_path``) and imported from
there, so Numba's ``cache=True`` works and a second process starts warm.
"""
from __future__ import annotations

from functools import singledispatch

import numpy as np
import sympy as sp

from .. import cache, threads
from ..codegen import TANH32, body_code, dims as _dims, operand_reads
from ..lower import Elementwise, Gemm, Program, Reduction, Update
from .numpy_backend import buf
from .runtime import ALIGN, RunnerBase

#: Loops whose estimated work (elements x operations) is at least this use ``prange``.
PARALLEL_MIN_WORK = 1 << 17

def _reads(operands) -> list:
    return operand_reads(operands, buf)


def _loop(rows, var, parallel: bool) -> str:
    return f"for {var} in {'numba.prange' if parallel else 'range'}({rows}):"


def _work(shape, bodies) -> sp.Expr:
    return sp.sympify(shape[0] * shape[1]) * max(1, sum(sp.count_ops(b) for b in bodies))


def _parallel_branches(shape, bodies, make, parallel: bool):
    """Serial code; in the parallel step, a ``prange`` copy taken when the work is large."""
    if not parallel:
        return make(False)
    work = _work(shape, bodies)
    if not work.free_symbols:
        return make(int(work) >= PARALLEL_MIN_WORK)
    return [f"if {sp.pycode(work)} >= {PARALLEL_MIN_WORK}:"] + ["    " + l for l in make(True)] + \
        ["else:"] + ["    " + l for l in make(False)]


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
    work = sp.sympify(f"({rows}) * ({cols}) * ({inner})")
    if not work.free_symbols:
        return loops if int(work) < SMALL_GEMM else blas
    return [f"if {sp.pycode(work)} < {SMALL_GEMM}:"] + ["    " + l for l in loops] + ["else:"] + ["    " + l for l in blas]


def _elementwise_loop(shape, reads, body_lines, writes, parallel):
    rows, cols = _dims(shape)
    inner = reads + body_lines + writes
    return [_loop(rows, "i", parallel), f"    for j in range({cols}):"] + ["        " + l for l in inner]


@emit.register
def _(k: Elementwise, program, parallel, flavor):
    lines, result = body_code(k.body, [f"v{i}" for i in range(len(k.operands))], flavor)
    shape = program.shape_of(k.out)
    return _parallel_branches(
        shape, [k.body],
        lambda par: _elementwise_loop(shape, _reads(k.operands), lines, [f"{buf(k.out)}[i, j] = {result}"], par),
        parallel,
    )


@emit.register
def _(k: Update, program, parallel, flavor):
    names = [f"v{i}" for i in range(len(k.operands))]
    lines = []
    for sym, body in k.lets:
        pre, result = body_code(body, names, flavor, temp_prefix=f"_c{sym}_")
        lines += pre + [f"{sym} = {result}"]
    writes = [f"{buf(b)}[i, j] = {sym}" for b, sym in k.writes]
    shape = program.shape_of(k.out)
    bodies = [b for _, b in k.lets]
    return _parallel_branches(
        shape, bodies, lambda par: _elementwise_loop(shape, _reads(k.operands), lines, writes, par), parallel
    )


@emit.register
def _(k: Reduction, program, parallel, flavor):
    lines, result = body_code(k.body, [f"v{i}" for i in range(len(k.operands))], flavor)
    rows, cols = _dims(k.shape)
    out = buf(k.out)
    body = _reads(k.operands) + lines

    def ind(block, depth):
        return [" " * (4 * depth) + l for l in block]

    def make(par):
        if k.over == "all":
            # numba turns ``acc +=`` inside prange into a race-free reduction
            return ["_acc = 0.0", _loop(rows, "i", par), f"    for j in range({cols}):",
                    *ind(body, 2), f"        _acc += {result}", f"{out}[0, 0] = _acc"]
        if k.over == "cols":
            return [_loop(rows, "i", par), "    _acc = 0.0", f"    for j in range({cols}):",
                    *ind(body, 2), f"        _acc += {result}", f"    {out}[i, 0] = _acc"]
        if k.over == "logsumexp":
            return [_loop(rows, "i", par), "    _mx = -np.inf", f"    for j in range({cols}):",
                    *ind(body, 2), f"        _mx = max(_mx, {result})", "    _acc = 0.0",
                    f"    for j in range({cols}):", *ind(body, 2), f"        _acc += math.exp({result} - _mx)",
                    f"    {out}[i, 0] = _mx + math.log(_acc)"]
        # over rows: each thread owns whole output columns (no two threads write one element)
        if par:
            return [_loop(cols, "j", True), "    _acc = 0.0", f"    for i in range({rows}):",
                    *ind(body, 2), f"        _acc += {result}", f"    {out}[0, j] = _acc"]
        return [f"for j in range({cols}):", f"    {out}[0, j] = 0.0", f"for i in range({rows}):",
                f"    for j in range({cols}):", *ind(body, 2), f"        {out}[0, j] += {result}"]

    return _parallel_branches(k.shape, [k.body], make, parallel)


def _carve(arena: str, shapes: dict) -> list:
    """Views into a flat arena, in the exact layout ``runtime.Arena`` uses."""
    lines = ["_o = 0"]
    for name, shape in shapes.items():
        r, c = _dims(shape)
        size = f"({r}) * ({c})"
        lines.append(f"{buf(name)} = {arena}[_o:_o + {size}].reshape(({r}, {c}))")
        lines.append(f"_o += ({size} + {ALIGN - 1}) // {ALIGN} * {ALIGN}")
    return lines


def external_names(program: Program) -> list:
    return [str(l.name) for l in program.inputs + program.params if str(l.name) not in program.persistent]


def _function(program: Program, parallel: bool, flavor: str) -> str:
    ext = external_names(program)
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
        f"def {name}({args}):\n" + "\n".join("    " + l for l in body) + "\n"
    )


def generate(program: Program, dtype=np.float64) -> str:
    """The module: ``step`` (serial loops) and ``step_parallel`` (``prange`` on large loops).

    Both take ``(externals..., persist, work, n, scalars...)`` and return the loss.
    Numba compiles a function on its first call, so a model whose batches never
    need threads never pays for compiling the parallel one. In float32, ``tanh`` is
    Eigen's rational approximation (``codegen.TANH32``); float64 keeps libm's.
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
    return max((w for k, w in _loop_work(program, n_value) if not isinstance(k, Gemm)), default=0)


def _loop_work(program: Program, n_value: int):
    from ..expr import n as N

    for k in program.kernels:
        if isinstance(k, Gemm):
            yield k, program.flops(k, n_value) // 2
            continue
        shape = k.shape if isinstance(k, Reduction) else program.shape_of(k.out)
        bodies = [b for _, b in k.lets] if isinstance(k, Update) else [k.body]
        yield k, int(_work(shape, bodies).subs(N, n_value))


def loops_dominate(program: Program, n_value: int) -> bool:
    """Whether a step at ``n_value`` should thread its loops (and keep BLAS to one thread).

    Two spinning thread pools on a small machine starve each other, so a step uses
    one: BLAS threads when matrix products dominate (every MLP measured here:
    mnist 1.08 ms serial loops vs 10.9 ms with both pools), Numba threads only when
    elementwise loops both dominate the work and are large.
    """
    loops = gemms = 0
    for k, w in _loop_work(program, n_value):
        if isinstance(k, Gemm):
            gemms += w
        else:
            loops += w
    return loops > gemms and max_work(program, n_value) >= PARALLEL_MIN_WORK


class Runner(RunnerBase):
    """Calls the compiled step with the arenas; BLAS and Numba threads are coordinated."""

    def __init__(self, program: Program, dtype):
        super().__init__(program, dtype)
        self.source = generate(program, self.dtype)
        self.module = cache.load_module(self.source, backend="cpu")
        self.external = external_names(program)
        self.scalars = [str(s) for s in program.scalars]
        self._use_parallel = {}  # batch size -> whether any loop is worth threads
        self._ready = {}  # batch size -> (compiled function, work arena)

    @property
    def step(self):
        """The serial compiled step (``inspect`` reads it)."""
        return self.module.step

    def function_for(self, n: int):
        if n not in self._use_parallel:
            self._use_parallel[n] = loops_dominate(self.program, n)
        return self.module.step_parallel if self._use_parallel[n] else self.module.step

    def call(self, external: dict, scalars: dict, n: int) -> float:
        return self.call_list([external[nm] for nm in self.external], [scalars[s] for s in self.scalars], n)

    def call_list(self, external: list, scalars: list, n: int) -> float:
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
                return self.call_list(external, scalars, n)
            except Exception:
                del self._ready[n]
                if attempt == 2:
                    raise
                cache.clear_compiled(cache.module_path(self.source, "cpu"))
                self.module = cache.load_module(self.source, backend="cpu")

    def run(self, external: dict, scalars: dict, n: int) -> dict:
        self.call(external, scalars, n)
        return self.buffers(n)


def compile_program(program: Program, dtype) -> Runner:
    return Runner(program, dtype)


__all__ = ["compile_program", "generate", "Runner", "PARALLEL_MIN_WORK", "np"]
