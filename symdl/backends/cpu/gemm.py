"""Every matrix product of the CPU backend: one prebuilt kernel per dtype, for every model.

A product ``out = alpha * op(a) @ op(b)`` (``op`` the identity or a transpose) is the
same formula whatever its buffers, sizes, orientation and ``alpha``: all of them go in
its frame. So every GEMM of every model calls one of two kernels, ``gemm_float32`` or
``gemm_float64``, compiled once per machine like the driver ``cpu_runtime.run_table`` (a model's cold
compile no longer pays for its products).

The frame (``GEMM_FRAME`` int64 values) is the usual three slots, then the flags and
``alpha``::

    [out address, m, n,  a address, a rows, a cols,  b address, b rows, b cols,
     trans_a, trans_b, alpha as the bits of a float64 (formulas.float_bits)]

A call computes the output's rows ``begin:end`` (its *units*, ``cpu_runtime``): the step's
threads split a large product by rows, each calling a single-threaded BLAS on its block.
Products of at least ``SMALL_GEMM`` multiply-adds call BLAS ``xgemm``; smaller ones run as
loops, where BLAS's call overhead would dominate. The BLAS is NumPy's own (``numpy_blas``):
the library ``a @ b`` calls, so a process has one BLAS thread pool, not two that starve each
other, and no SciPy import at the first product. Where NumPy's build does not export
it, the product calls the BLAS Numba's ``np.dot`` calls (SciPy's, through ``numba_xxgemm``).
Row-major ``out = op(a) op(b)`` is column-major ``outᵀ = op(b)ᵀ op(a)ᵀ``: BLAS gets ``b`` first.

Under ``NUMBA_DISABLE_JIT=1`` the same kernel runs as Python, the BLAS call as NumPy.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import llvm_code
from .runtime import as_ptr, carray, kernel

#: Products with fewer multiply-adds run as loops; BLAS from here on.
SMALL_GEMM = 8192

#: The frame's length: three slots of three fields, trans_a, trans_b, alpha.
GEMM_FRAME = 12

#: ``cblas.h``'s enums.
CBLAS_COL_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 102, 111, 112

#: NumPy's BLAS ``cblas_?gemm`` with 64-bit integers, by the names NumPy's builds export it
#: under: ``scipy-openblas64`` (NumPy 2 wheels), ``openblas64_`` (NumPy 1.26 wheels).
NUMPY_CBLAS = ("scipy_cblas_{x}gemm64_", "cblas_{x}gemm64_")


def numpy_blas(dtype: str) -> str | None:
    """The symbol under which the product kernel calls NumPy's ``cblas_sgemm``/``dgemm``
    (64-bit integers), registered with the JIT engine; None when NumPy's build exports
    neither name in ``NUMPY_CBLAS`` (a 32-bit-integer or MKL build): the kernel then calls
    SciPy's through ``numba_xxgemm``.

    The symbol is symdl's own name, so a kernel saved in one process loads in another
    whatever address the library got there; NumPy's extension module resolves it among
    the libraries it links (``dlsym`` on its handle searches them).

    >>> numpy_blas("float32") in (None, "symdl_cblas_sgemm64")
    True
    """
    import ctypes

    import llvmlite.binding as ll

    x = "s" if dtype == "float32" else "d"
    alias = f"symdl_cblas_{x}gemm64"
    if ll.address_of_symbol(alias):
        return alias
    try:
        from numpy._core import _multiarray_umath as umath
    except ImportError:  # NumPy 1.26
        from numpy.core import _multiarray_umath as umath
    library = ctypes.CDLL(umath.__file__)
    for name in NUMPY_CBLAS:
        try:
            function = getattr(library, name.format(x=x))
        except AttributeError:
            continue
        ll.add_symbol(alias, ctypes.cast(function, ctypes.c_void_p).value)
        return alias
    return None


if numba.config.DISABLE_JIT:

    def f64_from_bits(bits):
        return float(np.array(bits, np.int64).view(np.float64))

    def _matrix(addr, dtype, rows, cols, ld):
        """The column-major ``rows x cols`` matrix at ``addr`` with leading dimension ``ld``."""
        return carray(as_ptr(addr, dtype), (cols, ld))[:, :rows].T

    def blas_gemm(dtype, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc):
        """Column-major ``c = alpha * op(a) @ op(b)``, as BLAS ``xgemm`` with beta 0."""
        x = _matrix(a, dtype, *((k, m) if trans_a else (m, k)), lda)
        y = _matrix(b, dtype, *((n, k) if trans_b else (k, n)), ldb)
        out = _matrix(c, dtype, m, n, ldc)
        out[...] = alpha * ((x.T if trans_a else x) @ (y.T if trans_b else y))

else:

    @intrinsic
    def f64_from_bits(typingctx, bits):
        """The float64 whose bits are the int64 ``bits``."""
        sig = types.float64(bits)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.DoubleType())

        return sig, codegen

    @intrinsic
    def blas_gemm(typingctx, dtype, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc):
        """Column-major ``c = alpha * op(a) @ op(b)`` through Numba's ``numba_xxgemm`` (BLAS
        ``sgemm``/``dgemm`` from SciPy), beta 0; the flags are 0/1, the matrices addresses."""
        from numba.np.linalg import ensure_blas

        ensure_blas()
        sig = types.int32(dtype, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc)
        element = dtype.dtype

        def codegen(context, builder, signature, args):
            _, ta, tb, m_, n_, k_, alpha_, a_, lda_, b_, ldb_, c_, ldc_ = args
            char, i64, void_p = ir.IntType(8), ir.IntType(64), ir.IntType(8).as_pointer()
            fnty = ir.FunctionType(ir.IntType(32), [char, char, char, i64, i64, i64, void_p, void_p, i64,
                                                    void_p, i64, void_p, void_p, i64])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
            value = context.get_value_type(element)
            scale = builder.fptrunc(alpha_, value) if element == types.float32 else alpha_
            alpha_slot = cgutils.alloca_once_value(builder, scale)
            beta_slot = cgutils.alloca_once_value(builder, ir.Constant(value, 0.0))

            def flag(x):
                return builder.select(builder.icmp_signed("!=", x, ir.Constant(i64, 0)),
                                      ir.Constant(char, ord("t")), ir.Constant(char, ord("n")))

            kind = ir.Constant(char, ord("s" if element == types.float32 else "d"))
            return builder.call(fn, (kind, flag(ta), flag(tb), m_, n_, k_, builder.bitcast(alpha_slot, void_p),
                                     builder.inttoptr(a_, void_p), lda_, builder.inttoptr(b_, void_p), ldb_,
                                     builder.bitcast(beta_slot, void_p), builder.inttoptr(c_, void_p), ldc_))

        return sig, codegen


@numba.njit(inline="always", error_model="numpy", cache=True)
def _gemm(frame, begin, end, dtype, size):
    """Rows ``begin:end`` of the product (its units: ``cpu_runtime``), ``size`` bytes per entry:
    ``out[begin:end] = alpha * op(a)[begin:end] @ op(b)``."""
    f = carray(frame, (GEMM_FRAME,))
    n = f[2]
    m = end - begin
    a_rows, a_cols, b_cols = f[4], f[5], f[8]
    trans_a, trans_b = f[9], f[10]
    k = a_rows if trans_a else a_cols
    alpha = f64_from_bits(f[11])
    a_skip = begin if trans_a else begin * a_cols  # where op(a)'s row ``begin`` starts
    out_address, a_address = f[0] + begin * n * size, f[3] + a_skip * size
    if m * n * k >= SMALL_GEMM:
        blas_gemm(dtype, trans_b, trans_a, n, m, k, alpha, f[6], b_cols, a_address, a_cols, out_address, n)
        return
    out = carray(as_ptr(out_address, dtype), (m * n,))
    a = carray(as_ptr(a_address, dtype), (a_rows * a_cols - a_skip,))
    b = carray(as_ptr(f[6], dtype), (f[7] * b_cols,))
    # op(a)[i, q] = a[i * a_i + q * a_q], op(b)[q, j] = b[q * b_q + j * b_j]. The inner loop runs
    # along contiguous memory of b: along its rows (q) when it is transposed, else along j;
    # a loop of length 1 never is the inner one (a 16x1 output is 16 dot products).
    a_i, a_q = (1, a_cols) if trans_a else (a_cols, 1)
    b_q, b_j = (1, b_cols) if trans_b else (b_cols, 1)
    dots = k > 1 if trans_b else n == 1
    if dots and not trans_a and trans_b:  # rows of a against rows of b: both contiguous
        for i in range(m):
            for j in range(n):
                acc = 0.0
                for q in range(k):
                    acc += a[i * a_cols + q] * b[j * b_cols + q]
                out[i * n + j] = alpha * acc
    elif dots:
        for i in range(m):
            for j in range(n):
                acc = 0.0
                for q in range(k):
                    acc += a[i * a_i + q * a_q] * b[q * b_q + j * b_j]
                out[i * n + j] = alpha * acc
    else:  # row i of out += op(a)[i, q] * row q of op(b)
        for i in range(m):
            for j in range(n):
                out[i * n + j] = 0.0
            for q in range(k):
                x = alpha * a[i * a_i + q * a_q]
                for j in range(n):
                    out[i * n + j] += x * b[q * b_q + j * b_j]


# --------------------------------------------------------------------------- the same kernel as LLVM IR
# What runs: LLVM compiles it about twenty times faster than Numba compiles ``_gemm``. The Python
# above is the reference it follows line by line (and what runs under NUMBA_DISABLE_JIT).


def gemm_ir(dtype: str) -> str:
    """``_gemm`` for ``dtype`` as an LLVM module defining ``void symdl_gemm_<dtype>(i64 *frame,
    i64 begin, i64 end)``."""
    module = ir.Module(name=f"symdl_gemm_{dtype}")
    _gemm_function(module, f"symdl_gemm_{dtype}", dtype)
    return str(module)


def _gemm_function(module: ir.Module, name: str, dtype: str) -> ir.Function:
    """``_gemm`` for ``dtype`` as the function ``name`` of ``module``."""
    I64, F64, CHAR = llvm_code.I64, llvm_code.F64, ir.IntType(8)
    value = llvm_code.TYPES[dtype]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64.as_pointer(), I64, I64]), name)
    b = ir.IRBuilder(fn.append_basic_block("entry"))

    def field(k):
        return b.load(b.gep(fn.args[0], [ir.Constant(I64, k)]))

    def pointer(k):
        return b.inttoptr(field(k), value.as_pointer())

    def const(x):
        return ir.Constant(I64, x)

    begin, end = fn.args[1], fn.args[2]
    n, a_rows, a_cols, b_cols = field(2), field(4), field(5), field(8)
    m = b.sub(end, begin)
    trans_a = b.icmp_signed("!=", field(9), const(0))
    trans_b = b.icmp_signed("!=", field(10), const(0))
    out = b.gep(pointer(0), [b.mul(begin, n)])  # rows begin:end of out and of op(a)
    a = b.gep(pointer(3), [b.select(trans_a, begin, b.mul(begin, a_cols))])
    bb = pointer(6)
    k = b.select(trans_a, a_rows, a_cols)
    alpha = b.bitcast(field(11), F64)
    blas, loops = fn.append_basic_block("blas"), fn.append_basic_block("loops")
    b.cbranch(b.icmp_signed(">=", b.mul(b.mul(m, n), k), const(SMALL_GEMM)), blas, loops)

    b.position_at_end(blas)  # column-major: out^T = op(b)^T op(a)^T, so BLAS gets b first
    scale = b.fptrunc(alpha, value) if value != F64 else alpha
    cblas = numpy_blas(dtype)
    if cblas is not None:  # cblas_?gemm(order, trans b, trans a, n, m, k, alpha, b, ldb, a, lda, beta, out, ldo)
        I32 = ir.IntType(32)

        def trans(x):
            return b.select(x, ir.Constant(I32, CBLAS_TRANS), ir.Constant(I32, CBLAS_NO_TRANS))

        llvm_code.call(b, cblas, [ir.Constant(I32, CBLAS_COL_MAJOR), trans(trans_b), trans(trans_a), n, m, k,
                                  scale, bb, b_cols, a, a_cols, ir.Constant(value, 0.0), out, n], ir.VoidType())
    else:  # numba_xxgemm takes alpha and beta by address, the flags as 't'/'n'
        void_p = CHAR.as_pointer()

        def slot(x):
            p = b.alloca(value)
            b.store(x, p)
            return b.bitcast(p, void_p)

        def flag(x):
            return b.select(x, ir.Constant(CHAR, ord("t")), ir.Constant(CHAR, ord("n")))

        llvm_code.call(b, "numba_xxgemm", [ir.Constant(CHAR, ord("s" if dtype == "float32" else "d")), flag(trans_b),
                                           flag(trans_a), n, m, k, slot(scale), b.bitcast(bb, void_p), b_cols,
                                           b.bitcast(a, void_p), a_cols, slot(ir.Constant(value, 0.0)),
                                           b.bitcast(out, void_p), n], ir.IntType(32))
    b.ret_void()

    b.position_at_end(loops)
    a_i, a_q = b.select(trans_a, const(1), a_cols), b.select(trans_a, a_cols, const(1))
    b_q, b_j = b.select(trans_b, const(1), b_cols), b.select(trans_b, b_cols, const(1))
    dots = b.select(trans_b, b.icmp_signed(">", k, const(1)), b.icmp_signed("==", n, const(1)))
    acc = b.alloca(F64)

    def load(p, index):
        return b.load(b.gep(p, [index]))

    def at(i, i_stride, j, j_stride):
        return b.add(b.mul(i, i_stride), b.mul(j, j_stride))

    def store(index, x):  # a float64 into out
        b.store(b.fptrunc(x, value) if value != F64 else x, b.gep(out, [index]))

    def widen(x):
        return b.fpext(x, F64) if value != F64 else x

    def dot_loops(a_i, a_q, b_q, b_j):
        def row(i):
            def column(j):
                b.store(ir.Constant(F64, 0.0), acc)
                llvm_code.for_range(b, k, lambda q: b.store(b.fadd(b.load(acc), widen(b.fmul(
                    load(a, at(i, a_i, q, a_q)), load(bb, at(q, b_q, j, b_j))))), acc), "q")
                store(b.add(b.mul(i, n), j), b.fmul(alpha, b.load(acc)))

            llvm_code.for_range(b, n, column, "j")

        llvm_code.for_range(b, m, row, "i")

    def axpy_loops():  # row i of out += op(a)[i, q] * row q of op(b)
        def row(i):
            llvm_code.for_range(b, n, lambda j: store(b.add(b.mul(i, n), j), ir.Constant(F64, 0.0)), "j0")

            def term(q):
                x = b.fmul(alpha, widen(load(a, at(i, a_i, q, a_q))))

                def add(j):
                    index = b.add(b.mul(i, n), j)
                    store(index, b.fadd(widen(load(out, index)), b.fmul(x, widen(load(bb, at(q, b_q, j, b_j))))))

                llvm_code.for_range(b, n, add, "j")

            llvm_code.for_range(b, k, term, "q")

        llvm_code.for_range(b, m, row, "i")

    rows_rows, general_dots, axpy = (fn.append_basic_block(x) for x in ("rows_rows", "dots", "axpy"))
    b.cbranch(dots, general_dots, axpy)
    b.position_at_end(general_dots)  # rows of a against rows of b, both contiguous: strides known
    special = fn.append_basic_block("general")
    b.cbranch(b.and_(b.not_(trans_a), trans_b), rows_rows, special)
    b.position_at_end(rows_rows)
    dot_loops(a_cols, const(1), const(1), b_cols)
    b.ret_void()
    b.position_at_end(special)
    dot_loops(a_i, a_q, b_q, b_j)
    b.ret_void()
    b.position_at_end(axpy)
    axpy_loops()
    b.ret_void()
    return fn


@kernel(llvm=gemm_ir("float32"))
def gemm_float32(frame, begin, end):
    _gemm(frame, begin, end, numba.float32, 4)


@kernel(llvm=gemm_ir("float64"))
def gemm_float64(frame, begin, end):
    _gemm(frame, begin, end, numba.float64, 8)


# --------------------------------------------------------------------------- products within blocks
# ``ir.BlockGemm`` (attention's scores and mixes): the product of every block of ``block`` rows (a
# sequence), each one call of the product above on that block's rows. Its frame is the product's
# with the block's rows last; its units are the blocks, so a thread computes whole sequences.

#: The frame's length: the product's, then the rows of a block of out, a and b.
BLOCK_GEMM_FRAME = GEMM_FRAME + 3


def _block_frame(f, s, size):
    """The product frame of block ``s`` of the block product frame ``f``: each slot's ``s``-th block
    of its rows."""
    inner = np.empty(GEMM_FRAME, np.int64)
    for slot in range(3):
        at, rows = 3 * slot, f[GEMM_FRAME + slot]
        inner[at] = f[at] + s * rows * f[at + 2] * size
        inner[at + 1] = rows
        inner[at + 2] = f[at + 2]
    inner[9:GEMM_FRAME] = f[9:GEMM_FRAME]
    return inner


def _block_gemm(frame, begin, end, dtype, size):
    """Blocks ``begin:end`` of the product (the Python reference the IR below follows; what runs
    under ``NUMBA_DISABLE_JIT``)."""
    f = carray(frame, (BLOCK_GEMM_FRAME,))
    for s in range(begin, end):
        _gemm(_block_frame(f, s, size), 0, f[GEMM_FRAME], dtype, size)


def block_gemm_ir(dtype: str) -> str:
    """``_block_gemm`` for ``dtype`` as an LLVM module: ``void symdl_block_gemm_<dtype>(i64 *frame,
    i64 begin, i64 end)`` first (the module's entry), then its own copy of the product, internal."""
    I64 = llvm_code.I64
    size = 4 if dtype == "float32" else 8
    module = ir.Module(name=f"symdl_block_gemm_{dtype}")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64.as_pointer(), I64, I64]),
                     f"symdl_block_gemm_{dtype}")
    product = _gemm_function(module, f"symdl_block_gemm_product_{dtype}", dtype)
    product.linkage = "internal"
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    frame, begin, end = fn.args

    def field(k):
        return b.load(b.gep(frame, [ir.Constant(I64, k)]))

    inner = b.alloca(I64, ir.Constant(I64, GEMM_FRAME))

    def put(k, v):
        b.store(v, b.gep(inner, [ir.Constant(I64, k)]))

    for k in range(9, GEMM_FRAME):
        put(k, field(k))

    def block(s):
        for slot in range(3):
            at, rows = 3 * slot, field(GEMM_FRAME + slot)
            cols = field(at + 2)
            offset = b.mul(b.mul(b.mul(s, rows), cols), ir.Constant(I64, size))
            put(at, b.add(field(at), offset))
            put(at + 1, rows)
            put(at + 2, cols)
        b.call(product, [inner, ir.Constant(I64, 0), field(GEMM_FRAME)])

    llvm_code.for_range(b, end, block, "s", first=begin)
    b.ret_void()
    return str(module)


@kernel(llvm=block_gemm_ir("float32"))
def block_gemm_float32(frame, begin, end):
    _block_gemm(frame, begin, end, numba.float32, 4)


@kernel(llvm=block_gemm_ir("float64"))
def block_gemm_float64(frame, begin, end):
    _block_gemm(frame, begin, end, numba.float64, 8)
