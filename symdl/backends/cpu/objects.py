"""Compiled kernels on disk: a kernel's machine code saved once, loaded back without Numba's compiler.

Numba's own cache (``cache=True``) loads through its dispatcher, and the first load in a
process initialises Numba's whole compiler first (``target_context.refresh()``, which costs
more than loading every kernel of a step: docs/performance.md). A
compiled kernel does not need the compiler. This module saves what Numba's cache saves for
a C callback (its library as object code, ``serialize_using_object_code``) together with
the name of its C entry point, and loads it straight into Numba's JIT engine
(``unserialize_library``): a warm process compiles nothing and never starts the compiler.

A file is used only if it is whole (a SHA-256 digest of its content heads it), was written
by this Numba version, and was compiled for this CPU (``codegen.magic_tuple()``: target,
CPU name and features, hashed into the file name). Anything else is ignored, and the
kernel is compiled and the file rewritten.

>>> import numba, tempfile, ctypes
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> def add_one(x):
...     return x + 1
>>> compiled = numba.cfunc("int64(int64)")(add_one)
>>> save(folder / "symdl_add_one", compiled._library, compiled.native_name)
True
>>> address = load(folder / "symdl_add_one")
>>> ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(address)(41)
42
"""
from __future__ import annotations

import functools
import hashlib
import pickle
from pathlib import Path

import numba

from .. import cache

#: Bumped when the file layout changes: older files are then ignored.
FORMAT = 2

#: Libraries loaded in this process; the JIT engine runs their code, so they stay alive.
_LIBRARIES: list = []


def _codegen():
    from numba.core.registry import cpu_target

    return cpu_target.target_context.codegen()  # no compiler set-up, only LLVM's


@functools.cache
def machine() -> str:
    """A short hash of what the JIT compiles for: target triple, CPU name and its features."""
    return hashlib.sha256(repr(_codegen().magic_tuple()).encode()).hexdigest()[:12]


def object_path(stem: Path) -> Path:
    """The file for ``stem`` on this machine: ``<stem>.<machine>.o``."""
    return stem.with_name(f"{stem.name}.{machine()}.o")


def save(stem: Path, library, symbol: str) -> bool:
    """Write a compiled ``library`` (Numba's ``CodeLibrary``, of a ``numba.cfunc`` or of
    ``compile_llvm``) and the name of its C entry point for later ``load``; False when it cannot
    be saved: its code uses a Python environment (object-mode calls, exceptions with runtime
    values; symdl's kernels have none), which only Numba's own cache rebuilds, or the disk refused."""
    module = library._final_module
    text = str(module)
    for g in module.global_variables:  # an environment (Python globals, constants) only Numba can rebuild
        if g.name.startswith("_ZN08NumbaEnv") and text.count(g.name) > 1:  # defined, and used
            return False
    # what loading must run first, as Numba's cache does: a threaded kernel's is the launch of
    # Numba's thread pool (which registers the symbols its code calls)
    reload = sorted(getattr(library, "_reload_init", ()), key=lambda f: f"{f.__module__}.{f.__qualname__}")
    externals = _externals(module)
    payload = pickle.dumps((FORMAT, numba.__version__, library.serialize_using_object_code(),
                            symbol, reload, externals))
    try:
        cache.write_atomically(object_path(stem), hashlib.sha256(payload).digest() + payload)
    except OSError:
        return False
    return True


def _externals(module) -> list:
    """The symbols an LLVM module (``llvmlite.binding``) calls or reads but does not define;
    LLVM's own intrinsics aside."""
    return sorted({f.name for f in module.functions if f.is_declaration and not f.name.startswith("llvm.")}
                  | {g.name for g in module.global_variables if g.is_declaration})


def _runtime_symbols() -> None:
    """Numba's runtime (NRT) C functions, as ``rtsys.initialize`` registers them, without the
    LLVM module it also compiles for code the compiler generates: loaded code
    only calls the C functions (a view's reference-count path names ``NRT_MemInfo_call_dtor``)."""
    import llvmlite.binding as ll
    from numba.core.runtime import _nrt_python as _nrt

    for name, address in _nrt.c_helpers.items():
        ll.add_symbol(name if name.startswith("_") else "NRT_" + name, address)


def resolvable(externals, reload=()) -> bool:
    """Make the symbols the code calls known to the JIT engine, as Numba's compiler would have
    (its runtime, its C helpers and math functions; its thread pool, through the library's reload
    hooks), and check that each one is: LLVM aborts the process on a missing symbol, so code
    with one is compiled by Numba instead of loaded."""
    import llvmlite.binding as ll
    from numba import _helperlib

    if any(name.startswith("NRT_") and not ll.address_of_symbol(name) for name in externals):
        _runtime_symbols()
    for name in externals:  # as numba.core.base and numba.core.externals register them
        helper = name[len("numba_"):] if name.startswith("numba_") else name
        if not ll.address_of_symbol(name) and helper in _helperlib.c_helpers:
            ll.add_symbol(name, _helperlib.c_helpers[helper])
    for init in reload:
        init()
    return all(ll.address_of_symbol(name) for name in externals)


def compile_llvm(text: str, symbol: str):
    """The LLVM module ``text`` (``llvm_code``) compiled by Numba's JIT code generator (its
    optimisation passes, its engine), with its object code kept for ``save``; None when a
    function it calls is not known to the JIT engine."""
    import llvmlite.binding as ll
    from numba.core.compiler_lock import global_compiler_lock

    codegen = _codegen()
    module = ll.parse_assembly(text)
    if not resolvable(_externals(module)):
        return None
    with global_compiler_lock:  # Numba's code generator is not reentrant
        library = codegen.create_library(symbol)
        target = library.create_ir_module(symbol)
        module.triple, module.data_layout = target.triple, str(target.data_layout)
        library.enable_object_caching()
        library.add_llvm_module(module)
        library.finalize()
    _LIBRARIES.append(library)
    return library


def load(stem: Path) -> int | None:
    """The address of the C entry point saved for ``stem``, or None (no file, or one not
    whole, or written by another Numba or for another CPU)."""
    path = object_path(stem)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        cache.corrupt(path, f"unreadable ({exc})")
        return None
    digest, payload = data[:32], data[32:]
    if hashlib.sha256(payload).digest() != digest:  # files are renamed into place whole: damaged on disk
        cache.corrupt(path, f"corrupt or truncated ({len(data)} bytes, its digest does not match)")
        return None
    try:
        fmt, version, state, symbol, reload, externals = pickle.loads(payload)
    except Exception:  # written by another symdl: ignored, recompiled
        return None
    if fmt != FORMAT or version != numba.__version__:
        return None
    if not resolvable(externals, reload):
        return None
    library = _codegen().unserialize_library(state)
    address = library.get_pointer_to_function(symbol)
    _LIBRARIES.append(library)
    return address

