"""``sd.compile``: forward, backward and optimizer update as one compiled call per step.

>>> import numpy as np, symdl as sd
>>> x = sd.input("x", 2); y = sd.input("y", 1); W = sd.param("W", (2, 1))
>>> train = sd.compile(sd.losses.mse(x @ W, y), [W], optimizer=sd.optim.SGD(0.5), backend="numpy")
>>> train.params["W"].fill(0.0)
>>> X = np.eye(2); Y = np.ones((2, 1))
>>> tuple(round(train.step(x=X, y=Y), 4) for _ in range(3))
(1.0, 0.25, 0.0625)
>>> tuple(train.params["W"].ravel().tolist())
(0.875, 0.875)
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from . import backends
from .backends.runtime import as_dtype
from .lower import lower_training, state_buffer
from .optim import SGD, Optimizer
from .validate import ArrayError, check_arrays, fast_inputs


class KernelTable(list):
    """The lowered kernels as rows ``(kind, output, shape, FLOPs)``; prints as a table."""

    def __str__(self):
        rows = [("kind", "output", "shape", "FLOPs")] + [tuple(map(str, r)) for r in self]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        total = sum(r[3] for r in self)
        return "\n".join(lines + [f"total FLOPs per step: {total:,}"])


class TrainStep:
    """A compiled training step; parameters and optimizer state live in ``params``/``state``.

    ``params[name]`` and ``state[name][k]`` are NumPy views of the buffers the compiled
    code updates in place: write initial values into them, read them at any time.
    """

    def __init__(self, loss, params, optimizer: Optimizer | None = None, backend="cpu", dtype="float32",
                 outputs=None):
        self.param_leaves = list(params)
        self.optimizer = optimizer if optimizer is not None else SGD(1e-2)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be an sd.optim optimizer, got {self.optimizer!r}")
        self.dtype = as_dtype(dtype)
        self.backend = backend
        self.program = lower_training(loss, self.param_leaves, self.optimizer, outputs=outputs)
        self.runner = backends.get(backend).compile_program(self.program, self.dtype)
        arrays = self.runner.persistent_arrays
        self.params = arrays({str(p.name): (str(p.name), p.value_shape) for p in self.param_leaves})
        self.state = {
            str(p.name): arrays({k: (state_buffer(str(p.name), k), p.value_shape) for k in self.optimizer.state})
            for p in self.param_leaves
        }
        self.t = 0  # steps taken (Adam's bias correction reads it)
        self.last_n = None
        self._spec = [(str(l.name), int(l.shape[1])) for l in self.program.inputs]
        self._scalar_names = [str(s) for s in self.program.scalars]

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
        scalars = [float(self.t) if s == "t" else values[s] for s in self._scalar_names]
        loss = self.runner.call_list(external, scalars, n)
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
        if self.backend != "cpu":
            raise ValueError(f"inspect needs backend='cpu' (this step uses {self.backend!r})")
        if what not in ("llvm", "asm"):
            raise ValueError(f"inspect('llvm') or inspect('asm'), not {what!r}")
        if self.last_n is None:
            raise RuntimeError("call step() once first: Numba compiles for the argument types it sees")
        dispatcher = self.runner.function_for(self.last_n)
        if not hasattr(dispatcher, "py_func"):
            raise RuntimeError("inspect needs the JIT (NUMBA_DISABLE_JIT is set)")
        # Numba cannot show code it loaded from its cache: compile an uncached twin.
        import numba

        options = dict(dispatcher.targetoptions)
        options.pop("cache", None)
        options.pop("nopython", None)
        twin = numba.njit(**options)(dispatcher.py_func)
        for sig in dispatcher.signatures:
            twin.compile(sig)
        getter = twin.inspect_llvm if what == "llvm" else twin.inspect_asm
        return "\n".join(getter().values())

    def state_dict(self) -> dict:
        """Copies of every parameter and state array, plus the step count (for checkpoints)."""
        out = {f"param/{k}": v.copy() for k, v in self.params.items()}
        for p, states in self.state.items():
            out.update({f"state/{p}/{k}": v.copy() for k, v in states.items()})
        out["t"] = np.array(self.t)
        return out

    def load_state_dict(self, arrays: dict) -> None:
        """Restore what ``state_dict`` returned; shapes must match exactly."""
        for key, value in arrays.items():
            if key == "t":
                continue
            parts = key.split("/")
            target = self.params.get(parts[1]) if parts[0] == "param" else self.state.get(parts[1], {}).get(parts[-1])
            if target is None:
                raise ArrayError(f"checkpoint array {key!r} does not belong to this model")
            if np.shape(value) != target.shape:
                raise ArrayError(f"checkpoint array {key!r} has shape {np.shape(value)}, expected {target.shape}")
            target[...] = value
        self.t = int(arrays.get("t", self.t))


def compile(loss, params, *, optimizer=None, backend: str = "cpu", dtype: str = "float32", outputs=None) -> TrainStep:  # noqa: A001
    """Compile a training step: ``step(**inputs)`` runs forward, backward and the update.

    ``outputs={"out": expr}`` also keeps ``expr`` from each step (``train.output("out")``).
    """
    return TrainStep(loss, params, optimizer=optimizer, backend=backend, dtype=dtype, outputs=outputs)
