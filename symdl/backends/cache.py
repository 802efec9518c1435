"""The compile cache: generated modules and their kernels' machine code on disk.

Each generated module is written to ``$SYMDL_CACHE_DIR`` (default ``~/.cache/symdl``) under
a hash of its source, the backend and the Numba version (the source already spells out the
program and every shape); the CPU backend saves each kernel's machine code beside it
(``objects``), and the code of symdl's own prebuilt kernels under ``prebuilt_dir``. A corrupt
or truncated module file is rewritten, corrupt machine code is ignored, compiled again and
rewritten, and each is reported once as a ``RuntimeWarning`` naming the file (``Runner``
also retries once after clearing a module's compiled code).

Several processes may share one cache and compile the same model at the same moment
(docs/reliability.md): every file is written whole under a temporary name and renamed into
place (``write_atomically``), so a reader sees no file or a whole one, and writers racing on
one entry write the same bytes. A temporary file left by a killed process (its name carries
the writer's process id and host) is removed by the next write into its folder and by
``prune``.

The cache does not grow without bound: each time a new module is written, entries unused
for ``MAX_AGE_DAYS`` are removed, then the least recently used ones while the cache is over
``MAX_BYTES`` (``$SYMDL_CACHE_MAX_MB`` overrides it). ``symdl cache info`` and ``symdl cache
clear`` show and empty it.

>>> import os, tempfile
>>> folder, before = tempfile.TemporaryDirectory(), os.environ.get("SYMDL_CACHE_DIR")
>>> os.environ["SYMDL_CACHE_DIR"] = folder.name
>>> m = load_module("def f():\\n    return 1\\n", backend="doc")
>>> m.f(), module_path("def f():\\n    return 1\\n", "doc").exists()
(1, True)
>>> info()["entries"], clear(), info()["entries"]
(1, 1, 0)
>>> if before is None: del os.environ["SYMDL_CACHE_DIR"]
... else: os.environ["SYMDL_CACHE_DIR"] = before
>>> folder.cleanup()
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
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


def write_atomically(path: Path, content: str | bytes) -> None:
    """Write ``path`` so a reader sees the old file or the new one, never half of one (text as
    UTF-8: kernel comments hold δ, ⊙, ∂); a failed write leaves no temporary file behind, and
    one left by a killed writer is removed here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    remove_leftovers(path.parent)
    fd, tmp = temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_file(path, write, what: str = "cannot save") -> None:
    """A user's file (a checkpoint, weights, an exported model) written so that a failed save, even
    a SIGKILL, leaves the previous file untouched: ``write(f)`` fills a temporary file beside
    ``path``, which is flushed, fsynced, given the usual mode (0666 less the umask: ``mkstemp``
    makes 0600) and renamed into place. A directory is never created (a typo must not make a new
    tree): a missing one is ``FileNotFoundError("<what> <path>: the directory ... does not exist")``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{what} {path}: the directory {path.parent} does not exist")
    remove_leftovers(path.parent, of=path.name)  # of a save killed earlier
    fd, tmp = temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.chmod(tmp, 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it, then put it back
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- temporary files

#: Numba's cache writes ``<file>.tmp.<16 hex digits>`` (no owner in the name): removed once this old.
FOREIGN_TMP_AGE_S = 3600
#: A temporary file of ours from another host (whose processes cannot be asked) is removed once this old.
REMOTE_TMP_AGE_S = 86400

_OURS = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[^/]+)\.[^./]+\.tmp$")
_NUMBA_TMP = re.compile(r"\.tmp\.[0-9a-f]{16}$")


def temporary(path: Path) -> tuple:
    """``(fd, name)`` of a new temporary file beside ``path``, opened for writing; its name
    (``.<file>.<pid>@<host>.<random>.tmp``) tells ``remove_leftovers`` who writes it."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}@{socket.gethostname()}.",
                            suffix=".tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def leftover(file: Path, now: float | None = None) -> bool:
    """Whether ``file`` is a temporary file whose writer is gone: one of ours written by a process
    of this host that no longer runs (or, from another host, a day old), or one of Numba's an hour old.

    >>> import os
    >>> leftover(Path(f".model.symdl.{os.getpid()}@{socket.gethostname()}.x1y2.tmp"))
    False
    >>> leftover(Path(f".model.symdl.999999999@{socket.gethostname()}.x1y2.tmp")), leftover(Path("model.symdl"))
    (True, False)
    """
    mine = _OURS.match(file.name)
    if mine is None and not _NUMBA_TMP.search(file.name):
        return False
    if mine is not None and mine["host"] == socket.gethostname():
        return not _alive(int(mine["pid"]))
    try:
        age = (time.time() if now is None else now) - file.stat().st_mtime
    except OSError:  # removed meanwhile
        return False
    return age > (REMOTE_TMP_AGE_S if mine is not None else FOREIGN_TMP_AGE_S)


def remove_leftovers(folder: Path, of: str | None = None) -> int:
    """Remove the temporary files killed writers left in ``folder`` (and in Numba's ``__pycache__``
    below it); with ``of``, only symdl's own ones for the file named ``of`` (a user's folder:
    nothing else in it is touched). Returns how many."""
    removed = 0
    for sub in (folder,) if of is not None else (folder, folder / "__pycache__"):
        try:
            names = list(sub.iterdir())
        except OSError:
            continue
        for f in names:
            if (of is None or (f.name.startswith(f".{of}.") and _OURS.match(f.name))) and leftover(f):
                try:
                    f.unlink()
                    removed += 1
                except OSError:  # removed by another process
                    pass
    return removed


def corrupt(file: Path, what: str) -> None:
    """Report a cache file found corrupt (it is rebuilt): a ``RuntimeWarning`` naming it."""
    warnings.warn(f"symdl compile cache: {file} is {what}; it is rebuilt", RuntimeWarning, stacklevel=3)


def load_module(source: str, backend: str):
    """Import ``source`` from its cache file, writing (or rewriting) the file first if needed."""
    path = module_path(source, backend)
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        current = None
        corrupt(path, f"unreadable ({exc})")
    if current is not None and current != source.encode("utf-8"):  # its name is its content's hash
        corrupt(path, f"corrupt or truncated ({len(current)} bytes, not the {len(source.encode())} of its source)")
        clear_compiled(path)  # what sat beside a damaged file is not trusted either
    if current != source.encode("utf-8"):  # missing or corrupt: write it afresh
        # (a missing module's compiled code stays: another process may be writing it right now,
        # it is keyed by the same hash, and Numba's own index checks the file's time stamp)
        write_atomically(path, source)
        prune(keep=path.parent)
    else:
        _touch(path.parent)  # recently used: pruning removes the least recently used first
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Numba's cache locator wants the module importable by name
    spec.loader.exec_module(module)
    return module


def clear_compiled(path: Path) -> None:
    """Delete the compiled code saved for the module at ``path`` (symdl's and Numba's)."""
    shutil.rmtree(path.parent / "__pycache__", ignore_errors=True)
    for f in path.parent.glob("*.o"):
        f.unlink(missing_ok=True)


@functools.cache
def _file_key(source: Path) -> str:
    return key(source.read_text(encoding="utf-8"), "prebuilt")


def prebuilt_dir(source: Path) -> Path:
    """Where the compiled code of one of symdl's own modules (the CPU driver, the matrix
    products) is saved: one entry per version of that file, compiled once per machine."""
    return cache_dir() / "cpu" / f"symdl_{source.stem}_{_file_key(source)}"


# --------------------------------------------------------------------------- size and age limits

#: Entries not used for this many days are removed when a new module is written.
MAX_AGE_DAYS = 30
#: Past this size the least recently used entries are removed (``$SYMDL_CACHE_MAX_MB`` overrides).
MAX_BYTES = 1 << 30


def _touch(entry: Path) -> None:
    try:
        os.utime(entry)
    except OSError:
        pass


def entries() -> list:
    """``[(entry directory, bytes, last used as a timestamp)]``: one per generated module."""
    out = []
    root = cache_dir()
    if not root.is_dir():
        return out
    for backend in root.iterdir():
        if not backend.is_dir():
            continue
        for entry in backend.iterdir():
            if not (entry.is_dir() and (entry.name.startswith("symdl_") or any(entry.glob("symdl_*.py")))):
                continue  # not ours: never delete what symdl did not write
            try:
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                out.append((entry, size, entry.stat().st_mtime))
            except OSError:  # removed meanwhile by another process
                continue
    return out


def info() -> dict:
    """Where the cache is, how many modules it holds and their size in bytes."""
    found = entries()
    return {"path": str(cache_dir()), "entries": len(found), "bytes": sum(size for _, size, _ in found)}


def clear() -> int:
    """Remove every generated module and Numba's compiled code for it; returns how many."""
    found = entries()
    for entry, _, _ in found:
        shutil.rmtree(entry, ignore_errors=True)
    return len(found)


def max_bytes() -> int:
    env = os.environ.get("SYMDL_CACHE_MAX_MB")
    try:
        return int(float(env) * (1 << 20)) if env else MAX_BYTES
    except ValueError:
        return MAX_BYTES


def prune(max_age_days: float | None = None, max_size: int | None = None, keep: Path | None = None) -> int:
    """Remove entries unused for ``max_age_days``, then the least recently used ones while the
    cache is larger than ``max_size`` bytes; ``keep`` (the entry just written) stays; temporary
    files left by killed writers go too. Returns how many entries were removed."""
    max_age_days = MAX_AGE_DAYS if max_age_days is None else max_age_days
    max_size = max_bytes() if max_size is None else max_size
    found = sorted(entries(), key=lambda e: e[2])  # least recently used first
    for entry, _, _ in found:
        remove_leftovers(entry)
    total = sum(size for _, size, _ in found)
    cutoff = time.time() - max_age_days * 86400
    removed = 0
    for entry, size, used in found:
        if keep is not None and entry == keep:
            continue
        if used < cutoff or total > max_size:
            shutil.rmtree(entry, ignore_errors=True)
            total -= size
            removed += 1
    return removed
