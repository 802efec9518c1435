"""Who parallelises what: BLAS threads for GEMMs, Numba threads for large loops.

On a small machine two thread pools that both spin (OpenBLAS after a GEMM, OpenMP
after a ``prange`` loop) starve each other: a step with both active ran tens of times
slower than with one (DESIGN.md and docs/performance.md have the measurements). symdl's
generated step therefore uses ``prange`` only for loops with a lot of work
(``cpu.backend.PARALLEL_MIN_WORK``), and
``set_num_threads`` sets both pools together. No environment variable is needed.

>>> import symdl as sd
>>> sd.set_num_threads(1); sd.get_num_threads()
1
>>> sd.set_num_threads(None)  # back to every core
"""
from __future__ import annotations

import numba

_controller = None


def _blas():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads for BLAS and for Numba's parallel loops (``None``: all cores).

    Results are bit-for-bit reproducible only at one thread count: BLAS splits each matrix
    product's sums across its threads, and another count sums in another order (the last
    bits differ). Set the same ``n`` (1 is the safe choice) wherever runs must match exactly.
    """
    cores = numba.config.NUMBA_NUM_THREADS
    n = cores if n is None else int(n)
    if not 1 <= n <= cores:
        raise ValueError(f"number of threads must be between 1 and {cores}, got {n}")
    numba.set_num_threads(n)
    _blas().limit(limits=n)


def get_num_threads() -> int:
    """The number of threads Numba's parallel loops use (BLAS is kept equal by ``set_num_threads``)."""
    return numba.get_num_threads()


def blas_single_threaded():
    """BLAS on one thread, for steps whose own loops use every core."""
    return _blas().limit(limits=1)

