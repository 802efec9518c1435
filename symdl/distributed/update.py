"""The driver's optimizer update (``sync="grads"``): the optimizer's own update formulas applied to
the averaged data gradient, lowered and compiled like any program (``pipeline.update_program``)."""
from __future__ import annotations

import numpy as np

from .. import backends
from ..backends import threads
from ..backends.base import as_dtype
from ..formulas.optimizers import STEP, state_name
from ..run.pipeline import update_program


class UpdateProgram:
    """The model's optimizer update as its own compiled program, fed a gradient each step.

    Each parameter ``p`` steps with ``grad_p + ∂penalty/∂p``: ``grad_p`` is the data gradient the
    workers computed, and the model's regulariser (a sum, not a per-row mean, so it never goes
    to the shards) is differentiated here once. The program writes the same ``Update`` kernels
    as the fused single-process step. Parameters and optimizer state live in its buffers, keyed
    as ``TrainStep.state_dict`` keys them (``load`` / ``state_dict``).
    """

    def __init__(self, model):
        reg = model.regularizer
        penalty = reg(*model.kernels) if reg is not None and model.kernels else None  # as Model.compile adds it
        self.program, fed = update_program(model.params, model.optimizer, penalty)
        self.optimizer, self.dtype = model.optimizer, as_dtype(model.dtype)
        self.runner = backends.get(model.backend).compile_program(self.program, self.dtype)
        spec = {}
        for p in model.params:
            name = str(p.name)
            spec[f"param/{name}"] = (name, p.value_shape)
            spec.update({f"state/{name}/{k}": (state_name(name, k), p.value_shape) for k in self.optimizer.state})
        self.arrays = self.runner.persistent_arrays(spec)
        self.fed = [(str(leaf.name), str(p.name), tuple(int(d) for d in leaf.shape)) for p, leaf in fed.items()]
        self.t = 0

    def load(self, state: dict) -> None:
        """Take parameters, optimizer state and step count from a ``TrainStep.state_dict()``."""
        for key, array in self.arrays.items():
            array[...] = state[key]
        self.t = int(state["t"])

    def state_dict(self) -> dict:
        return {**{key: array.copy() for key, array in self.arrays.items()}, "t": np.array(self.t)}

    @property
    def params(self) -> dict:
        return {key.removeprefix("param/"): a for key, a in self.arrays.items() if key.startswith("param/")}

    def apply(self, grads: dict) -> float:
        """One optimizer update with the data-loss gradients ``grads`` (by parameter name); returns
        the regulariser's value before the update (0 without one).

        It runs on one thread: the loops are memory-bound, and on a host shared with worker
        processes a parallel loop waits for busy cores (twenty times slower for the
        784-256-256-10 model's Adam update, docs/distributed.md).
        """
        self.t += 1
        values = self.optimizer.values
        scalars = [float(self.t) if s == STEP else values[s.name] for s in self.program.scalars]
        fed = {leaf: np.ascontiguousarray(grads[name], self.dtype).reshape(shape) for leaf, name, shape in self.fed}
        with threads.using(1):
            return self.runner.call([fed[name] for name in self.program.externals], scalars, 1)
