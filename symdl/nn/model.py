"""``Model`` (Keras 3's functional API) and ``Sequential``: layers -> a graph -> a compiled training
step, with Keras's names.

A model is a symdl graph like any other: ``model.formulas()`` prints its derived
gradients, ``fit`` (``fitting.fit``) runs the one-call compiled step, and ``predict``
and ``evaluate`` run forward programs compiled on the same backend.

>>> import symdl as sd
>>> X, y = sd.datasets.xor(200, seed=0)
>>> model = sd.nn.Sequential([sd.nn.Dense(8, activation="tanh"), sd.nn.Dense(2)], input_dim=2)
>>> model.compile(loss="softmax_cross_entropy", optimizer=sd.optim.Adam(0.05), backend="numpy", seed=0)
>>> history = model.fit(X, y, epochs=30, batch_size=32, verbose=0)
>>> model.evaluate(X, y)["accuracy"] > 0.95
True
"""
from __future__ import annotations

import numpy as np

from . import datasets
from ..formulas import activations as functions, losses
from ..ops.conv import image_shape
from ..autodiff.explain import explain
from ..graph.nodes import VectorParam, input as sd_input
from ..formulas.optimizers import Adam, Optimizer, from_config, get as get_optimizer
from ..run.pipeline import TrainStep, compile_outputs
from ..formulas.regularizers import Regularizer, l1, l2
from . import checkpoint, fitting, functional
from .layers import LAYERS, Dense


class Model:
    """Keras 3's functional ``Model(inputs, outputs)``: the layers between an ``sd.nn.Input`` and an
    output tensor, built into one graph (``symdl.nn.functional``). ``Sequential`` is a ``Model``
    whose layers are called in order.

    Each layer's parameters are named by the layer's place in the model (``W1``, ``b1``, ``K2``,
    ...: parents before children, depth first from the output); a layer called twice shares them.

    >>> import symdl as sd
    >>> x = sd.nn.Input(shape=(4,))
    >>> h = sd.nn.Dense(4, activation="tanh")(x)
    >>> model = sd.nn.Model(x, sd.nn.Dense(2)(h + x))
    >>> print(*(str(p.name) for p in model.params))
    W1 b1 W3 b3
    """

    def __init__(self, inputs, outputs, name=None):
        inp, out = _single(inputs, "inputs"), _single(outputs, "outputs")
        order = functional.walk([out])
        reached = [t for t in order if t.layer is None]  # every path ends at an Input: ours, or another
        for t in reached:
            if t is not inp:
                raise ValueError(f"Model: the output {out!r} depends on the Input {t.name!r} "
                                 f"{functional.shape_text(t.shape)}, which is not the model's input "
                                 f"{inp.name!r} {functional.shape_text(inp.shape)}")
        self.name = name
        self.inputs, self.outputs, self.calls = [inp], [out], order
        self.input_dim, self.x = inp.features, inp.leaf
        self.layers = list({id(t.layer): t.layer for t in order if t.layer is not None}.values())
        kinds = [layer.kind for layer in self.layers]
        self.layer_names = [layer.name or f"{kind}_{kinds[:i].count(kind)}"
                            for i, (layer, kind) in enumerate(zip(self.layers, kinds), start=1)]
        self._build()
        h = self.output
        if image_shape(h) is not None:
            raise ValueError(f"{type(self).__name__}: the model ends in images {image_shape(h)}: put "
                             "sd.nn.Flatten() and a Dense layer last")
        self.units = int(h.shape[1])
        self.y = sd_input("y", self.units)
        self.train_step = None
        self.stop_training = False
        self.epoch = 0
        self.history = fitting.History()
        self._forward = {}  # "predict" / "evaluate" -> runner, compiled on first use

    def _build(self):
        """Each layer call in order: the first builds the layer's parameters, later ones share them."""
        place = {id(layer): i for i, layer in enumerate(self.layers)}
        names = {id(t): t.name for t in self.inputs}
        values = {id(t): (t.leaf, t.leaf) for t in self.inputs}
        count = len(self.layers)
        self.layer_params, self.layer_outputs, self.layer_inbound = [None] * count, [None] * count, [None] * count
        self.writes, self.initial, first_call = {}, {}, [None] * count
        for t in self.calls:
            if t.layer is None:
                continue
            k, layer = place[id(t.layer)], t.layer
            parts = [values[id(p)] for p in t.inputs]
            h = [a for a, _ in parts] if t.many else parts[0][0]
            h_infer = [b for _, b in parts] if t.many else parts[0][1]
            if self.layer_params[k] is None:
                built = layer.build_both(k + 1, h, h_infer)
                self.layer_params[k], self.layer_outputs[k] = built.params, built.train
                self.layer_inbound[k] = [names[id(p)] for p in t.inputs]
                first_call[k] = t
                self.writes.update(built.writes)
                self.initial.update(built.initial)
                values[id(t)] = (built.train, built.infer)
            else:  # a shared layer's later call: the same parameters on another input
                functional.check_shared(layer, first_call[k].inputs, t.inputs)
                params = self.layer_params[k]
                values[id(t)] = (layer.apply(params, h), layer.apply(params, h_infer))
            names[id(t)] = self.layer_names[k]
        self.output, self.inference_output = values[id(self.outputs[0])]  # training graph; predict / evaluate

    # ------------------------------------------------------------------ building

    @property
    def params(self) -> list:
        return [p for params in self.layer_params for p in params]

    @property
    def kernels(self) -> list:
        """Each layer's weight matrix or convolution kernel (what a regulariser penalises; never a
        bias or a norm's γ or β)."""
        return [p for params in self.layer_params for p in params if not isinstance(p, VectorParam)]

    def compile(self, loss="softmax_cross_entropy", optimizer: Optimizer | str | None = None, regularizer=None,
                backend: str = "cpu", dtype: str = "float32", seed: int = 0):
        """Derive the gradients and generate the training step (Numba compiles on the first batch).

        ``optimizer`` is an ``sd.optim`` optimizer or, as in Keras, a name in any case
        (``"adam"``) for one with default hyper-parameters (Keras's learning rates: 1e-3 for
        Adam, AdamW, RMSProp and Adagrad, 1e-2 for SGD and momentum). Default: ``Adam(1e-3)``.
        """
        loss_fn = losses.get(loss)
        if regularizer is not None and not isinstance(regularizer, Regularizer):
            raise TypeError(f"regularizer must be sd.l1(c) or sd.l2(c), got {regularizer!r}")
        self.loss_name, self.kind = loss, loss_fn.targets
        if self.kind == "classes" and self.units < 2:
            raise ValueError("softmax_cross_entropy needs at least 2 output units")
        self.optimizer = get_optimizer(optimizer) if optimizer is not None else Adam(1e-3)
        self.regularizer, self.backend, self.dtype, self.seed = regularizer, backend, dtype, seed
        self.data_loss = loss_fn(self.output, self.y)
        penalty = regularizer(*self.kernels) if regularizer is not None and self.kernels else None
        self.loss = self.data_loss + penalty if penalty is not None else self.data_loss
        infer_loss = loss_fn(self.inference_output, self.y)
        self.inference_loss = infer_loss + penalty if penalty is not None else infer_loss
        rng = np.random.default_rng(seed)
        initial = {}  # every parameter's first value, drawn once (TrainStep draws only what is not given)
        for layer, params in zip(self.layers, self.layer_params):
            if isinstance(layer, Dense) and params:  # Conv2D is a Dense: its kernel is drawn the same way
                W = params[0]
                initial[str(W.name)] = layer.init_kernel(rng, W.value_shape)
        initial.update(self.initial)  # γ = 1, running variance = 1
        self.train_step = TrainStep(self.loss, self.params, optimizer=self.optimizer, backend=backend, dtype=dtype,
                                    outputs={"out": self.output}, seed=seed, writes=self.writes, initial=initial)
        self._forward = {}

    def require_compiled(self):
        if self.train_step is None:
            raise RuntimeError("call model.compile(...) first")

    # ------------------------------------------------------------------ weights

    def get_weights(self) -> dict:
        self.require_compiled()
        return {k: v.copy() for k, v in self.train_step.params.items()}

    def set_weights(self, weights: dict) -> None:
        self.require_compiled()
        for k, v in weights.items():
            if k not in self.train_step.params:
                raise KeyError(f"no parameter {k!r}; the model has {list(self.train_step.params)}")
            target = self.train_step.params[k]
            if np.shape(v) != target.shape:
                raise ValueError(f"set_weights: {k!r} has shape {np.shape(v)}, expected {target.shape}")
            target[...] = v

    # ------------------------------------------------------------------ data

    def prepare(self, X, y, what):
        """Checked ``(X, one-hot or column Y)`` for this model's loss."""
        return datasets.check_dataset(X, y, kind=self.kind, outputs=self.units, input_dim=self.input_dim,
                                      what=what, dtype=self.train_step.dtype)

    def metrics(self, out, Y) -> dict:
        if self.kind == "classes":
            return {"accuracy": float(np.mean(out.argmax(1) == Y.argmax(1)))}
        if self.kind == "binary":
            return {"accuracy": float(np.mean((out > 0) == (Y > 0.5)))}
        return {}

    def _run_forward(self, which: str, arrays: dict, n: int) -> dict:
        """The forward program (``"predict"``: outputs; ``"evaluate"``: loss too) on the model's backend."""
        if which not in self._forward:
            out = self.inference_output
            outputs = {"out": out} if which == "predict" else {"loss": self.inference_loss, "out": out}
            self._forward[which] = compile_outputs(outputs, self.backend, self.dtype)
        runner = self._forward[which]
        externals = dict(arrays)
        if isinstance(self.input_dim, tuple):  # images (n, h, w, c) are (n·h·w, c) pixel rows in the graph
            externals["x"] = np.ascontiguousarray(arrays["x"]).reshape(-1, self.input_dim[2])
        # a vector is a (1, k) row and a kernel (kh, kw, c_in, c_out) a (kh·kw·c_in, c_out) matrix
        for values in (self.train_step.params, self.train_step.statistics):
            externals.update({k: v.reshape(-1, v.shape[-1]) if v.ndim != 2 else v for k, v in values.items()})
        return runner.run(externals, {}, n)

    # ------------------------------------------------------------------ training

    def fit(self, X, y, epochs: int = 1, batch_size: int = 32, validation_data=None, validation_split: float = 0.0,
            shuffle: bool = True, callbacks=None, verbose: int = 1, seed: int | None = None,
            terminate_on_nan: bool = True, cluster=None, sync: str = "grads", every: int = 1) -> fitting.History:
        """Train for ``epochs`` more epochs; returns the model's ``History`` (all epochs so far).

        Data is checked before anything compiles. Batches are shuffled with a seed
        and the absolute epoch number, so a resumed run sees the same batches.

        ``terminate_on_nan`` (on by default, Keras's ``TerminateOnNaN``): the first
        non-finite training loss stops training with a ``RuntimeWarning`` naming the epoch
        and step, and the weights and optimizer state go back to the start of that epoch
        (the last state known to give a finite loss; one copy per epoch, none per step).
        ``cluster=`` (a Dask ``Client``) trains data-parallel in the same loop (validation,
        callbacks and ``terminate_on_nan`` as above): see ``symdl.distributed``
        (``sync="grads"``: exact; ``sync="params", every=k``: local SGD).
        """
        return fitting.fit(self, X, y, epochs=epochs, batch_size=batch_size, validation_data=validation_data,
                           validation_split=validation_split, shuffle=shuffle, callbacks=callbacks, verbose=verbose,
                           seed=seed, terminate_on_nan=terminate_on_nan, cluster=cluster, sync=sync, every=every)

    # ------------------------------------------------------------------ inference

    def predict(self, X, batch_size: int = 1024) -> np.ndarray:
        """The model's outputs (logits for classification), in chunks of ``batch_size``."""
        self.require_compiled()
        X = datasets.check_features(X, input_dim=self.input_dim, what="prediction data", dtype=self.train_step.dtype)
        outs = []
        for i in range(0, len(X), batch_size):
            xb = X[i : i + batch_size]
            outs.append(np.array(self._run_forward("predict", {"x": xb}, len(xb))["out"]))
        return np.concatenate(outs)

    def evaluate(self, X, y, batch_size: int = 1024, _prepared: bool = False) -> dict:
        """``{"loss": ..., "accuracy": ...}`` on ``(X, y)`` (the loss includes the regulariser)."""
        self.require_compiled()
        if not _prepared:  # prepared: C-contiguous in the model's dtype (datasets.check_dataset)
            X, y = self.prepare(X, y, "evaluation data")
        total, outs = 0.0, []
        for i in range(0, len(X), batch_size):
            xb, yb = X[i : i + batch_size], y[i : i + batch_size]
            result = self._run_forward("evaluate", {"x": xb, "y": yb}, len(xb))
            total += float(np.asarray(result["loss"]).reshape(-1)[0]) * len(xb)
            outs.append(np.array(result["out"]))
        return {"loss": total / len(X), **self.metrics(np.concatenate(outs), y)}

    # ------------------------------------------------------------------ reading

    def summary(self, print_fn=print) -> str:
        """A Keras-style table of layers, output shapes and parameter counts (trainable, and the
        non-trainable running statistics of batch norms); a functional model's table also says which
        layers (or input) feed each (``connected to``, the first call's for a shared layer)."""
        chain = type(self) is Sequential
        rows = [("layer", "output shape", "params", "activation") + (() if chain else ("connected to",))]
        total = frozen = 0
        stats = {str(s.name): int(np.prod(s.shape)) for s in self.writes}
        for i, (layer, name, params, out, inbound) in enumerate(zip(
                self.layers, self.layer_names, self.layer_params, self.layer_outputs, self.layer_inbound), start=1):
            count = sum(int(np.prod(p.value_shape)) for p in params)
            fixed = sum(stats.get(f"{k}{i}", 0) for k in ("moving_mean", "moving_var"))
            total, frozen = total + count, frozen + fixed
            shape = "(n, " + ", ".join(map(str, image_shape(out) or (out.shape[1],))) + ")"
            feeds = () if chain else (", ".join(inbound),)
            rows.append((name, shape, f"{count + fixed:,}", layer.describe()) + feeds)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        what = f"input_shape={self.input_dim}" if isinstance(self.input_dim, tuple) else f"input_dim={self.input_dim}"
        title = "Sequential" if chain else f"Model {self.name!r}" if self.name else "Model"
        lines = [f"{title} ({what})"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(2, "  ".join("-" * w for w in widths))
        lines.append(f"total params: {total + frozen:,}")
        lines.append(f"trainable params: {total:,}")
        lines.append(f"non-trainable params: {frozen:,}")
        text = "\n".join(lines)
        if print_fn:
            print_fn(text)
        return text

    def formulas(self, latex: bool = False) -> str:
        """Every gradient, derived: the textbook backward pass (``latex=True`` for LaTeX)."""
        self.require_compiled()
        e = explain(self.loss, self.params)
        return e.latex if latex else str(e)

    def source(self, backend: str | None = None) -> str:
        """The generated training-step module."""
        self.require_compiled()
        if backend is None or backend == self.backend:
            return self.train_step.source
        return TrainStep(self.loss, self.params, optimizer=self.optimizer, backend=backend, dtype=self.dtype,
                         writes=self.writes).source

    # ------------------------------------------------------------------ checkpoints

    def architecture(self) -> dict:
        """What a checkpoint stores to rebuild the model: the layers' configs, and for a functional
        model its calls in order (``graph``: the input, then each layer call's place in
        ``layers`` and the positions of the tensors it was called on) and the output's position."""
        arch = {"input_dim": list(self.input_dim) if isinstance(self.input_dim, tuple) else self.input_dim,
                "layers": [{"class": type(l).__name__, **l.config(name)}
                           for l, name in zip(self.layers, self.layer_names)]}
        if type(self) is Sequential:
            return arch  # the 0.2 format
        place = {id(layer): i for i, layer in enumerate(self.layers)}
        position = {id(t): i for i, t in enumerate(self.calls)}
        graph = [{"input": t.name, "shape": list(t.shape)} if t.layer is None else
                 {"layer": place[id(t.layer)], "inputs": [position[id(p)] for p in t.inputs], "many": t.many}
                 for t in self.calls]
        return {**arch, "name": self.name, "graph": graph, "output": position[id(self.outputs[0])]}

    def save(self, path) -> None:
        """Architecture, weights, optimizer state, step and epoch counts: atomically, no pickle."""
        self.require_compiled()
        reg = self.regularizer
        meta = {
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
            "architecture": self.architecture(),
            "compile": {"loss": self.loss_name, "optimizer": self.optimizer.config(),
                        "regularizer": None if reg is None else {"kind": reg.kind, "coefficient": reg.coefficient},
                        "backend": self.backend, "dtype": str(np.dtype(self.dtype)), "seed": self.seed},
            "epoch": self.epoch, "history": self.history.history,
        }
        checkpoint.write(path, meta, self.train_step.state_dict())



def _single(tensors, what):
    """The one symbolic tensor of ``inputs`` / ``outputs`` (a tensor or a list of one)."""
    if isinstance(tensors, (list, tuple)):
        if len(tensors) != 1:
            raise ValueError(f"Model: {what} must be one symbolic tensor (several inputs or outputs are not "
                             f"supported yet), got {len(tensors)}")
        tensors = tensors[0]
    if not isinstance(tensors, functional.SymbolicTensor):
        raise TypeError(f"Model: {what} must be a symbolic tensor (sd.nn.Input(...) or a layer's output), "
                        f"got {type(tensors).__name__}")
    return tensors


class Sequential(Model):
    """A stack of layers applied in order: the ``Model`` of ``Input`` -> each layer called on the last
    output. ``input_dim`` is the number of features, or ``input_shape=(h, w, c)`` the NHWC images a
    convolutional model reads (Keras's name)."""

    def __init__(self, layers, input_dim: int | None = None, input_shape=None, name=None):
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        if input_shape is not None:
            input_shape = tuple(input_shape)
            if input_dim is not None:
                raise ValueError("Sequential: give input_dim or input_shape, not both")
            input_dim = input_shape[0] if len(input_shape) == 1 else input_shape
        if not (isinstance(input_dim, int) and input_dim > 0 or isinstance(input_dim, tuple) and len(input_dim) == 3):
            raise ValueError(f"Sequential: input_dim must be a positive integer or input_shape (h, w, c), "
                             f"got {input_dim!r}")
        x = functional.Input(shape=input_dim if isinstance(input_dim, tuple) else (input_dim,))
        h = x
        for layer in layers:
            h = layer(h)
        super().__init__(x, h, name=name)


def load(path, backend: str | None = None) -> Model:
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
            cfg = dict(cfg)
            cls = LAYERS.get(cfg.pop("class", "Dense"))  # the first version-1 files hold Dense layers only
            act = cfg.get("activation")
            if act is not None and act not in functions.REGISTRY:
                raise checkpoint.CheckpointError(
                    f"{path} uses the activation {act!r}, which is not registered: call "
                    f"sd.activation({act!r}, formula) before loading")
            layers.append(cls(**cfg))
        dim = arch["input_dim"]
        if "graph" in arch:  # a functional model: replay its calls
            tensors = []
            for call in arch["graph"]:
                if "input" in call:
                    tensors.append(functional.Input(shape=tuple(call["shape"]), name=call["input"]))
                else:
                    ins = [tensors[i] for i in call["inputs"]]
                    tensors.append(layers[call["layer"]](ins if call["many"] else ins[0]))
            model = Model(tensors[0], tensors[arch["output"]], name=arch.get("name"))
        else:
            model = Sequential(layers, input_dim=tuple(dim) if isinstance(dim, list) else dim)
        reg = comp["regularizer"]
        regularizer = None if reg is None else {"l1": l1, "l2": l2}[reg["kind"]](reg["coefficient"])
        model.compile(loss=comp["loss"], optimizer=from_config(comp["optimizer"]), regularizer=regularizer,
                      backend=backend or comp["backend"], dtype=comp["dtype"], seed=comp["seed"])
        model.train_step.load_state_dict(arrays)
        model.epoch = int(meta["epoch"])
        model.history = fitting.History(meta.get("history"))
    except checkpoint.CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{path} does not describe a model this symdl can build: {exc}") from exc
    return model

