"""The compile cache's machine code (``backends/objects.py``): saved once, loaded without Numba's
compiler, and never trusted when it is not whole or not for this machine."""
import ctypes
import os
import pickle
import subprocess
import sys
import textwrap

import numba
import pytest

from symdl.backends.cpu import objects

pytestmark = pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no machine code without the JIT")

ADD = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)


def _add_one(x):
    return x + 1


def test_saved_code_loads_and_runs(tmp_path):
    compiled = numba.cfunc("int64(int64)")(_add_one)
    assert objects.save(tmp_path / "symdl_add", compiled._library, compiled.native_name)
    assert objects.object_path(tmp_path / "symdl_add").name.endswith(f".{objects.machine()}.o")
    assert ADD(objects.load(tmp_path / "symdl_add"))(41) == 42
    assert ADD(objects.load(tmp_path / "symdl_add"))(1) == 2  # loading it twice in one process is fine


def test_a_file_not_whole_or_not_ours_is_ignored(tmp_path):
    stem = tmp_path / "symdl_add"
    assert objects.load(stem) is None  # no file
    compiled = numba.cfunc("int64(int64)")(_add_one)
    objects.save(stem, compiled._library, compiled.native_name)
    path = objects.object_path(stem)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # truncated: the digest no longer matches
    assert objects.load(stem) is None
    path.write_bytes(b"garbage" * 10)
    assert objects.load(stem) is None
    payload = pickle.loads(data[32:])
    for changed in ((objects.FORMAT + 1,) + payload[1:], payload[:1] + ("0.0.0",) + payload[2:]):
        blob = pickle.dumps(changed)  # another file layout, another Numba: ignored
        path.write_bytes(objects.hashlib.sha256(blob).digest() + blob)
        assert objects.load(stem) is None


def test_code_calling_a_symbol_this_process_lacks_is_not_loaded(tmp_path):
    """LLVM aborts the process on a missing symbol: such code is compiled again instead."""
    stem = tmp_path / "symdl_add"
    compiled = numba.cfunc("int64(int64)")(_add_one)
    objects.save(stem, compiled._library, compiled.native_name)
    path = objects.object_path(stem)
    payload = list(pickle.loads(path.read_bytes()[32:]))
    payload[-1] = payload[-1] + ["symdl_no_such_symbol"]
    blob = pickle.dumps(tuple(payload))
    path.write_bytes(objects.hashlib.sha256(blob).digest() + blob)
    assert objects.load(stem) is None


WARM = textwrap.dedent(
    """
    import numpy as np
    import numba.core.base
    calls = []
    original = numba.core.base.BaseContext.refresh
    numba.core.base.BaseContext.refresh = lambda self: (calls.append(1), original(self))[1]
    import symdl as sd
    x = sd.input("x", 3); y = sd.input("y", 2); W = sd.param("W", (3, 2)); b = sd.param("b", 2)
    train = sd.compile(sd.losses.mse(sd.relu(x @ W + b), y), [W, b], optimizer=sd.optim.Adam(1e-2), backend="cpu")
    rng = np.random.default_rng(0)
    loss = train.step(x=rng.normal(size=(300, 3)), y=rng.normal(size=(300, 2)))
    # a loop-dominated step: run on the step's threads, from the same saved kernels
    x = sd.input("x", 64); W = sd.param("W", (64, 2))
    h = sd.softplus(sd.sigmoid(sd.tanh(x + 0.1) + 0.1) + 0.1)
    threaded = sd.compile(sd.losses.mse(h @ W, y) + sd.mean(h), [W], backend="cpu")
    loss += threaded.step(x=rng.normal(size=(8000, 64)), y=rng.normal(size=(8000, 2)))
    assert threaded.runner.uses_parallel(8000)
    print("LOSS", repr(loss))
    print("COMPILER", len(calls))
    print("COMPILED", sum(k.compiled for t in (train, threaded) for k in t.runner.kernels()))
    """
)


def test_a_warm_process_never_starts_numbas_compiler(tmp_path):
    """Cold, LLVM compiles every kernel (serial and threaded steps alike: one kernel each); warm,
    nothing compiles at all."""
    env = dict(os.environ, SYMDL_CACHE_DIR=str(tmp_path))

    def run():
        out = subprocess.run([sys.executable, "-c", WARM], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        lines = dict(line.split(maxsplit=1) for line in out.stdout.splitlines() if line[:4] in ("LOSS", "COMP"))
        return float(lines["LOSS"]), int(lines["COMPILER"]), int(lines["COMPILED"])

    cold_loss, cold_starts, cold_compiled = run()
    assert cold_compiled >= 3 and cold_starts == 0, "the cold process started Numba's compiler"
    warm_loss, warm_starts, warm_compiled = run()
    assert warm_starts == 0 and warm_compiled == 0, "the warm process compiled"
    assert warm_loss == cold_loss  # the same machine code, the same numbers


COLD = textwrap.dedent(
    """
    import numpy as np
    import numba.core.base
    calls = []
    original = numba.core.base.BaseContext.refresh
    numba.core.base.BaseContext.refresh = lambda self: (calls.append(1), original(self))[1]
    import symdl as sd
    rng = np.random.default_rng(0)
    x = sd.input("x", 8); y = sd.input("y", 3)
    W1 = sd.param("W1", (8, 16)); b1 = sd.param("b1", 16); W2 = sd.param("W2", (16, 3)); b2 = sd.param("b2", 3)
    logits = sd.tanh(sd.relu(x @ W1 + b1)) @ W2 + b2
    loss = sd.losses.softmax_cross_entropy(logits, y) + sd.losses.mse(sd.sigmoid(logits), y)
    start = {"W1": rng.normal(size=(8, 16)), "b1": rng.normal(size=(1, 16)), "W2": rng.normal(size=(16, 3)),
             "b2": rng.normal(size=(1, 3))}
    X, Y = rng.normal(size=(70, 8)), np.eye(3)[rng.integers(0, 3, 70)]
    for dtype in ("float32", "float64"):
        trained = {}
        for backend in ("cpu", "numpy"):
            train = sd.compile(loss, [W1, b1, W2, b2], optimizer=sd.optim.Adam(1e-2), backend=backend, dtype=dtype)
            for name, value in start.items():
                train.params[name][...] = value
            losses = [train.step(x=X[:64].astype(dtype), y=Y[:64].astype(dtype)),
                      train.step(x=X[64:].astype(dtype), y=Y[64:].astype(dtype))]  # the short last batch
            trained[backend] = losses, {k: np.array(v) for k, v in train.params.items()}
            if backend == "cpu":
                assert train.source.count("LLVM_IR = ") == train.source.count("def formula_kernel(")
        tol = 1e-4 if dtype == "float32" else 1e-10
        np.testing.assert_allclose(trained["cpu"][0], trained["numpy"][0], rtol=tol)
        for k in start:
            np.testing.assert_allclose(trained["cpu"][1][k], trained["numpy"][1][k], rtol=tol, atol=tol)
    print("COMPILER", len(calls))
    """
)


def test_a_cold_mlp_compiles_without_numbas_compiler(tmp_path):
    """Loop formulas, products and the driver are printed as LLVM IR (``llvm_code``) and compiled by
    LLVM alone: an MLP's cold process matches NumPy, both dtypes, without starting Numba's compiler."""
    env = dict(os.environ, SYMDL_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", COLD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "COMPILER 0" in out.stdout, out.stdout
    assert any(p.suffix == ".o" for p in tmp_path.rglob("*"))  # and the code was saved


COLD_CNN = textwrap.dedent(
    """
    import numpy as np
    import numba.core.base
    calls = []
    original = numba.core.base.BaseContext.refresh
    numba.core.base.BaseContext.refresh = lambda self: (calls.append(1), original(self))[1]
    import symdl as sd
    rng = np.random.default_rng(0)
    x = sd.input("x", (10, 10, 2)); y = sd.input("y", 3)
    shapes = {"K1": (3, 3, 2, 16), "c1": (16,), "K2": (2, 2, 16, 16), "c2": (16,), "W1": (64, 32), "b1": (32,),
              "W2": (32, 3), "b2": (3,)}  # products dominate: the step runs its serial (LLVM) loops
    P = {k: sd.param(k, s) for k, s in shapes.items()}
    h = sd.max_pool2d(sd.relu(sd.conv2d(x, P["K1"], padding="same") + P["c1"]), 2)     # 5x5x16 (ReLU's zeros tie)
    h = sd.avg_pool2d(sd.relu(sd.conv2d(h, P["K2"]) + P["c2"]), 2)                      # 2x2x16
    h = sd.dropout(sd.relu(sd.flatten(h) @ P["W1"] + P["b1"]), 0.25)
    loss = sd.losses.softmax_cross_entropy(h @ P["W2"] + P["b2"], y)
    start = {k: rng.normal(size=s) * 0.5 for k, s in shapes.items()}
    X, Y = rng.normal(size=(20, 10, 10, 2)), np.eye(3)[rng.integers(0, 3, 20)]
    for dtype in ("float32", "float64"):
        trained = {}
        for backend in ("cpu", "numpy"):
            train = sd.compile(loss, list(P.values()), optimizer=sd.optim.Adam(1e-2), backend=backend, dtype=dtype,
                               seed=3)
            for name, value in start.items():
                train.params[name][...] = value.reshape(train.params[name].shape)
            losses = [train.step(x=X[:16].astype(dtype), y=Y[:16].astype(dtype)) for _ in range(2)]
            losses.append(train.step(x=X[16:].astype(dtype), y=Y[16:].astype(dtype)))  # the short last batch
            trained[backend] = losses, {k: np.array(v) for k, v in train.params.items()}
            if backend == "cpu":
                print("LOSSES", dtype, repr(losses))
                assert not train.runner.uses_parallel(16)
                source = train.source
                assert source.count("LLVM_IR = ") == source.count("def formula_kernel(")
                for kind in ("im2col", "col2im", "maxpool", "maxpool_grad", "avgpool", "avgpool_grad", "reshape",
                             "u1"):
                    assert kind in source, kind
        tol = 1e-4 if dtype == "float32" else 1e-10
        np.testing.assert_allclose(trained["cpu"][0], trained["numpy"][0], rtol=tol)
        for k in start:
            np.testing.assert_allclose(trained["cpu"][1][k], trained["numpy"][1][k], rtol=tol, atol=tol, err_msg=k)
    print("COMPILER", len(calls))
    """
)


def test_a_cold_cnn_compiles_without_numbas_compiler(tmp_path):
    """Image kernels (``llvm_image``) and dropout's hash are printed as LLVM IR too: a LeNet-style
    CNN (convolutions, max and average pooling, flatten, dense layers, dropout) trains in a cold
    process like NumPy, both dtypes, without starting Numba's compiler."""
    env = dict(os.environ, SYMDL_CACHE_DIR=str(tmp_path))
    runs = []
    for _ in ("cold", "warm"):  # the second process loads the saved machine code: the same numbers
        out = subprocess.run([sys.executable, "-c", COLD_CNN], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "COMPILER 0" in out.stdout, out.stdout
        assert any(p.suffix == ".o" for p in tmp_path.rglob("*"))
        runs.append([line for line in out.stdout.splitlines() if line.startswith("LOSSES")])
    assert len(runs[0]) == 2 and runs[0] == runs[1]
