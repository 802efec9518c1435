"""symdl under load and faults (issue 31; docs/reliability.md summarises what held): processes
compiling into one cache at the same moment, cache files damaged on disk, saves and compiles
killed half way, and long runs. Every subject runs in a child process, so a crash fails a test
instead of taking pytest down."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="nothing compiled to cache")

#: Builds and trains a small CNN and an MLP on the CPU backend (compiling into $SYMDL_CACHE_DIR),
#: after symdl is imported and the file argv[1] exists (the barrier), and saves their weights to argv[2].
TRAIN = r'''
import json, os, sys, time, warnings
import numpy as np, symdl as sd
barrier, out = sys.argv[1], sys.argv[2]
open(out + ".ready", "w").close()
deadline = time.time() + 120
while not os.path.exists(barrier):
    if time.time() > deadline:
        sys.exit("the barrier never opened")
    time.sleep(0.002)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    X, y = sd.datasets.digits(images=True)
    cnn = sd.nn.Sequential([sd.nn.Conv2D(4, 3, padding="same", activation="relu"), sd.nn.MaxPooling2D(2),
                            sd.nn.Flatten(), sd.nn.Dense(10)], input_shape=(8, 8, 1))
    cnn.compile(optimizer=sd.optim.Adam(1e-2), backend="cpu", seed=1)
    cnn.fit(X[:256], y[:256], epochs=2, batch_size=8, verbose=0, seed=0)
    mlp = sd.nn.Sequential([sd.nn.Dense(32, activation="tanh"), sd.nn.Dense(10)], input_shape=(64,))
    mlp.compile(optimizer=sd.optim.SGD(0.05), backend="cpu", seed=2)
    mlp.fit(X[:256].reshape(256, 64), y[:256], epochs=2, batch_size=8, verbose=0, seed=0)
weights = {f"cnn.{k}": v for k, v in cnn.get_weights().items()}
weights.update({f"mlp.{k}": v for k, v in mlp.get_weights().items()})
np.savez(out, **weights)
print("CACHE-WARNINGS " + json.dumps([str(w.message) for w in caught if "compile cache" in str(w.message)]))
'''


def _env(cache: Path) -> dict:
    env = dict(os.environ, SYMDL_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    env.pop("NUMBA_DISABLE_JIT", None)
    return env


def _start(script: str, args, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=_env(cache), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"a child ran past {timeout} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"a child failed (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
    return out


def _warnings(out: str) -> list:
    return json.loads(next(line for line in out.splitlines() if line.startswith("CACHE-WARNINGS "))[15:])


def _train(folder: Path, cache: Path, name: str = "run", barrier_open: bool = True):
    """Weights (and the cache warnings) of one TRAIN run, alone."""
    barrier = folder / "go"
    if barrier_open:
        barrier.touch()
    out = _finish(_start(TRAIN, [barrier, folder / f"{name}.npz"], cache))
    with np.load(folder / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}, _warnings(out)


def _files(cache: Path) -> set:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def _temporary(cache: Path) -> list:
    return sorted(p for p in _files(cache) if p.endswith(".tmp") or ".tmp." in p)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The weights of one run alone with an empty cache, the files it left there, and the cache."""
    folder = tmp_path_factory.mktemp("serial")
    weights, warned = _train(folder, folder / "cache")
    assert warned == []
    return weights, _files(folder / "cache"), folder / "cache"


# --------------------------------------------------------------------------- concurrent compiles


def _concurrent(tmp_path: Path, serial, repetitions: int, processes: int = 4) -> None:
    reference, files, _ = serial
    for rep in range(repetitions):
        folder = tmp_path / f"rep{rep}"
        folder.mkdir()
        cache, barrier = folder / "cache", folder / "go"
        procs = [_start(TRAIN, [barrier, folder / f"p{i}.npz"], cache) for i in range(processes)]
        try:
            deadline = time.time() + 120
            while not all((folder / f"p{i}.npz.ready").exists() for i in range(processes)):  # all imported
                assert time.time() < deadline and all(p.poll() is None for p in procs), "a child never got ready"
                time.sleep(0.01)
            barrier.touch()  # all start compiling at the same moment
            outs = [_finish(p) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        for i, out in enumerate(outs):
            assert _warnings(out) == [], f"repetition {rep}, process {i} saw a damaged cache file"
            with np.load(folder / f"p{i}.npz") as z:
                assert _same({k: z[k] for k in z.files}, reference), f"repetition {rep}, process {i}: other weights"
        assert _temporary(cache) == [], f"repetition {rep} left temporary files"
        assert _files(cache) == files, f"repetition {rep}: the cache differs from a serial run's"


def test_four_processes_compiling_one_model_at_once_agree_with_a_serial_run(tmp_path, serial):
    _concurrent(tmp_path, serial, repetitions=3)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SYMDL_SOAK"), reason="a soak: 20 cold rounds of 4 processes take about 8 "
                    "minutes on 2 cores, beyond CI's budget; SYMDL_SOAK=1 runs it (docs/reliability.md has its result)")
def test_four_processes_compiling_at_once_twenty_times(tmp_path, serial):
    _concurrent(tmp_path, serial, repetitions=20)


# --------------------------------------------------------------------------- damaged cache files


def _copy(files: set, source: Path, target: Path) -> None:
    for f in files:
        (target / f).parent.mkdir(parents=True, exist_ok=True)
        (target / f).write_bytes((source / f).read_bytes())


def test_damaged_cache_files_are_reported_once_rebuilt_and_give_the_same_weights(tmp_path, serial):
    """Extends tests/test_cpu_backend.py::test_corrupt_cache_entries_are_rebuilt (garbage in every
    ``.o``, a module that is not Python) with truncation, symdl's prebuilt driver, the warning and
    the weights: a module cut in half, an object file of garbage, an empty one, the driver's cut in half."""
    reference, files, original = serial
    cache = tmp_path / "cache"
    _copy(files, original, cache)
    entries = sorted({f.split("/")[1] for f in files if f.startswith("cpu/") and f.endswith(".o")
                      and not f.split("/")[1].startswith("symdl_")})  # generated formulas with machine code
    module = cache / "cpu" / entries[0] / f"symdl_cpu_{entries[0]}.py"
    garbage, empty = (next((cache / "cpu" / e).glob("*.o")) for e in entries[1:3])
    driver = next(cache.glob("cpu/symdl_runtime_*/*.o"))
    module.write_bytes(module.read_bytes()[: module.stat().st_size // 2])
    garbage.write_bytes(b"garbage" * 100)
    empty.write_bytes(b"")
    driver.write_bytes(driver.read_bytes()[: driver.stat().st_size // 2])
    weights, warned = _train(tmp_path, cache, "damaged")
    assert _same(weights, reference), "a damaged cache gave other weights"
    for damaged in (module, garbage, empty, driver):
        assert sum(str(damaged) in w for w in warned) == 1, f"{damaged.name} not reported once: {warned}"
    assert len(warned) == 4 and all("is rebuilt" in w for w in warned), warned
    weights, warned = _train(tmp_path, cache, "again")
    assert _same(weights, reference) and warned == [], "the damaged files were not rewritten"
    assert _files(cache) == files


# --------------------------------------------------------------------------- interrupted work

#: Loads the checkpoint argv[1] and saves it back to the same path again and again until killed.
SAVE_LOOP = r'''
import sys
import symdl as sd
model = sd.nn.load(sys.argv[1], backend="numpy")
print("SAVING", flush=True)
while True:
    model.save(sys.argv[1])
'''


def _big_model(path: Path):
    """A 1-million-parameter MLP (12 MB with Adam's moments) saved at ``path``, and its predictions."""
    import symdl as sd

    model = sd.nn.Sequential([sd.nn.Dense(1000, activation="tanh"), sd.nn.Dense(1000, activation="tanh"),
                              sd.nn.Dense(10)], input_shape=(64,))
    model.compile(optimizer=sd.optim.Adam(1e-3), backend="numpy", seed=3)
    X = np.random.default_rng(0).normal(size=(16, 64))
    model.save(path)
    return X, model.predict(X)


def _leftovers(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_save_killed_at_random_moments_leaves_the_previous_checkpoint_whole(tmp_path):
    import symdl as sd

    path = tmp_path / "big.symdl"
    X, before = _big_model(path)
    rng, torn = random.Random(31), 0
    for _ in range(10):
        proc = _start(SAVE_LOOP, [path], tmp_path / "cache")
        try:
            assert proc.stdout.readline().strip() == "SAVING", "the child never started saving"
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
        torn += bool(_leftovers(tmp_path))  # killed half way through writing its temporary file
        again = sd.nn.load(path, backend="numpy")
        np.testing.assert_array_equal(again.predict(X), before)
    assert torn >= 1, "no kill landed during a save: the test did not test"
    sd.nn.load(path, backend="numpy").save(path)  # the next save starts clean: it removes what the killed ones left
    assert _leftovers(tmp_path) == []


def test_a_save_interrupted_by_sigint_leaves_no_temporary_file(tmp_path):
    import symdl as sd

    path = tmp_path / "big.symdl"
    X, before = _big_model(path)
    proc = _start(SAVE_LOOP, [path], tmp_path / "cache")
    try:
        assert proc.stdout.readline().strip() == "SAVING"
        time.sleep(0.7)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert _leftovers(tmp_path) == []  # cleaned up on the way out
    np.testing.assert_array_equal(sd.nn.load(path, backend="numpy").predict(X), before)


#: Opens a temporary file for argv[1] as the compile cache names it, says so, and waits to be killed.
HALF_WRITE = r'''
import os, sys, time
from pathlib import Path
from symdl.backends import cache
fd, tmp = cache.temporary(Path(sys.argv[1]))
os.write(fd, b"half a file")
print(tmp, flush=True)
time.sleep(600)
'''


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    """What a killed writer leaves goes with the next write into its folder; a live writer's
    temporary file, a fresh one of Numba's, and files not of this form stay."""
    from symdl.backends import cache

    entry = tmp_path / "cpu" / "symdl_entry"
    (entry / "__pycache__").mkdir(parents=True)
    proc = _start(HALF_WRITE, [entry / "kernel.o"], tmp_path)
    try:
        killed = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert killed.exists() and killed.parent == entry
    live_fd, live = cache.temporary(entry / "other.o")  # this process: still writing
    os.close(live_fd)
    numba_cache = entry / "__pycache__"
    old_numba, new_numba = numba_cache / f"f-1.nbi.tmp.{'a' * 16}", numba_cache / f"f-2.nbi.tmp.{'b' * 16}"
    user = entry / "notes.tmp"
    for f in (old_numba, new_numba, user):
        f.write_bytes(b"x")
    os.utime(old_numba, (time.time() - 2 * cache.FOREIGN_TMP_AGE_S,) * 2)
    cache.write_atomically(entry / "kernel.o", b"whole")
    assert (entry / "kernel.o").read_bytes() == b"whole"
    assert not killed.exists() and not old_numba.exists()
    assert Path(live).exists() and new_numba.exists() and user.exists()


def _kill_compiles(tmp_path: Path, serial, kills: int, seed: int) -> None:
    """Kill TRAIN at random moments of its cold compile ``kills`` times, one cache for all, then
    let it finish: the same weights as a serial run, no warning, no temporary file left."""
    reference, files, _ = serial
    cache, rng = tmp_path / "cache", random.Random(seed)
    (tmp_path / "go").touch()
    for k in range(kills):
        proc = _start(TRAIN, [tmp_path / "go", tmp_path / f"killed{k}.npz"], cache)
        try:
            deadline = time.time() + 120
            while not (tmp_path / f"killed{k}.npz.ready").exists():  # imported: compiling starts now
                assert time.time() < deadline and proc.poll() is None, "the child never got ready"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 3.0))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
    weights, warned = _train(tmp_path, cache, "after")
    assert warned == [], "a killed compile left a damaged file"
    assert _same(weights, reference), "the run after the killed ones gave other weights"
    assert _temporary(cache) == [], "temporary files of the killed compiles are still there"
    assert _files(cache) == files


def test_compiles_killed_at_random_moments_leave_a_usable_cache(tmp_path, serial):
    _kill_compiles(tmp_path, serial, kills=3, seed=31)


@pytest.mark.slow
def test_compiles_killed_ten_times_leave_a_usable_cache(tmp_path, serial):
    _kill_compiles(tmp_path, serial, kills=10, seed=32)


# --------------------------------------------------------------------------- long runs

#: Trains a model for argv[1] steps in one process and prints, at each epoch's end: seconds,
#: steps so far, resident memory (kB) and open file descriptors. argv[2]: "mlp" or "cnn".
LONG_RUN = r'''
import json, math, os, sys, time
import numpy as np, symdl as sd

def resident_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

steps, kind = int(sys.argv[1]), sys.argv[2]
if kind == "cnn":
    X, y = sd.datasets.digits(images=True)
    model = sd.nn.Sequential([sd.nn.Conv2D(4, 3, padding="same", activation="relu"), sd.nn.MaxPooling2D(2),
                              sd.nn.Flatten(), sd.nn.Dense(10)], input_shape=(8, 8, 1))
else:
    X, y = sd.datasets.digits()
    model = sd.nn.Sequential([sd.nn.Dense(32, activation="tanh"), sd.nn.Dense(10)], input_shape=(64,))
model.compile(optimizer=sd.optim.Adam(1e-3), backend="cpu", seed=0)
per_epoch = math.ceil(len(X) / 32)
rows = []

class Probe(sd.nn.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        rows.append((time.perf_counter(), (epoch + 1) * per_epoch, resident_kb(), len(os.listdir("/proc/self/fd"))))

rows.append((time.perf_counter(), 0, resident_kb(), len(os.listdir("/proc/self/fd"))))
model.fit(X, y, epochs=math.ceil(steps / per_epoch), batch_size=32, verbose=0, callbacks=[Probe()])
print("ROWS " + json.dumps(rows))
'''

#: Calls ``fit`` argv[1] times on one model (a user's loop, scikit-learn's ``partial_fit``) and
#: prints resident memory (kB) and open file descriptors after each hundred calls.
MANY_FITS = r'''
import json, os, sys
import symdl as sd

def resident_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

X, y = sd.datasets.digits()
model = sd.nn.Sequential([sd.nn.Dense(32, activation="tanh"), sd.nn.Dense(10)], input_shape=(64,))
model.compile(optimizer=sd.optim.Adam(1e-3), backend="cpu", seed=0)
rows = []
for i in range(int(sys.argv[1])):
    model.fit(X[i % 20 * 64:(i % 20 + 1) * 64], y[i % 20 * 64:(i % 20 + 1) * 64], epochs=1, batch_size=32, verbose=0)
    if (i + 1) % 100 == 0:
        rows.append((i + 1, resident_kb(), len(os.listdir("/proc/self/fd"))))
print("ROWS " + json.dumps(rows))
'''


def _rows(script: str, args, cache: Path) -> list:
    out = _finish(_start(script, args, cache), timeout=300)
    return json.loads(next(line for line in out.splitlines() if line.startswith("ROWS "))[5:])


def _flat_run(rows: list, warm_up: int, what: str) -> None:
    """Resident memory grows under 5 MB after ``warm_up`` steps, the last thousand steps are at most
    20% slower than the second thousand (medians of epoch times: faster is fine, the machine is
    shared), no file descriptor is leaked."""
    warm = next(r for r in rows if r[1] >= warm_up)
    last = rows[-1]
    assert last[2] - warm[2] < 5 * 1024, f"{what}: resident memory grew {last[2] - warm[2]} kB after warm-up"
    assert last[3] == warm[3], f"{what}: open file descriptors went from {warm[3]} to {last[3]}"
    epochs = [(b[0] - a[0], b[1]) for a, b in zip(rows, rows[1:])]
    second = np.median([t for t, step in epochs if 1000 < step <= 2000])
    final = np.median([t for t, step in epochs if step > last[1] - 1000])
    assert final < 1.2 * second, f"{what}: an epoch took {final * 1e3:.1f} ms at the end, {second * 1e3:.1f} early on"


@pytest.mark.slow
def test_twenty_thousand_mlp_steps_run_flat(tmp_path):
    rows = _rows(LONG_RUN, [20_000, "mlp"], tmp_path / "cache")
    assert rows[-1][1] >= 20_000
    _flat_run(rows, 2000, "digits MLP")


@pytest.mark.slow
def test_three_thousand_cnn_steps_run_flat(tmp_path):
    """The issue asks for 2,000 steps; 3,000 make the last thousand other steps than the second."""
    rows = _rows(LONG_RUN, [3_000, "cnn"], tmp_path / "cache")
    _flat_run(rows, 1000, "digits CNN")


@pytest.mark.slow
def test_a_thousand_fits_on_one_model_leak_nothing(tmp_path):
    rows = _rows(MANY_FITS, [1000], tmp_path / "cache")
    (_, warm, fds), (_, last, fds_last) = rows[1], rows[-1]  # after 200 calls, after 1,000
    assert last - warm < 1024, f"resident memory grew {last - warm} kB over 800 calls of fit"
    assert fds_last == fds
