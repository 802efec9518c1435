"""The one place the stages meet: graph -> gradients -> optimizer writes -> lowering -> backend.

``value_and_grad`` compiles a loss and its gradients; ``compile`` a whole training
step (forward, backward and the optimizer's update, one call). Both take the same
road: ``autodiff.grad``, then (for training) ``Optimizer.writes``, then
``lowering.lower(outputs, writes)``, then ``backends.get(name).compile_program``.

>>> import numpy as np, symdl as sd
>>> x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1))
>>> f = sd.value_and_grad(sd.losses.mse(x @ W, y), [W], backend="numpy")
>>> value, grads = f(x=np.eye(2), y=np.ones((2, 1)), W=np.zeros((2, 1)))
>>> value, grads["W"].ravel().tolist()
(1.0, [-1.0, -1.0])
>>> train = sd.compile(sd.losses.mse(x @ W, y), [W], optimizer=sd.optim.SGD(0.5), backend="numpy")
>>> train.params["W"].fill(0.0)
>>> X = np.eye(2); Y = np.ones((2, 1))
>>> tuple(round(train.step(x=X, y=Y), 4) for _ in range(3))
(1.0, 0.25, 0.0625)
>>> tuple(train.params["W"].ravel().tolist())
(0.875, 0.875)
"""
from __future__ import annotations

import math

import numpy as np
import sympy as sp

from .. import backends
from ..autodiff.vjp import Derivation, grad
from ..backends.base import as_dtype
from ..autodiff.explain import explain
from ..graph.nodes import SequenceInput, State, TokenInput, VectorParam, leaves
from ..ir.lowering import lower
from ..formulas.optimizers import SGD, STEP, Optimizer, state_name
from ..formulas.dropout import SEED
from .validate import ArrayError, check_arrays, fast_inputs


def training_program(loss, params, optimizer: Optimizer, outputs=None, writes=None):
    """The training step as a program: ``loss`` and ``outputs``, every parameter's update, and
    the extra graph ``writes`` ``{State: expression}`` (batch norm's running statistics)."""
    derivation = Derivation(loss, params)  # the explanation (comments) reuses it: derived once
    gradients = derivation.gradients
    all_writes = {**dict(writes or {}), **optimizer_writes(optimizer, params, gradients)}
    return lower({"loss": loss, **dict(outputs or {})}, all_writes,
                 notes=lambda: explain(loss, params, derivation).notes())


def optimizer_writes(optimizer: Optimizer, params, gradients) -> dict:
    """Every parameter's update for ``gradients`` ``{param: expression}``, as graph writes."""
    bodies = optimizer.bodies()  # the same for every parameter: derived once
    writes = {}
    for p in params:
        writes.update(optimizer.writes(p, gradients[p], bodies))
    return writes


def update_program(params, optimizer: Optimizer, penalty=None):
    """The optimizer's update alone, for data gradients computed elsewhere (a cluster's workers).

    Each parameter ``p`` steps with the gradient ``grad_<p> + ∂penalty/∂p``: ``grad_<p>`` is a
    leaf of ``p``'s (graph) shape passed in at every call, and ``penalty`` (a regulariser: a sum,
    not a mean over rows, so it belongs here once and not in each worker's gradient) is
    differentiated like any loss and is the ``"loss"`` output, read before the update.
    Returns ``(program, {param: its gradient leaf})``.

    >>> import numpy as np, symdl as sd
    >>> W = sd.param("W", (1, 2))
    >>> program, fed = update_program([W], sd.optim.SGD(0.5), penalty=sd.l2(W))
    >>> runner = sd.backends.get("numpy").compile_program(program, "float64")
    >>> w = runner.persistent_arrays({"W": ("W", (1, 2))})["W"]; w[...] = [[1.0, 2.0]]
    >>> runner.run({"grad_W": np.array([[1.0, 0.0]])}, {"lr": 0.5}, 1)["loss"].item()   # Σw² before
    5.0
    >>> w.tolist()   # w − 0.5·(g + 2w)
    [[-0.5, 0.0]]
    """
    fed = {p: State(f"grad_{p.name}", *p.shape) for p in params}
    gradients = dict(fed)
    if penalty is not None:
        penalised = [p for p in params if p in set(leaves(penalty))]
        gradients.update({p: fed[p] + g for p, g in grad(penalty, penalised).items()})
    outputs = {} if penalty is None else {"loss": penalty}
    return lower(outputs, optimizer_writes(optimizer, params, gradients)), fed


def step_scalars(program, seed, t) -> dict:
    """The values of the runtime scalars a program without an optimizer reads: the random
    ``seed`` and the step count ``t`` (what dropout masks are drawn from)."""
    known = {SEED: float(seed), STEP: float(t)}
    unknown = [str(s) for s in program.scalars if s not in known]
    if unknown:
        raise ValueError(f"the expression reads runtime scalar(s) {unknown} that only a training step supplies")
    return {str(s): known[s] for s in program.scalars}


def compile_outputs(outputs: dict, backend: str = "numpy", dtype="float64"):
    """Expressions alone (a forward pass: no gradients, no writes), compiled on ``backend``.

    Returns the backend's ``Runner``: ``run(arrays, {}, n)["name"]`` is each value.
    """
    return backends.get(backend).compile_program(lower(outputs), as_dtype(dtype))


def gradient_program(loss, params):
    """``loss`` and ``grad_<name>`` for every parameter, as a program (no writes)."""
    derivation = Derivation(loss, params)
    gradients = derivation.gradients
    outputs = {"loss": loss, **{f"grad_{p.name}": gradients[p] for p in params}}
    return lower(outputs, notes=lambda: explain(loss, params, derivation).notes()), gradients


class ValueAndGrad:
    """Callable ``f(**arrays) -> (loss: float, {param name: gradient ndarray})``."""

    def __init__(self, loss, params, backend="numpy", dtype="float64", seed=0):
        self.params = list(params)
        self.seed = seed
        self.dtype = as_dtype(dtype)
        self.program, self.gradients = gradient_program(loss, self.params)
        self.backend = backend
        self.runner = backends.get(backend).compile_program(self.program, self.dtype)

    @property
    def source(self) -> str:
        """The generated module (readable Python)."""
        return self.runner.source

    def __call__(self, *, check_finite: bool = True, **arrays):
        """``check_finite=False`` skips the NaN/Inf scan (data already checked; diverged weights allowed)."""
        arrays, n = check_arrays(arrays, self.program.inputs, self.program.params, self.dtype,
                                 check_finite=check_finite)
        outs = self.runner.run(arrays, step_scalars(self.program, self.seed, 0), n)
        value = float(np.asarray(outs["loss"]).reshape(-1)[0])
        grads = {str(p.name): np.array(outs[f"grad_{p.name}"]).reshape(_outer_shape(p)) for p in self.params}
        return value, grads


def _outer_shape(leaf) -> tuple:
    """The shape of a leaf's arrays outside the graph: a parameter's, or ``(n, ...)`` for an input."""
    if hasattr(leaf, "value_shape"):
        return leaf.value_shape
    return (-1, *getattr(leaf, "image_shape", (int(leaf.shape[1]),)))


def value_and_grad(loss, params, *, backend: str = "numpy", dtype: str = "float64", seed: int = 0) -> ValueAndGrad:
    """Compile ``loss`` and ``∂loss/∂param`` for every param into one call.

    Arrays are passed by name; a vector parameter's gradient has its ``(k,)`` shape.
    A loss with dropout draws its masks from ``seed`` (and step 0): the same masks on
    every call, so its gradients can be checked against finite differences.
    """
    return ValueAndGrad(loss, params, backend=backend, dtype=dtype, seed=seed)


class KernelTable(list):
    """The lowered kernels as rows ``(kind, output, shape, FLOPs)``; prints as a table."""

    def __str__(self):
        rows = [("kind", "output", "shape", "FLOPs")] + [tuple(map(str, r)) for r in self]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        total = sum(r[3] for r in self)
        return "\n".join(lines + [f"total FLOPs per step: {total:,}"])


def glorot_uniform(rng, shape):
    """Glorot (Xavier) uniform: ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))`` (Keras's default).

    A convolution kernel ``(kh, kw, c_in, c_out)`` has fans ``kh·kw·c_in`` and ``kh·kw·c_out``.
    """
    receptive = math.prod(shape[:-2])
    return rng.uniform(-1, 1, shape) * math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))


class TrainStep:
    """A compiled training step; parameters and optimizer state live in ``params``/``state``.

    ``params[name]`` and ``state[name][k]`` are NumPy views of the buffers the compiled
    code updates in place: write initial values into them, read them at any time.
    Parameters start as Keras's ``Dense`` defaults, seeded by ``seed``: matrices Glorot
    uniform (drawn in the order of ``params``), vectors (biases) zero.
    """

    def __init__(self, loss, params, optimizer: Optimizer | None = None, backend="cpu", dtype="float32",
                 outputs=None, seed: int = 0, writes=None, initial=None):
        self.param_leaves = list(params)
        self.optimizer = optimizer if optimizer is not None else SGD(1e-2)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be an sd.optim optimizer, got {self.optimizer!r}")
        self.dtype = as_dtype(dtype)
        self.backend = backend
        self.program = training_program(loss, self.param_leaves, self.optimizer, outputs=outputs, writes=writes)
        self.runner = backends.get(backend).compile_program(self.program, self.dtype)
        arrays = self.runner.persistent_arrays
        self.params = arrays({str(p.name): (str(p.name), p.value_shape) for p in self.param_leaves})
        self.state = {
            str(p.name): arrays({k: (state_name(str(p.name), k), p.value_shape) for k in self.optimizer.state})
            for p in self.param_leaves
        }
        # other written State leaves (running statistics), by name, as (k,) vectors when they are rows
        self.statistics = arrays({str(s.name): (str(s.name), _value_shape(s)) for s in (writes or {})})
        self.seed = seed  # dropout masks: a hash of (seed, t, layer, entry)
        initial = dict(initial or {})
        rng = np.random.default_rng(seed)  # all zeros would leave hidden units identical: training stalls
        for p in self.param_leaves:
            if not isinstance(p, VectorParam) and str(p.name) not in initial:
                self.params[str(p.name)][...] = glorot_uniform(rng, p.value_shape)
        for name, value in initial.items():  # each buffer written once: given values are not drawn first
            (self.params[name] if name in self.params else self.statistics[name])[...] = value
        self.t = 0  # steps taken (Adam's bias correction reads it)
        self.last_n = None
        # token and sequence inputs (an (n, T) or (n, T, d) array stored as rows) always take the
        # checked path: their ids are range-checked and their rows are n·T, not n
        self._spec = [(str(l.name), -1 if isinstance(l, (TokenInput, SequenceInput)) else int(l.shape[1]))
                      for l in self.program.inputs]
        self._scalars = list(self.program.scalars)

    def output(self, name: str) -> np.ndarray:
        """An extra output of the last step (``outputs=`` at compile), e.g. the model's logits."""
        return self.runner.output(name, self.last_n)

    @property
    def source(self) -> str:
        """The generated module (readable Python)."""
        return self.runner.source

    def step(self, *, check_finite: bool = True, **arrays) -> float:
        """One training step on a batch (inputs by name); returns the loss before the update."""
        fast = fast_inputs(arrays, self._spec, self.dtype)
        if fast is None or (check_finite and not all(np.isfinite(a).all() for a in fast[0])):
            checked, n = check_arrays(arrays, self.program.inputs, [], self.dtype, check_finite=check_finite)
            fast = [checked[name] for name, _ in self._spec], n
        external, n = fast
        self.t += 1
        values = self.optimizer.values
        scalars = [float(self.t) if s == STEP else float(self.seed) if s == SEED else values[s.name]
                   for s in self._scalars]
        loss = self.runner.call(external, scalars, n)
        self.last_n = n
        return float(loss)

    @property
    def kernels(self) -> KernelTable:
        """The lowered program: one row per kernel with its FLOPs at the last batch size."""
        n_value = self.last_n or 1
        table = KernelTable()
        for k in self.program.kernels:
            shape = tuple(sp.sympify(d) for d in self.program.shape_of(k.out))
            table.append((k.kind, k.out, "(" + ", ".join(map(str, shape)) + ")", self.program.flops(k, n_value)))
        return table

    def inspect(self, what: str = "llvm") -> str:
        """The compiled step as LLVM IR (``"llvm"``) or machine code (``"asm"``); cpu backend only."""
        if what not in ("llvm", "asm"):
            raise ValueError(f"inspect('llvm') or inspect('asm'), not {what!r}")
        if self.last_n is None:
            raise RuntimeError("call step() once first: Numba compiles for the argument types it sees")
        return self.runner.inspect(what, self.last_n)

    def state_dict(self) -> dict:
        """Copies of every parameter and state array, plus the step count (for checkpoints)."""
        out = {f"param/{k}": v.copy() for k, v in self.params.items()}
        for p, states in self.state.items():
            out.update({f"state/{p}/{k}": v.copy() for k, v in states.items()})
        out.update({f"stat/{k}": v.copy() for k, v in self.statistics.items()})
        out["t"] = np.array(self.t)
        return out

    def load_state_dict(self, arrays: dict) -> None:
        """Restore what ``state_dict`` returned; shapes must match exactly."""
        for key, value in arrays.items():
            if key == "t":
                continue
            parts = key.split("/")
            target = (self.params.get(parts[1]) if parts[0] == "param" else self.statistics.get(parts[1])
                      if parts[0] == "stat" else self.state.get(parts[1], {}).get(parts[-1]))
            if target is None:
                raise ArrayError(f"checkpoint array {key!r} does not belong to this model")
            if np.shape(value) != target.shape:
                raise ArrayError(f"checkpoint array {key!r} has shape {np.shape(value)}, expected {target.shape}")
            target[...] = value
        self.t = int(arrays.get("t", self.t))


def compile(loss, params, *, optimizer=None, backend: str = "cpu", dtype: str = "float32", outputs=None,  # noqa: A001
            seed: int = 0, writes=None, initial=None) -> TrainStep:
    """Compile a training step: ``step(**inputs)`` runs forward, backward and the update.

    ``outputs={"out": expr}`` also keeps ``expr`` from each step (``train.output("out")``).
    Parameters start initialised as in ``nn.Dense`` by default, seeded by ``seed``: every matrix
    Glorot uniform (in the order of ``params``), every vector parameter zero; ``initial={name:
    value}`` starts a parameter elsewhere (it is then not drawn), or overwrite ``train.params``.

    ``writes={State: expression}`` adds graph writes to the step (batch norm's running
    statistics, ``normalization.running_writes``), readable in ``train.statistics`` and started
    from ``initial`` too (zeros otherwise). ``seed`` also seeds dropout's masks,
    which depend on the seed and the step count only.
    """
    return TrainStep(loss, params, optimizer=optimizer, backend=backend, dtype=dtype, outputs=outputs, seed=seed,
                     writes=writes, initial=initial)


def _value_shape(leaf) -> tuple:
    """A written leaf's array shape outside: a (1, k) row is a (k,) vector, as for a vector parameter."""
    r, c = (int(d) for d in leaf.shape)
    return (c,) if r == 1 else (r, c)
