"""The CPU backend: kernels printed as LLVM IR (Numba's compiler for the rest), BLAS for products.

* ``backend``    ``compile_program``: prints a program's kernels and its driver;
* ``llvm_code``  the LLVM IR printer for loop formulas (``emit``: one handler per kernel class);
* ``llvm_image`` its handlers for the image kernels (``image_code``'s loops, as LLVM IR);
* ``gemm``       the product kernel (BLAS or small loops);
* ``runtime``    kernels, their frames and the driver's table;
* ``objects``    machine code saved and loaded without Numba's compiler.
"""
from .backend import compile_program  # noqa: F401
