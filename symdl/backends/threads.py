"""Who parallelises what: BLAS threads for products, the step's own threads for loops.

On a small machine two thread pools that both spin (OpenBLAS after a GEMM, a loop pool after
its loop) starve each other: a step with both active ran tens of times slower than with one
(DESIGN.md and docs/performance.md have the measurements). So a CPU step uses one pool at a
time: when matrix products dominate, one thread runs the step and BLAS threads each product;
when loops dominate, the step's threads (``cpu.runtime.Pool``) each run a share of every large
kernel, products included, with BLAS held to one thread. ``set_num_threads`` sets both sizes
together; symdl never sets an environment variable.

>>> import symdl as sd
>>> sd.set_num_threads(1); sd.get_num_threads()
1
>>> sd.set_num_threads(None)  # back to every core
"""
from __future__ import annotations

import os

_controller = None
_threads: list = []  # the count set by set_num_threads (empty: every core)


def _blas():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def cores() -> int:
    """The cores this process may use: ``NUMBA_NUM_THREADS`` when set (Numba's own cap), else the
    CPU affinity's size."""
    if os.environ.get("NUMBA_NUM_THREADS"):
        return max(1, int(os.environ["NUMBA_NUM_THREADS"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads for BLAS and for the step's loops (``None``: all cores).

    Results are bit-for-bit reproducible only at one thread count: BLAS splits each matrix
    product's sums across its threads, and another count sums in another order (the last
    bits differ). Set the same ``n`` (1 is the safe choice) wherever runs must match exactly.
    """
    most = cores()
    n = most if n is None else int(n)
    if not 1 <= n <= most:
        raise ValueError(f"number of threads must be between 1 and {most}, got {n}")
    _threads[:] = [n]
    _blas().limit(limits=n)


def get_num_threads() -> int:
    """The number of threads a CPU step uses for its loops (BLAS is kept equal by ``set_num_threads``)."""
    return _threads[0] if _threads else cores()


class using:
    """``with using(n):`` the step's threads and BLAS's at ``n`` for the block, then back.

    >>> with using(1):
    ...     get_num_threads()
    1
    """

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self._before = list(_threads)
        _threads[:] = [self.n]
        self._blas = _blas().limit(limits=self.n)
        return self

    def __exit__(self, *exc):
        _threads[:] = self._before
        self._blas.restore_original_limits()


def blas_single_threaded():
    """BLAS on one thread, for steps whose own loops use every core."""
    return _blas().limit(limits=1)
