"""The compile cache: generated modules on disk, so Numba's ``cache=True`` can work.

Numba caches compiled code only for functions defined in files. Each generated
module is written to ``$SYMDL_CACHE_DIR`` (default ``~/.cache/symdl``) under a hash
of its source, the backend and the Numba version (the source already spells out
the program and every shape). A stale or corrupt module file is rewritten; a
corrupt Numba cache entry is deleted and rebuilt (``Runner`` retries once).

>>> import os, tempfile
>>> os.environ["SYMDL_CACHE_DIR"] = tempfile.mkdtemp()
>>> m = load_module("def f():\\n    return 1\\n", backend="doc")
>>> m.f(), module_path("def f():\\n    return 1\\n", "doc").exists()
(1, True)
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numba

from ..version import __version__


def cache_dir() -> Path:
    """Where generated modules live: ``$SYMDL_CACHE_DIR``, else the user's cache directory."""
    env = os.environ.get("SYMDL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "symdl"


def key(source: str, backend: str) -> str:
    h = hashlib.sha256()
    for part in (source, backend, numba.__version__, __version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def module_path(source: str, backend: str) -> Path:
    k = key(source, backend)
    return cache_dir() / backend / k / f"symdl_{backend}_{k}.py"


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_module(source: str, backend: str):
    """Import ``source`` from its cache file, writing (or rewriting) the file first if needed."""
    path = module_path(source, backend)
    try:
        current = path.read_text()
    except (OSError, UnicodeDecodeError):
        current = None
    if current != source:  # missing, stale or corrupt: write it afresh, drop Numba's entries too
        clear_compiled(path)
        _write_atomically(path, source)
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Numba's cache locator wants the module importable by name
    spec.loader.exec_module(module)
    return module


def clear_compiled(path: Path) -> None:
    """Delete Numba's cache entries for the module at ``path``."""
    shutil.rmtree(path.parent / "__pycache__", ignore_errors=True)
