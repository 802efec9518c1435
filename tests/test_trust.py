"""Issue 15: what a newcomer's trial found. Each test reproduces one case from the issue."""
from __future__ import annotations

import os

import numpy as np
import pytest

import symdl as sd


# --------------------------------------------------------------------------- 1. one name, one leaf


def test_two_params_with_one_name_and_one_shape_are_not_silently_tied():
    x = sd.input("x", 4)
    W_a, W_b = sd.param("W", (4, 4)), sd.param("W", (4, 4))
    assert W_a != W_b  # two sd.param calls are two parameters, as in PyTorch and Keras
    loss = sd.total(x @ W_a @ W_b)
    with pytest.raises(ValueError, match=r"two different leaves named 'W'.*\(4, 4\).*\(4, 4\)"):
        sd.grad(loss, [W_a, W_b])
    with pytest.raises(ValueError, match="two different leaves named 'W'"):
        sd.value_and_grad(loss, [W_a, W_b])


def test_two_params_with_one_name_and_different_shapes_name_both_shapes():
    x = sd.input("x", 4)
    W_a, W_b = sd.param("W", (4, 4)), sd.param("W", (4, 2))
    loss = sd.total(x @ W_a @ W_b)
    with pytest.raises(ValueError, match=r"'W'.*parameter of shape \(4, 4\).*parameter of shape \(4, 2\)"):
        sd.compile(loss, [W_a, W_b], backend="numpy")
    with pytest.raises(ValueError, match="two different leaves named 'W'"):
        sd.explain(loss, [W_a, W_b])


def test_an_input_and_a_param_with_one_name_is_an_error_at_build():
    x = sd.input("W", 3)
    W = sd.param("W", (3, 1))
    with pytest.raises(ValueError, match=r"'W'.*input of shape \(n, 3\).*parameter of shape \(3, 1\)"):
        sd.value_and_grad(sd.total(x @ W), [W])


def test_a_reused_param_object_is_a_tied_weight_and_models_can_share_names():
    x = sd.input("x", 2)
    W = sd.param("W", (2, 2))
    f = sd.value_and_grad(sd.total(x @ W @ W), [W])  # one object used twice: tied, on purpose
    value, grads = f(x=np.ones((1, 2)), W=np.eye(2))
    assert value == 2.0 and grads["W"].shape == (2, 2)
    # Two models in one process each build W1, b1, ...: each graph is consistent on its own.
    for _ in range(2):
        m = sd.nn.Sequential([sd.nn.Dense(3, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
        m.compile(backend="numpy")
        assert m.formulas()


# --------------------------------------------------------------------------- 2. NaN and Inf agree on every backend

ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus", "gelu", "silu"]
LOSSES = ["mse", "mae", "huber", "bce_with_logits", "softmax_cross_entropy"]


def special_values(dtype):
    info = np.finfo(dtype)
    huge = float(info.max) / 10
    tiny = float(np.nextafter(dtype(0), dtype(1)))  # the smallest denormal
    return [np.nan, np.inf, -np.inf, 0.0, -0.0, huge, -huge, tiny, -tiny, 1.5, -2.5, 30.0, -30.0]


def special_programs():
    """``(name, program, {input: feature count}, row-wise?)`` for every activation and loss: each
    program outputs the value and the derivative with respect to its first input."""
    from symdl.ir.lowering import lower

    out = []
    x = sd.input("x", 1)
    for name in ACTIVATIONS:
        y = sd.functions.get(name)(x)
        out.append((name, lower({"y": y, "dy": sd.adjoints(sd.total(y), [x])[x]}), {"x": 1}))
    z = sd.input("z", 3)
    for name, fn in [("softmax", sd.softmax), ("log_softmax", sd.log_softmax)]:
        y = fn(z)
        w = sd.input("w", 3)  # a fixed cotangent, so the derivative is not identically zero
        out.append((name, lower({"y": y, "dy": sd.adjoints(sd.total(sd.hadamard(y, w)), [z])[z]}),
                    {"z": 3, "w": 3}))
    for name in LOSSES:
        cols = 3 if name == "softmax_cross_entropy" else 1
        p, t = sd.input("p", cols), sd.input("t", cols)
        loss = sd.losses.get(name)(p, t)
        out.append((name, lower({"loss": loss, "dp": sd.adjoints(loss, [p])[p], "dt": sd.adjoints(loss, [t])[t]}),
                    {"p": cols, "t": cols}))
    return out


def special_batches(features: dict, dtype, huge=True):
    """One-row batches: each special value in each input in turn, the other inputs ordinary."""
    ordinary = {k: np.linspace(0.25, 0.75, c).reshape(1, c) for k, c in features.items()}
    values = [v for v in special_values(dtype) if huge or not 1e30 < abs(v) < np.inf]
    for k, c in features.items():
        for v in values:
            for col in range(c):
                arrays = {name: a.copy() for name, a in ordinary.items()}
                arrays[k][0, col] = v
                yield f"{k}[{col}]={v!r}", {name: a.astype(dtype) for name, a in arrays.items()}


def check_special_values(backend, dtype, huge=True):
    from symdl import backends

    dt = np.dtype(dtype).type
    # float32 CPU loops use a rational tanh within 2.4e-7 of tanh (docs/performance.md): tanh'(30)
    # is 4.8e-7 there and 0 in NumPy. NaN and Inf positions must agree exactly either way.
    rtol, atol = (1e-9, 1e-12) if dt is np.float64 else (2e-5, 1e-6)
    failures = []
    for name, program, features in special_programs():
        ref = backends.get("numpy").compile_program(program, dtype)
        other = backends.get(backend).compile_program(program, dtype)
        for what, arrays in special_batches(features, dt, huge):
            with np.errstate(all="ignore"):
                want = {k: np.array(v) for k, v in ref.run(arrays, {}, 1).items()}
            got = {k: np.array(v) for k, v in other.run(arrays, {}, 1).items()}
            for k in want:
                try:
                    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, equal_nan=True)
                except AssertionError:
                    failures.append(f"{name} {k} at {what}: numpy {want[k].ravel()} {backend} {got[k].ravel()}")
    assert not failures, f"{len(failures)} disagreements:\n" + "\n".join(failures[:40])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cpu_backend_agrees_with_numpy_on_nan_inf_zero_huge_and_denormal(dtype):
    check_special_values("cpu", dtype)


def test_cpu_relu_keeps_a_nan_weight_visible_as_numpy_does():
    """The case from the issue: one NaN weight gave a NaN loss on numpy and 36.0 on cpu."""
    x = sd.input("x", 2); y = sd.input("y", 1)
    W = sd.param("W", (2, 1))
    loss = sd.losses.mse(sd.relu(x @ W), y)
    for backend in ("numpy", "cpu"):
        train = sd.compile(loss, [W], optimizer=sd.optim.SGD(0.1), backend=backend, dtype="float64")
        train.params["W"][...] = [[np.nan], [1.0]]
        assert np.isnan(train.step(x=np.ones((3, 2)), y=6 * np.ones((3, 1)))), backend


@pytest.mark.cudasim
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1", reason="needs NUMBA_ENABLE_CUDASIM=1")
def test_cuda_backend_agrees_with_numpy_on_nan_inf_zero_and_denormal():
    # The simulator runs kernels as Python, whose math.exp(1e300) raises OverflowError where a GPU
    # returns inf; so huge finite values are left to the CPU test, everything else is checked.
    check_special_values("cuda", "float64", huge=False)


# --------------------------------------------------------------------------- 3. divergence stops fit


def _regression_model(optimizer, backend="cpu"):
    X, y = sd.datasets.sine(200, seed=0)
    model = sd.nn.Sequential([sd.nn.Dense(16, activation="tanh"), sd.nn.Dense(1)], input_dim=1)
    model.compile(loss="mse", optimizer=optimizer, backend=backend, seed=0)
    return model, X, y


def test_fit_stops_at_the_first_non_finite_loss_and_keeps_finite_weights():
    model, X, y = _regression_model(sd.optim.SGD(1e4))
    with pytest.warns(RuntimeWarning, match=r"fit stopped: the training loss is (nan|inf|-inf) at epoch 1, step \d+ of 7"):
        model.fit(X, y, epochs=5, batch_size=32, verbose=0)
    assert model.stop_training and model.epoch == 0 and model.history.history == {}
    assert all(np.isfinite(w).all() for w in model.get_weights().values())
    assert np.isfinite(model.predict(X)).all()


def test_a_first_step_failure_rolls_back_to_the_previous_epoch():
    model, X, y = _regression_model(sd.optim.SGD(1e-3))
    model.fit(X, y, epochs=1, batch_size=256, verbose=0, shuffle=False)  # one step per epoch
    good = model.get_weights()
    model.optimizer.lr = 1e300  # epoch 2's loss is finite, its update is not; epoch 3 sees it
    with pytest.warns(RuntimeWarning, match=r"epoch 3, step 1 of 1.*start of epoch 2 \(epoch 2 is undone\)"):
        model.fit(X, y, epochs=5, batch_size=256, verbose=0, shuffle=False)
    assert model.epoch == 1 and len(model.history.history["loss"]) == 1
    assert all(np.array_equal(good[k], w) for k, w in model.get_weights().items())


def test_terminate_on_nan_can_be_turned_off():
    model, X, y = _regression_model(sd.optim.SGD(1e4))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(X, y, epochs=2, batch_size=32, verbose=0, terminate_on_nan=False)
    assert model.epoch == 2 and not np.isfinite(model.history.history["loss"][-1])


# --------------------------------------------------------------------------- 4. nonsense settings


@pytest.mark.parametrize("epochs", [-1, 1.5, "3"])
def test_fit_rejects_bad_epochs_before_training(epochs):
    model, X, y = _regression_model(sd.optim.SGD(0.1), backend="numpy")
    with pytest.raises(ValueError, match=r"epochs must be an integer >= 0"):
        model.fit(X, y, epochs=epochs, verbose=0)


@pytest.mark.parametrize("make, setting", [
    (lambda: sd.optim.SGD(-0.1), "lr must be a finite number >= 0"),
    (lambda: sd.optim.Adam(float("inf")), "lr must be a finite number >= 0"),
    (lambda: sd.optim.Adam(1e-3, beta1=1.0), r"beta1 must be in \[0, 1\)"),
    (lambda: sd.optim.Adam(1e-3, beta2=-0.1), r"beta2 must be in \[0, 1\)"),
    (lambda: sd.optim.Adam(1e-3, eps=0.0), "eps must be a finite number > 0"),
    (lambda: sd.optim.Momentum(0.1, momentum=-0.9), "momentum must be a finite number >= 0"),
    (lambda: sd.optim.RMSProp(0.1, alpha=1.5), r"alpha must be in \[0, 1\)"),
    (lambda: sd.optim.AdamW(0.1, weight_decay=-1), "weight_decay must be a finite number >= 0"),
])
def test_optimizer_hyper_parameters_are_checked(make, setting):
    with pytest.raises(ValueError, match=setting):
        make()


def test_optimizer_hyper_parameters_are_checked_when_set_later():
    opt = sd.optim.Adam(1e-3)
    with pytest.raises(ValueError, match="Adam: lr must be a finite number >= 0, got -1"):
        opt.lr = -1
    with pytest.raises(ValueError, match="beta2"):
        opt.beta2 = 1.0
    assert opt.lr == 1e-3 and opt.beta2 == 0.999
    opt.lr = 0.0  # a schedule may reach 0 (cosine_decay's min_lr): allowed, as in PyTorch
    opt.lr = np.float32(0.5)
    assert opt.lr == 0.5


@pytest.mark.parametrize("make", [lambda: sd.l2(-1.0), lambda: sd.l1(-1e-4), lambda: sd.l2(float("nan"))])
def test_negative_or_nan_regularizer_coefficients_are_rejected(make):
    with pytest.raises(ValueError, match="coefficient must be a finite number >= 0"):
        make()


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "-1"], "--epochs must be >= 0"),
    (["train", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["train", "--lr", "-0.1"], "--lr must be a finite number >= 0"),
    (["formulas", "--layers", "2,1", "--l2", "-1"], "--l2 must be a finite number >= 0"),
])
def test_cli_rejects_nonsense_settings(argv, message, capsys):
    from symdl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- 10. CLI and output


def _symdl(*args, env=None):
    import subprocess
    import sys

    env = env or dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "symdl", *args], env=env, capture_output=True, text=True,
                          timeout=600)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sd.__file__)))  # the symdl under test


def test_cli_version():
    out = _symdl("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"symdl {sd.__version__}"


def test_cli_output_into_a_closed_pipe_ends_quietly():
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (``head``) has already gone
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        out = subprocess.run([sys.executable, "-m", "symdl", "formulas", "--layers", "2,3,1"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, env=env, timeout=600)
    finally:
        os.close(write_end)
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
    assert out.returncode == 1


def test_cli_help_describes_every_train_option():
    from symdl.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    undocumented = [a.option_strings for a in train._actions if a.option_strings and not a.help]
    assert undocumented == []


def test_cli_formulas_output_ends_with_one_newline():
    for extra in ([], ["--latex"]):
        out = _symdl("formulas", "--layers", "2,3,1", *extra)
        assert out.returncode == 0 and out.stdout.endswith("\n") and not out.stdout.endswith("\n\n")


def test_optimizer_names_are_case_insensitive_in_compile_and_cli(tmp_path):
    model = sd.nn.Sequential([sd.nn.Dense(2)], input_dim=2)
    model.compile(optimizer="adam", backend="numpy")
    assert type(model.optimizer) is sd.optim.Adam and model.optimizer.lr == 1e-3
    model.compile(optimizer="SGD", backend="numpy")
    assert type(model.optimizer) is sd.optim.SGD and model.optimizer.lr == 1e-2
    with pytest.raises(ValueError, match="unknown optimizer 'adamm'"):
        model.compile(optimizer="adamm", backend="numpy")
    out = _symdl("train", "--dataset", "xor", "--epochs", "1", "--optimizer", "rmsprop", "--backend", "numpy",
                 "--quiet")
    assert out.returncode == 0, out.stderr
    assert "held-out accuracy" in out.stdout


def test_fit_prints_epoch_lines_and_no_progress_bars_when_stderr_is_not_a_terminal(capsys):
    model, X, y = _regression_model(sd.optim.SGD(0.05), backend="numpy")
    model.fit(X, y, epochs=2, batch_size=16, verbose=1)
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.count("epoch ") == 2 and "epoch 2: loss=" in captured.out


def test_set_weights_shape_errors_name_the_parameter():
    model, X, y = _regression_model(sd.optim.SGD(0.05), backend="numpy")
    with pytest.raises(ValueError, match=r"set_weights: 'W2' has shape \(3, 1\), expected \(16, 1\)"):
        model.set_weights({"W2": np.zeros((3, 1))})


# --------------------------------------------------------------------------- 5. custom activations


def test_a_constant_activation_is_rejected_when_defined():
    import sympy as sp

    with pytest.raises(ValueError, match=r"activation 'one': the formula is the constant 1; .*depend on its argument"):
        sd.activation("one", lambda t: sp.Integer(1))


def test_an_activation_with_a_stray_symbol_is_rejected_when_defined():
    import sympy as sp

    s = sp.Symbol("s")
    with pytest.raises(ValueError, match=r"activation 'scaled': the formula uses the symbol\(s\) s besides its arg"):
        sd.activation("scaled", lambda t: t * s)
    with pytest.raises(ValueError, match=r"uses the symbol\(s\) t besides"):  # a second, different 't'
        sd.activation("shadow", lambda t: t * sp.Symbol("t", positive=True))
    assert "scaled" not in sd.functions.REGISTRY
    sd.activation("scaled_ok", lambda t: t * sp.tanh(sp.Rational(1, 2) * t))  # numbers are fine


# --------------------------------------------------------------------------- 6, 7. checkpoints


def test_loading_a_text_file_says_it_is_not_a_checkpoint_and_never_suggests_pickle(tmp_path):
    from symdl.nn.checkpoint import CheckpointError

    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a model\n")
    with pytest.raises(CheckpointError, match="is not a symdl checkpoint") as info:
        sd.nn.load(path)
    assert "pickle" not in str(info.value)
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))  # pickled objects inside
    with pytest.raises(CheckpointError, match="is not a symdl checkpoint") as info:
        sd.nn.checkpoint.read(tmp_path / "objects.npz")
    assert "allow_pickle" not in str(info.value)


def test_save_into_a_missing_directory_is_an_error_and_creates_nothing(tmp_path):
    model = sd.nn.Sequential([sd.nn.Dense(2)], input_dim=2)
    model.compile(backend="numpy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.save(tmp_path / "typo" / "deeper" / "m.symdl")
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_get_the_usual_permissions(tmp_path):
    model = sd.nn.Sequential([sd.nn.Dense(2)], input_dim=2)
    model.compile(backend="numpy")
    old = os.umask(0o022)
    try:
        model.save(tmp_path / "m.symdl")
        os.umask(0o077)
        model.save(tmp_path / "private.symdl")
    finally:
        os.umask(old)
    assert (tmp_path / "m.symdl").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.symdl").stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- 8. sd.compile initialises


def _xor_graph():
    x, y = sd.input("x", 2), sd.input("y", 1)
    W1, b1, W2, b2 = sd.param("W1", (2, 8)), sd.param("b1", 8), sd.param("W2", (8, 1)), sd.param("b2", 1)
    loss = sd.losses.bce_with_logits(sd.tanh(x @ W1 + b1) @ W2 + b2, y)
    return loss, [W1, b1, W2, b2]


def test_compile_initialises_parameters_like_dense_seeded():
    loss, params = _xor_graph()
    a = sd.compile(loss, params, backend="numpy", dtype="float64")
    b = sd.compile(loss, params, backend="numpy", dtype="float64")
    c = sd.compile(loss, params, backend="numpy", dtype="float64", seed=1)
    limit = np.sqrt(6.0 / (2 + 8))
    assert 0 < np.abs(a.params["W1"]).max() <= limit and np.ptp(a.params["W1"]) > 0
    assert not a.params["b1"].any() and not a.params["b2"].any()  # biases start at zero, as in Keras
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.array_equal(a.params["W1"], c.params["W1"])
    expected = sd.nn.INITIALIZERS["glorot_uniform"](np.random.default_rng(0), (2, 8))
    np.testing.assert_array_equal(a.params["W1"], expected)


def test_compile_without_setting_parameters_trains():
    loss, params = _xor_graph()
    X, labels = sd.datasets.xor(256, seed=0)
    Y = labels.reshape(-1, 1).astype(np.float64)
    train = sd.compile(loss, params, optimizer=sd.optim.Adam(0.05), backend="numpy", dtype="float64")
    losses = [train.step(x=X, y=Y) for _ in range(200)]
    assert losses[-1] < 0.5 * np.log(2), losses[-1]  # all-zero weights stayed at log 2 forever


# --------------------------------------------------------------------------- 12. packaging


def test_without_numba_cuda_the_cuda_backend_says_to_install_the_extra(monkeypatch):
    import sys

    from symdl.backends.cuda_backend import CudaUnavailable

    monkeypatch.setitem(sys.modules, "numba_cuda", None)  # as if numba-cuda were not installed
    x = sd.input("x", 2); W = sd.param("W", (2, 1))
    with pytest.raises(CudaUnavailable, match=r"pip install 'symdl\[cuda\]'"):
        sd.value_and_grad(sd.total(x @ W), [W], backend="cuda")


def test_pyproject_declares_what_the_code_imports():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = lambda reqs: {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for r in reqs}  # noqa: E731
    assert "scipy" in names(project["dependencies"])  # the generated NumPy code calls scipy.special.erf
    assert "numba-cuda" not in names(project["dependencies"])  # about 70 MB of CUDA packages: an extra
    assert "numba-cuda" in names(project["optional-dependencies"]["cuda"])
    assert "numba-cuda" in names(project["optional-dependencies"]["test"])  # the simulator tests need it


# --------------------------------------------------------------------------- 11. litter


@pytest.mark.parametrize("module", ["symdl.backends.cache", "symdl.nn.checkpoint", "symdl.nn.datasets", "symdl.nn.plotting"])
def test_doctests_leave_no_folders_and_no_environment_behind(module, tmp_path, monkeypatch):
    import doctest
    import importlib
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp() and friends create
    monkeypatch.setenv("SYMDL_CACHE_DIR", str(tmp_path / "cache"))
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0
    assert os.environ["SYMDL_CACHE_DIR"] == str(tmp_path / "cache")
    assert [p.name for p in tmp_path.iterdir()] == []


def _fake_entry(root, backend, key, size, age_days):
    entry = root / backend / key
    entry.mkdir(parents=True)
    (entry / f"symdl_{backend}_{key}.py").write_bytes(b"#" * size)
    when = __import__("time").time() - age_days * 86400
    os.utime(entry, (when, when))
    return entry


def test_cache_info_clear_and_prune(tmp_path, monkeypatch):
    from symdl.backends import cache

    monkeypatch.setenv("SYMDL_CACHE_DIR", str(tmp_path))
    old = _fake_entry(tmp_path, "cpu", "a" * 24, 1000, age_days=90)
    mid = _fake_entry(tmp_path, "cpu", "b" * 24, 3000, age_days=5)
    new = _fake_entry(tmp_path, "numpy", "c" * 24, 3000, age_days=1)
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / "cpu" / "other").mkdir()  # a folder without a generated module is never touched
    assert cache.info() == {"path": str(tmp_path), "entries": 3, "bytes": 7000}
    assert cache.prune(max_age_days=30, max_size=10_000) == 1 and not old.exists()  # by age
    assert cache.prune(max_age_days=30, max_size=4000) == 1 and not mid.exists()  # by size, oldest first
    assert new.exists()
    assert cache.clear() == 1 and cache.info()["entries"] == 0
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "cpu" / "other").exists()


def test_writing_a_new_module_prunes_the_cache(tmp_path, monkeypatch):
    from symdl.backends import cache

    monkeypatch.setenv("SYMDL_CACHE_DIR", str(tmp_path))
    stale = _fake_entry(tmp_path, "doc", "d" * 24, 10, age_days=cache.MAX_AGE_DAYS + 1)
    cache.load_module("def g():\n    return 2\n", backend="doc")
    assert not stale.exists() and cache.info()["entries"] == 1


def test_cli_cache_info_and_clear(tmp_path):
    env_dir = tmp_path / "c"
    _fake_entry(env_dir, "cpu", "e" * 24, 2048, age_days=0)
    out = _symdl("cache", "info", env=dict(os.environ, SYMDL_CACHE_DIR=str(env_dir), PYTHONPATH=ROOT))
    assert out.returncode == 0 and str(env_dir) in out.stdout and "1 module(s)" in out.stdout
    out = _symdl("cache", "clear", env=dict(os.environ, SYMDL_CACHE_DIR=str(env_dir), PYTHONPATH=ROOT))
    assert out.returncode == 0 and "removed 1 cached module(s)" in out.stdout
    assert not (env_dir / "cpu" / ("e" * 24)).exists()


# --------------------------------------------------------------------------- 9. reproducibility and threads


def _digits_weights(threads):
    sd.set_num_threads(threads)
    try:
        X, y = sd.datasets.digits()
        model = sd.nn.Sequential([sd.nn.Dense(64, activation="relu"), sd.nn.Dense(10)], input_dim=64)
        model.compile(optimizer=sd.optim.Adam(1e-3), backend="cpu", dtype="float64", seed=3)
        model.fit(X[:512] / 16.0, y[:512], epochs=1, batch_size=128, verbose=0)
        return model.get_weights()
    finally:
        sd.set_num_threads(None)


def test_reproducible_at_a_fixed_thread_count_and_close_across_counts():
    """What README's Reproducibility section promises: bit-identical at one thread count;
    at another, equal up to the order BLAS adds in."""
    one, again = _digits_weights(1), _digits_weights(1)
    assert all(np.array_equal(one[k], again[k]) for k in one)
    import numba

    if numba.config.NUMBA_NUM_THREADS >= 2:
        two = _digits_weights(2)
        for k in one:
            np.testing.assert_allclose(two[k], one[k], rtol=0, atol=1e-9)


def test_the_thread_count_caveat_is_documented():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "## Reproducibility" in readme and "thread count" in readme and "sd.set_num_threads(1)" in readme
    assert "thread count" in sd.set_num_threads.__doc__
