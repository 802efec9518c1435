"""Backends print a lowered ``Program`` and run it: ``numpy`` (the reference), ``cpu``, ``cuda``.

Each backend module has ``compile_program(program, dtype) -> Runner`` whose
``run(arrays, scalars)`` fills the program's buffers and returns them by name.
"""
from __future__ import annotations

import importlib

NAMES = ("numpy", "cpu", "cuda")


def get(name: str):
    """The backend module for ``name``."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return importlib.import_module(f"symdl.backends.{name}_backend")
