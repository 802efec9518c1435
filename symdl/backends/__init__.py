"""Backends print a lowered ``Program`` and run it: ``numpy`` (the reference), ``cpu``, ``cuda``,
and ``onnx`` (the program printed as an ONNX graph, run by ONNX Runtime: ``symdl[onnx]``).

Each backend module has ``compile_program(program, dtype) -> Runner`` (``base.Runner``:
one contract for all). Backends never import one another; what they share lives in
``base`` (arenas, the ``Runner`` contract) and ``scalar_code`` (body printers).
"""
from __future__ import annotations

import importlib

from ..registry import Registry

#: Backend name -> module path (imported on first use: the CUDA one needs numba-cuda, the ONNX
#: one onnx and onnxruntime).
BACKENDS = Registry("backend")
BACKENDS.update({"numpy": "symdl.backends.numpy_backend", "cpu": "symdl.backends.cpu.backend",
                 "cuda": "symdl.backends.cuda_backend", "onnx": "symdl.backends.onnx"})
NAMES = tuple(BACKENDS)


def get(name: str):
    """The backend module for ``name``."""
    return importlib.import_module(BACKENDS.get(name))
