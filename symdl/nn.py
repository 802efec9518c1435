"""Layers and models with Keras's names: ``Dense``, ``Sequential``, ``compile/fit/evaluate/predict``.

A model is a symdl graph like any other: ``model.formulas()`` prints its derived
gradients, and ``fit`` runs ``sd.compile``'s one-call training step.

>>> import symdl as sd
>>> X, y = sd.datasets.xor(200, seed=0)
>>> model = sd.nn.Sequential([sd.nn.Dense(8, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
>>> model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.05), backend="numpy", seed=0)
>>> history = model.fit(X, y, epochs=30, batch_size=32, verbose=0)
>>> model.evaluate(X, y)["accuracy"] > 0.95
True
"""
from __future__ import annotations

import math
import time

import numpy as np

from . import checkpoint, datasets, functions, losses
from .compile import TrainStep
from .expr import input as sd_input, param
from .explain import explain
from .lower import lower_program
from . import backends
from .optim import Adam, Optimizer, from_config
from .regularizers import Regularizer
from .train import History, batches

_HE = {"relu", "leaky_relu", "elu", "gelu", "silu"}
_LOSS_KIND = {"softmax_cross_entropy": "classes", "bce_with_logits": "binary", "mse": "regression",
              "mae": "regression", "huber": "regression"}


class Dense:
    """A fully connected layer ``activation(h @ W + b)``.

    ``kernel_initializer``: ``"glorot_uniform"``, ``"he_normal"``, ``"zeros"`` or a
    callable ``(rng, shape) -> array``; by default He for the ReLU family, Glorot otherwise.
    """

    def __init__(self, units: int, activation=None, use_bias: bool = True, kernel_initializer=None, name=None):
        if not (isinstance(units, int) and units > 0):
            raise ValueError(f"Dense: units must be a positive integer, got {units!r}")
        self.units, self.use_bias, self.name = units, use_bias, name
        self.activation = functions.get(activation)  # raises on unknown names
        self.activation_name = None if self.activation is None else self.activation.__name__
        if kernel_initializer is None:
            kernel_initializer = "he_normal" if self.activation_name in _HE else "glorot_uniform"
        if isinstance(kernel_initializer, str) and kernel_initializer not in _INITIALIZERS:
            raise ValueError(f"unknown kernel_initializer {kernel_initializer!r}; known: {', '.join(_INITIALIZERS)}")
        self.kernel_initializer = kernel_initializer

    def build(self, index: int, h):
        """Create this layer's parameters (``W{index}``, ``b{index}``) and return its output expression."""
        self.W = param(f"W{index}", (int(h.shape[1]), self.units))
        self.b = param(f"b{index}", self.units) if self.use_bias else None
        self.name = self.name or f"dense_{index}"
        z = h @ self.W + self.b if self.use_bias else h @ self.W
        return self.activation(z) if self.activation else z

    def init_kernel(self, rng, shape):
        init = self.kernel_initializer
        return init(rng, shape) if callable(init) else _INITIALIZERS[init](rng, shape)

    def config(self) -> dict:
        init = self.kernel_initializer if isinstance(self.kernel_initializer, str) else "glorot_uniform"
        return {"units": self.units, "activation": self.activation_name, "use_bias": self.use_bias,
                "kernel_initializer": init, "name": self.name}


_INITIALIZERS = {
    "glorot_uniform": lambda rng, s: rng.uniform(-1, 1, s) * math.sqrt(6.0 / (s[0] + s[1])),
    "he_normal": lambda rng, s: rng.normal(size=s) * math.sqrt(2.0 / s[0]),
    "zeros": lambda rng, s: np.zeros(s),
}


class Sequential:
    """A stack of layers applied in order. ``input_dim`` is the number of features."""

    def __init__(self, layers, input_dim: int):
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        if not (isinstance(input_dim, int) and input_dim > 0):
            raise ValueError(f"Sequential: input_dim must be a positive integer, got {input_dim!r}")
        self.layers, self.input_dim = list(layers), input_dim
        self.x = sd_input("x", input_dim)
        h = self.x
        for i, layer in enumerate(self.layers, start=1):
            h = layer.build(i, h)
        self.output = h
        self.y = sd_input("y", self.layers[-1].units)
        self.train_step = None
        self.stop_training = False
        self.epoch = 0
        self.history = History()

    # ------------------------------------------------------------------ building

    @property
    def params(self) -> list:
        out = []
        for layer in self.layers:
            out += [layer.W] + ([layer.b] if layer.use_bias else [])
        return out

    def compile(self, loss="softmax_cross_entropy", optimizer: Optimizer | None = None, regularizer=None,
                backend: str = "cpu", dtype: str = "float32", seed: int = 0):
        """Derive the gradients and generate the training step (Numba compiles on the first batch)."""
        if loss not in _LOSS_KIND:
            raise ValueError(f"unknown loss {loss!r}; known: {', '.join(_LOSS_KIND)}")
        if regularizer is not None and not isinstance(regularizer, Regularizer):
            raise TypeError(f"regularizer must be sd.l1(c) or sd.l2(c), got {regularizer!r}")
        self.loss_name, self.kind = loss, _LOSS_KIND[loss]
        if self.kind == "classes" and self.layers[-1].units < 2:
            raise ValueError("softmax_cross_entropy needs at least 2 output units")
        self.optimizer = optimizer if optimizer is not None else Adam(1e-3)
        self.regularizer, self.backend, self.dtype, self.seed = regularizer, backend, dtype, seed
        self.data_loss = losses.get(loss)(self.output, self.y)
        kernels = [layer.W for layer in self.layers]
        self.loss = self.data_loss + regularizer(*kernels) if regularizer is not None else self.data_loss
        self.train_step = TrainStep(self.loss, self.params, optimizer=self.optimizer, backend=backend, dtype=dtype,
                                    outputs={"out": self.output})
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            self.train_step.params[layer.W.name][...] = layer.init_kernel(rng, layer.W.value_shape)
        self._predict = backends.get("numpy").compile_program(lower_program({"out": self.output}), dtype)
        self._evaluate = backends.get("numpy").compile_program(
            lower_program({"loss": self.loss, "out": self.output}), dtype
        )

    def _require_compiled(self):
        if self.train_step is None:
            raise RuntimeError("call model.compile(...) first")

    # ------------------------------------------------------------------ weights

    def get_weights(self) -> dict:
        self._require_compiled()
        return {k: v.copy() for k, v in self.train_step.params.items()}

    def set_weights(self, weights: dict) -> None:
        self._require_compiled()
        for k, v in weights.items():
            if k not in self.train_step.params:
                raise KeyError(f"no parameter {k!r}; the model has {list(self.train_step.params)}")
            self.train_step.params[k][...] = v

    # ------------------------------------------------------------------ data

    def _prepare(self, X, y, what):
        return datasets.check_dataset(X, y, kind=self.kind, outputs=self.layers[-1].units, input_dim=self.input_dim,
                                      what=what)

    def _metrics(self, out, Y) -> dict:
        if self.kind == "classes":
            return {"accuracy": float(np.mean(out.argmax(1) == Y.argmax(1)))}
        if self.kind == "binary":
            return {"accuracy": float(np.mean((out > 0) == (Y > 0.5)))}
        return {}

    def _forward(self, runner, arrays, n):
        externals = dict(arrays)
        externals.update({k: v.reshape(1, -1) if v.ndim == 1 else v for k, v in self.train_step.params.items()})
        return runner.run(externals, {}, n)

    # ------------------------------------------------------------------ training

    def fit(self, X, y, epochs: int = 1, batch_size: int = 32, validation_data=None, validation_split: float = 0.0,
            shuffle: bool = True, callbacks=None, verbose: int = 1, seed: int | None = None) -> History:
        """Train for ``epochs`` more epochs; returns the model's ``History`` (all epochs so far).

        Data is checked before anything compiles. Batches are shuffled with a seed
        and the absolute epoch number, so a resumed run sees the same batches.
        """
        self._require_compiled()
        X, Y = self._prepare(X, y, "training data")
        if validation_data is None and validation_split:
            if not 0 < validation_split < 1:
                raise ValueError(f"validation_split must be between 0 and 1, got {validation_split}")
            k = int(len(X) * (1 - validation_split))
            X, Y, Xv, Yv = X[:k], Y[:k], X[k:], Y[k:]
        elif validation_data is not None:
            Xv, Yv = self._prepare(*validation_data, "validation data")
        else:
            Xv = Yv = None
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        dt = self.train_step.dtype
        X, Y = np.ascontiguousarray(X, dt), np.ascontiguousarray(Y, dt)
        seed = self.seed if seed is None else seed
        callbacks = list(callbacks or [])
        for cb in callbacks:
            cb.model = self
        self.stop_training = False
        for cb in callbacks:
            cb.on_train_begin()
        last = self.epoch + epochs
        for epoch in range(self.epoch, last):
            for cb in callbacks:
                cb.on_epoch_begin(epoch)
            logs = self._train_epoch(X, Y, batch_size, seed, epoch, shuffle, verbose, last)
            if Xv is not None:
                logs.update({f"val_{k}": v for k, v in self.evaluate(Xv, Yv, _prepared=True).items()})
            logs["lr"] = self.optimizer.lr
            self.epoch = epoch + 1
            self.history.append(epoch, logs)
            for cb in callbacks:
                cb.on_epoch_end(epoch, logs)
            if verbose:
                print(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()), flush=True)
            if self.stop_training:
                break
        for cb in callbacks:
            cb.on_train_end()
        return self.history

    def _train_epoch(self, X, Y, batch_size, seed, epoch, shuffle, verbose, last):
        from tqdm.auto import tqdm

        step = self.train_step
        total, correct, seen = 0.0, 0.0, 0
        groups = batches(len(X), batch_size, seed, epoch, shuffle)
        bar = tqdm(groups, desc=f"epoch {epoch + 1}/{last}", disable=not verbose, leave=False, unit="batch",
                   mininterval=0.2)
        started = time.perf_counter()
        for idx in bar:
            xb, yb = X[idx], Y[idx]
            loss = step.step(x=xb, y=yb, check_finite=False)  # the whole set was checked once
            total += loss * len(idx)
            seen += len(idx)
            m = self._metrics(step.output("out"), yb)
            correct += m.get("accuracy", 0.0) * len(idx)
            if verbose:
                bar.set_postfix(loss=f"{total / seen:.4f}", **({"acc": f"{correct / seen:.3f}"} if m else {}))
        logs = {"loss": total / seen}
        if self.kind != "regression":
            logs["accuracy"] = correct / seen
        self.last_epoch_seconds = time.perf_counter() - started
        return logs

    # ------------------------------------------------------------------ inference

    def predict(self, X, batch_size: int = 1024) -> np.ndarray:
        """The model's outputs (logits for classification), in chunks of ``batch_size``."""
        self._require_compiled()
        X = datasets.check_features(X, input_dim=self.input_dim, what="prediction data")
        X = np.ascontiguousarray(X, self.train_step.dtype)
        outs = []
        for i in range(0, len(X), batch_size):
            xb = X[i : i + batch_size]
            outs.append(self._forward(self._predict, {"x": xb}, len(xb))["out"].copy())
        return np.concatenate(outs)

    def evaluate(self, X, y, batch_size: int = 1024, _prepared: bool = False) -> dict:
        """``{"loss": ..., "accuracy": ...}`` on ``(X, y)`` (the loss includes the regulariser)."""
        self._require_compiled()
        if not _prepared:
            X, y = self._prepare(X, y, "evaluation data")
        dt = self.train_step.dtype
        X, Y = np.ascontiguousarray(X, dt), np.ascontiguousarray(y, dt)
        total, outs = 0.0, []
        for i in range(0, len(X), batch_size):
            xb, yb = X[i : i + batch_size], Y[i : i + batch_size]
            bufs = self._forward(self._evaluate, {"x": xb, "y": yb}, len(xb))
            total += float(bufs["loss"][0, 0]) * len(xb)
            outs.append(bufs["out"].copy())
        return {"loss": total / len(X), **self._metrics(np.concatenate(outs), Y)}

    # ------------------------------------------------------------------ reading

    def summary(self, print_fn=print) -> str:
        """A Keras-style table of layers, output shapes and parameter counts."""
        rows = [("layer", "output shape", "params", "activation")]
        total = 0
        for layer in self.layers:
            count = int(np.prod(layer.W.value_shape)) + (layer.units if layer.use_bias else 0)
            total += count
            rows.append((layer.name, f"(n, {layer.units})", f"{count:,}", layer.activation_name or "linear"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"Sequential (input_dim={self.input_dim})"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(2, "  ".join("-" * w for w in widths))
        lines.append(f"total params: {total:,}")
        text = "\n".join(lines)
        if print_fn:
            print_fn(text)
        return text

    def formulas(self, latex: bool = False) -> str:
        """Every gradient, derived: the textbook backward pass (``latex=True`` for LaTeX)."""
        self._require_compiled()
        e = explain(self.loss, self.params)
        return e.latex if latex else str(e)

    def source(self, backend: str | None = None) -> str:
        """The generated training-step module."""
        self._require_compiled()
        if backend is None or backend == self.backend:
            return self.train_step.source
        return TrainStep(self.loss, self.params, optimizer=self.optimizer, backend=backend, dtype=self.dtype).source

    # ------------------------------------------------------------------ checkpoints

    def save(self, path) -> None:
        """Architecture, weights, optimizer state, step and epoch counts: atomically, no pickle."""
        self._require_compiled()
        reg = None if self.regularizer is None else {"kind": self.regularizer.kind, "coefficient": self.regularizer.coefficient}
        meta = {
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
            "architecture": {"input_dim": self.input_dim, "layers": [l.config() for l in self.layers]},
            "compile": {"loss": self.loss_name, "optimizer": self.optimizer.config(), "regularizer": reg,
                        "backend": self.backend, "dtype": str(np.dtype(self.dtype)), "seed": self.seed},
            "epoch": self.epoch, "history": self.history.history,
        }
        checkpoint.write(path, meta, self.train_step.state_dict())


def load(path, backend: str | None = None) -> Sequential:
    """A model saved with ``Model.save``, ready to ``predict`` or continue ``fit``."""
    meta, arrays = checkpoint.read(path)
    if meta.get("format") != checkpoint.FORMAT:
        raise checkpoint.CheckpointError(f"{path} is not a symdl model checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != checkpoint.VERSION:
        raise checkpoint.CheckpointError(f"{path} has checkpoint version {meta.get('version')}; "
                                         f"this symdl reads version {checkpoint.VERSION}")
    try:
        arch, comp = meta["architecture"], meta["compile"]
        layers = []
        for cfg in arch["layers"]:
            act = cfg["activation"]
            if act is not None and act not in functions.REGISTRY:
                raise checkpoint.CheckpointError(
                    f"{path} uses the activation {act!r}, which is not registered: call "
                    f"sd.activation({act!r}, formula) before loading")
            layers.append(Dense(cfg["units"], activation=act, use_bias=cfg["use_bias"],
                                kernel_initializer=cfg["kernel_initializer"], name=cfg["name"]))
        model = Sequential(layers, input_dim=arch["input_dim"])
        reg = comp["regularizer"]
        from .regularizers import l1, l2

        regularizer = None if reg is None else {"l1": l1, "l2": l2}[reg["kind"]](reg["coefficient"])
        model.compile(loss=comp["loss"], optimizer=from_config(comp["optimizer"]), regularizer=regularizer,
                      backend=backend or comp["backend"], dtype=comp["dtype"], seed=comp["seed"])
        model.train_step.load_state_dict(arrays)
        model.epoch = int(meta["epoch"])
        model.history = History(meta.get("history"))
    except checkpoint.CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{path} does not describe a model this symdl can build: {exc}") from exc
    return model


Model = Sequential
