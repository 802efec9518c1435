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

import numbers
import weakref

import numpy as np

from . import datasets
from ..formulas import activations as functions, losses
from ..ops.conv import image_shape
from ..ops.embedding import sequence_length
from ..autodiff.explain import explain
from ..graph.nodes import SequenceInput, TokenInput, VectorParam, input as sd_input, sequence_input
from ..formulas.optimizers import Adam, Optimizer, from_config, get as get_optimizer
from ..run.pipeline import TrainStep, compile_outputs
from ..formulas.regularizers import Regularizer, l1, l2
from . import checkpoint, fitting, functional
from .layers import EMBEDDING_INITIALIZERS, LAYERS, Built, Dense, Embedding, TokenAndPositionEmbedding
from ..registry import Registry, rich_display

#: ``{format: export(model, path, **options)}``, filled by ``symdl.export`` (a later stage).
EXPORTERS = Registry("export format")


class Formulas(str):
    """``model.formulas()``: the derivation as text (or LaTeX), which a notebook shows rendered
    (``symdl.show.rich.formulas_bundle``: the explanation and the compiled kernels)."""

    def __new__(cls, text: str, model):
        self = super().__new__(cls, text)
        self.model = model
        return self

    def _repr_mimebundle_(self, include=None, exclude=None):
        return rich_display(self, include, exclude)

    def _repr_pretty_(self, p, cycle):  # IPython's text view: the text itself, not its repr
        p.text(str(self))



def _nested_shape(h) -> tuple:
    """``(shape without the batch axis, token ids?)`` of what a model used as a layer is given: ids
    ``(T,)``, sequences ``(T, d)``, images ``(h, w, c)``, features ``(d,)``."""
    if isinstance(h, TokenInput):
        return (int(h.sequence_length),), True
    T = sequence_length(h)
    if T:
        return (int(T), int(h.shape[1])), False
    return image_shape(h) or (int(h.shape[1]),), False

class Model:
    """Keras 3's functional ``Model(inputs, outputs)``: the layers between ``sd.nn.Input`` tensors and
    output tensors, built into one graph (``symdl.nn.functional``). ``Sequential`` is a ``Model``
    whose layers are called in order.

    ``inputs`` and ``outputs`` are one symbolic tensor, a list of them, or a dict ``{name: tensor}``
    (as in Keras 3): ``fit``, ``evaluate`` and ``predict`` then take (and ``predict`` returns) one
    array, a list or a dict of arrays in the same order or keyed by the same names. Outputs given
    as a list are named by the layers that make them (``dense_3``); inputs by their ``Input`` names.

    Each layer's parameters are named by the layer's place in the model (``W1``, ``b1``, ``K2``,
    ...: parents before children, depth first from the outputs); a layer called twice shares them.
    A model called on a tensor is a layer of another model (``Model(x, encoder(x))``): its layers'
    parameters are named by its place and theirs (``W3_1``) and its weights are shared with the
    inner model (see ``compile``).

    >>> import symdl as sd
    >>> x = sd.nn.Input(shape=(4,))
    >>> h = sd.nn.Dense(4, activation="tanh")(x)
    >>> model = sd.nn.Model(x, sd.nn.Dense(2)(h + x))
    >>> print(*(str(p.name) for p in model.params))
    W1 b1 W3 b3
    >>> a, b = sd.nn.Input(shape=(3,), name="a"), sd.nn.Input(shape=(2,), name="b")
    >>> joined = sd.nn.Concatenate()([a, b])
    >>> two = sd.nn.Model([a, b], {"score": sd.nn.Dense(1)(joined), "label": sd.nn.Dense(2)(joined)})
    >>> two.input_names, two.output_names
    (['a', 'b'], ['score', 'label'])
    """

    kind = None  # after compile: what the loss's targets are ("classes", ...; "multiple" for several losses)
    merges = False

    def _repr_mimebundle_(self, include=None, exclude=None):  # a notebook's display (symdl.show)
        return rich_display(self, include, exclude)

    def save_weights(self, path) -> None:
        """Every weight in a safetensors file (Keras-style names, shapes and dtypes in its header,
        no pickle), written atomically: ``nn.weights.save_weights``."""
        from . import weights

        weights.save_weights(self, path)

    def load_weights(self, path) -> None:
        """Weights from a safetensors file written by ``save_weights`` (or by hand with the same
        names): ``nn.weights.load_weights``; an error lists every missing, extra or mis-shaped name."""
        from . import weights

        weights.load_weights(self, path)

    def export(self, path, format: str = "onnx", **kwargs):  # noqa: A002 - Keras's argument name
        """Keras 3's ``model.export(path, format="onnx")``: the forward pass, or with
        ``gradients=True`` the loss and every weight's gradient, as an ONNX file (``symdl[onnx]``;
        ``symdl.export.onnx.export_model``: ``opset``, ``gradients``, ``training``, ``dtype``)."""
        return EXPORTERS.get(format)(self, path, **kwargs)

    def __init__(self, inputs, outputs, name=None):
        self._in_keys, ins = functional.structure(inputs, "inputs")
        self._out_keys, outs = functional.structure(outputs, "outputs")
        order = functional.walk(outs)
        functional.check_graph(ins, outs, order)
        self.name = name
        self.inputs, self.outputs, self.calls = ins, outs, order
        self.merges = len(ins) > 1  # called on a list when it is a layer of another model
        self.input_names = self._in_keys or functional.unique_names([t.name for t in ins])
        self.input_dim = ins[0].features if len(ins) == 1 else [t.features for t in ins]
        single = len(ins) == 1
        # a leaf per input as its tensor declares it: features, images, token ids or sequences
        self.xs = [functional._probe("x" if single else f"x{j}", t) for j, t in enumerate(ins, start=1)]
        self.x = self.xs[0] if single else None
        self.layers = list({id(t.layer): t.layer for t in order if t.layer is not None}.values())
        kinds = ["functional" if isinstance(layer, Model) else layer.kind for layer in self.layers]
        self.layer_names = [layer.name or f"{kind}_{kinds[:i].count(kind)}"
                            for i, (layer, kind) in enumerate(zip(self.layers, kinds), start=1)]
        self._build()
        if self._out_keys is None:
            made_by = {id(layer): name for layer, name in zip(self.layers, self.layer_names)}
            self.output_names = functional.unique_names(
                [made_by[id(t.layer)] if t.layer is not None else self.input_names[ins.index(t)] for t in outs])
        else:
            self.output_names = list(self._out_keys)
        for out_name, h in zip(self.output_names, self.output_exprs):
            if image_shape(h) is not None:
                raise ValueError(f"{type(self).__name__}: the output {out_name!r} ends in images {image_shape(h)}: put "
                                 "sd.nn.Flatten() (or a global pooling) and a Dense layer last")
        self.units_per_output = [int(h.shape[1]) for h in self.output_exprs]
        self.units = self.units_per_output[0] if len(outs) == 1 else self.units_per_output
        # a sequence output (n, T, units) is the rows (n·T, units): its targets are sequences too
        self.sequence_lengths = [t.shape[0] if len(t.shape) == 2 else None for t in outs]
        self.ys = [sequence_input(name, (T, u)) if T else sd_input(name, u)
                   for name, u, T in zip(["y"] if len(outs) == 1 else [f"y{j}" for j in range(1, len(outs) + 1)],
                                         self.units_per_output, self.sequence_lengths)]
        self.y = self.ys[0] if len(outs) == 1 else None
        self.train_step = None
        self._owner_refs = []  # (weak reference to a compiled model this one is a layer of, {our name: its})
        self.stop_training = False
        self.epoch = 0
        self.history = fitting.History()
        self._forward = {}  # "predict" / "evaluate" -> runner, compiled on first use

    def _build(self):
        """Each layer call in order: the first builds the layer's parameters, later ones share them."""
        values = {id(t): (leaf, leaf) for t, leaf in zip(self.inputs, self.xs)}
        names = {id(t): name for t, name in zip(self.inputs, self.input_names)}
        built = functional.replay(self.calls, self.layers, values, lambda k: k + 1, names, self.layer_names)
        self.layer_params, self.layer_outputs, self.layer_inbound = built.params, built.outputs, built.inbound
        self.writes, self.initial, self.layer_writes = built.writes, built.initial, built.layer_writes
        self.output_exprs = [built.values[id(t)][0] for t in self.outputs]  # training graph
        self.inference_exprs = [built.values[id(t)][1] for t in self.outputs]  # predict / evaluate
        self.output, self.inference_output = self.output_exprs[0], self.inference_exprs[0]

    # ------------------------------------------------------------------ a model as a layer

    def __call__(self, inputs):
        """A model called on symbolic tensors is one layer of another model (Keras's nested models)."""
        return functional.call_layer(self, inputs)

    @property
    def shareable(self) -> bool:
        return all(getattr(layer, "shareable", True) for layer in self.layers)

    def _check_nested(self, hs):
        if len(self.outputs) != 1:
            raise ValueError(f"{functional.label(self)}: a model with {len(self.outputs)} outputs cannot be used as "
                             "a layer (give it one output)")
        got = [_nested_shape(h) for h in hs]
        want = [(tuple(t.shape), t.dtype in ("int32", "int64")) for t in self.inputs]
        if got != want:
            got, want = [g for g, _ in got], [w for w, _ in want]
            raise ValueError(f"{functional.label(self)} takes {', '.join(map(functional.shape_text, want))}, got "
                             f"{', '.join(map(functional.shape_text, got))}")

    def build_both(self, index, h, h_infer):
        """The layer interface: this model's calls replayed on ``h``, its parameters named ``W{index}_{k}``."""
        hs, hs_infer = (h, h_infer) if self.merges else ([h], [h_infer])
        self._check_nested(hs)
        values = {id(t): (a, b) for t, a, b in zip(self.inputs, hs, hs_infer)}
        built = functional.replay(self.calls, self.layers, values, lambda k: f"{index}_{k + 1}")
        train, infer = built.values[id(self.outputs[0])]
        return Built([p for ps in built.params for p in ps], train, infer, built.writes, built.initial)

    def apply(self, params, h):
        """A later call of this model within one model: the same parameters on another input."""
        hs = h if self.merges else [h]
        self._check_nested(hs)
        sizes = [len(ps) for ps in self.layer_params]
        split = [params[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
        values = {id(t): (a, a) for t, a in zip(self.inputs, hs)}
        built = functional.replay(self.calls, self.layers, values, None, given=split)
        return built.values[id(self.outputs[0])][0]

    def describe(self) -> str:
        return f"{len(self.layers)} layer" + ("s" if len(self.layers) != 1 else "")

    def config(self, name=None) -> dict:
        return {"architecture": self.architecture(), "name": name or self.name}

    def _nested(self):
        """``[(inner model, {inner name: our name})]`` for each model used as a layer of this one:
        its parameters and running statistics, matched in build order."""
        pairs = []
        for layer, params, writes in zip(self.layers, self.layer_params, self.layer_writes):
            if isinstance(layer, Model):
                names = {str(a.name): str(b.name) for a, b in zip(layer.params, params)}
                names.update({str(a.name): str(b.name) for a, b in zip(layer.writes, writes)})
                pairs.append((layer, names))
        return pairs

    def _values(self) -> dict:
        return {**self.train_step.params, **self.train_step.statistics}

    def _share_with_nested(self) -> None:
        """Copy this model's weights to every compiled model that shares them: the models nested in
        it (and theirs), and the compiled models it is nested in (and theirs)."""
        if self.train_step is None:
            return
        self._push_down()
        self._push_up()

    def _push_down(self) -> None:
        ours = self._values()
        for inner, names in self._nested():
            if inner.train_step is not None:
                theirs = inner._values()
                for a, b in names.items():
                    theirs[a][...] = ours[b]
                inner._push_down()

    def _push_up(self) -> None:
        ours = self._values()
        for outer, names in self._owners():
            theirs = outer._values()
            for a, b in names.items():
                theirs[b][...] = ours[a]
            outer._push_up()

    def _owners(self) -> list:
        """``[(compiled model this one is a layer of, {our name: its name})]``, for those still alive."""
        live = [(ref(), names) for ref, names in self._owner_refs]
        return [(outer, names) for outer, names in live if outer is not None and outer.train_step is not None]

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
                backend: str = "cpu", dtype: str = "float32", seed: int = 0, loss_weights=None):
        """Derive the gradients and generate the training step (Numba compiles on the first batch).

        ``optimizer`` is an ``sd.optim`` optimizer or, as in Keras, a name in any case
        (``"adam"``) for one with default hyper-parameters (Keras's learning rates: 1e-3 for
        Adam, AdamW, RMSProp and Adagrad, 1e-2 for SGD and momentum). Default: ``Adam(1e-3)``.

        A model with several outputs takes one ``loss`` for all of them, a list (one per output)
        or a dict keyed by output name (``model.output_names``); ``loss_weights`` (a list or a dict,
        default 1 each) weighs them: the training loss is ``Σ weight · loss``, plus the regulariser.

        A model used as a layer of this one shares its weights with it (Keras shares the
        variables; here the values are copied): the one compiled second starts from the other's,
        and ``fit`` and ``set_weights`` on either copy their values to the other.
        """
        fns = [losses.get(f) for f in self._per_output(loss, "loss", None)]
        weights = self._per_output(loss_weights, "loss_weights", 1.0)
        for w, out_name in zip(weights, self.output_names):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not np.isfinite(w) or w < 0:
                raise ValueError(f"compile: the loss weight of output {out_name!r} must be a finite number >= 0, "
                                 f"got {w!r}")
        if regularizer is not None and not isinstance(regularizer, Regularizer):
            raise TypeError(f"regularizer must be sd.l1(c) or sd.l2(c), got {regularizer!r}")
        self.kinds = [fn.targets for fn in fns]
        for kind, units, out_name in zip(self.kinds, self.units_per_output, self.output_names):
            if kind == "classes" and units < 2:
                raise ValueError(f"softmax_cross_entropy needs at least 2 output units (output {out_name!r} "
                                 f"has {units})")
        self.kind = self.kinds[0] if len(fns) == 1 else "multiple"
        self.loss_name, self.loss_weights = loss, loss_weights
        self.optimizer = get_optimizer(optimizer) if optimizer is not None else Adam(1e-3)
        self.regularizer, self.backend, self.dtype, self.seed = regularizer, backend, dtype, seed
        self.output_losses = [fn(h, y) for fn, h, y in zip(fns, self.output_exprs, self.ys)]
        self.inference_losses = [fn(h, y) for fn, h, y in zip(fns, self.inference_exprs, self.ys)]
        penalty = regularizer(*self.kernels) if regularizer is not None and self.kernels else None
        self.data_loss = _weighted(self.output_losses, weights)
        self.loss = self.data_loss + penalty if penalty is not None else self.data_loss
        infer_loss = _weighted(self.inference_losses, weights)
        self.inference_loss = infer_loss + penalty if penalty is not None else infer_loss
        self.train_step = TrainStep(self.loss, self.params, optimizer=self.optimizer, backend=backend, dtype=dtype,
                                    outputs=self._step_outputs(), seed=seed, writes=self.writes,
                                    initial=self._initial_values(seed))
        self._fed = {str(leaf.name) for leaf in self.train_step.program.inputs}
        self._forward = {}
        for inner, names in self._nested():  # the inner model reads and writes these weights too
            inner._owner_refs = [(r, n) for r, n in inner._owner_refs if r() is not self]
            inner._owner_refs.append((weakref.ref(self), names))

    def _initial_values(self, seed) -> dict:
        """Every parameter's first value, drawn once (TrainStep draws only what is not given); a
        compiled nested model's weights are its current ones."""
        rng = np.random.default_rng(seed)
        initial, tables = {}, {}
        for layer, params in zip(self.layers, self.layer_params):
            if isinstance(layer, Dense) and params:  # Conv2D is a Dense: its kernel is drawn the same way
                W = params[0]
                initial[str(W.name)] = layer.init_kernel(rng, W.value_shape)
            elif isinstance(layer, Model):  # its layers' kernels, drawn by their own rules
                for inner_layer, inner_params in zip(layer.layers, _split(params, layer.layer_params)):
                    if isinstance(inner_layer, Dense) and inner_params:
                        W = inner_params[0]
                        initial[str(W.name)] = inner_layer.init_kernel(rng, W.value_shape)
                    tables.update(_embedding_tables(inner_layer, inner_params, rng))
            tables.update(_embedding_tables(layer, params, rng))
        initial.update(self.initial)  # γ = 1, running variance = 1
        initial.update(tables)  # embedding tables from the compile seed too (not the layer's own draw)
        for inner, names in self._nested():
            if inner.train_step is not None:
                theirs = inner._values()
                initial.update({b: theirs[a].copy() for a, b in names.items()})
        for outer, names in self._owners():  # compiled inside a compiled model: its current values
            theirs = outer._values()
            initial.update({a: theirs[b].copy() for a, b in names.items()})
        return initial

    def _step_outputs(self) -> dict:
        """What the training step keeps: the outputs, and with several outputs each one's loss."""
        if len(self.outputs) == 1:
            return {"out": self.output}
        outs = {f"out{j}": h for j, h in enumerate(self.output_exprs, 1)}
        return {**outs, **{f"loss{j}": L for j, L in enumerate(self.output_losses, 1)}}

    def _per_output(self, value, what, default):
        """``value`` (one for all, a list in output order or a dict by output name) as a list per output."""
        names, count = self.output_names, len(self.output_names)
        if value is None:
            if default is None:
                raise ValueError(f"compile: give a {what}")
            return [default] * count
        if isinstance(value, dict):
            unknown = [k for k in value if k not in names]
            if unknown:
                raise ValueError(f"compile: {what} names the output(s) {', '.join(map(repr, unknown))}; the model's "
                                 f"outputs are {', '.join(map(repr, names))}")
            missing = [k for k in names if k not in value]
            if missing and default is None:
                raise ValueError(f"compile: {what} gives none for the output(s) {', '.join(map(repr, missing))}; "
                                 f"the model's outputs are {', '.join(map(repr, names))}")
            return [value.get(k, default) for k in names]
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"compile: {len(value)} {what} value(s) for {count} output(s) "
                                 f"({', '.join(map(repr, names))})")
            return list(value)
        if what == "loss_weights" and count > 1:
            raise ValueError(f"compile: loss_weights must be a list or a dict for {count} outputs, got {value!r}")
        return [value] * count

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
        self._share_with_nested()

    # ------------------------------------------------------------------ data

    def _arrays_by_name(self, given, names, what, role):
        """One array, a list or a dict keyed by ``names`` -> a list in the order of ``names``."""
        count = len(names)
        if isinstance(given, dict):
            unknown = [k for k in given if k not in names]
            missing = [k for k in names if k not in given]
            if unknown or missing:
                raise datasets.DataError(
                    f"{what}: the {role} arrays are keyed {', '.join(map(repr, given))}; the model's {role}s are "
                    f"{', '.join(map(repr, names))}")
            return [given[k] for k in names]
        if isinstance(given, (list, tuple)) and count > 1:
            if len(given) != count:
                raise datasets.DataError(f"{what}: {len(given)} {role} array(s) for the model's {count} {role}s "
                                         f"({', '.join(map(repr, names))})")
            return list(given)
        if count > 1:
            raise datasets.DataError(f"{what}: the model has {count} {role}s ({', '.join(map(repr, names))}): give "
                                     f"a list or a dict of {count} arrays, got {type(given).__name__}")
        one = isinstance(given, (list, tuple)) and len(given) == 1 and isinstance(given[0], np.ndarray)
        return [given[0] if one else given]  # a list of one array, as Keras takes it

    def _features(self, X, what):
        """Checked input arrays: one ndarray for a one-input model, else ``fitting.Columns`` by leaf name."""
        arrays = self._arrays_by_name(X, self.input_names, what, "input")
        dtype = self.train_step.dtype
        checked = []
        for a, t, leaf, input_name in zip(arrays, self.inputs, self.xs, self.input_names):
            label = what if len(arrays) == 1 else f"{what} (input {input_name!r})"
            if isinstance(leaf, TokenInput):  # ids (n, T), each inside every vocabulary that reads them
                checked.append(datasets.check_tokens(a, sequence_length=leaf.sequence_length, what=label,
                                                     dtype=dtype, leaf=leaf))
            else:
                checked.append(datasets.check_features(a, input_dim=t.features, what=label, dtype=dtype))
        if len(checked) == 1:
            return checked[0]
        rows = {name: len(a) for name, a in zip(self.input_names, checked)}
        if len(set(rows.values())) > 1:
            raise datasets.DataError(f"{what}: the input arrays have different numbers of rows: {rows}")
        return fitting.Columns({str(leaf.name): a for leaf, a in zip(self.xs, checked)})

    def prepare(self, X, y, what):
        """Checked ``(X, one-hot or column Y)`` for this model's losses (``fitting.Columns`` by leaf
        name where the model has several inputs or outputs)."""
        X = self._features(X, what)
        first = X if isinstance(X, np.ndarray) else next(iter(X.arrays.values()))
        targets = self._arrays_by_name(y, self.output_names, what, "output")
        Ys = []
        for target, kind, units, T, out_name in zip(targets, self.kinds, self.units_per_output,
                                                    self.sequence_lengths, self.output_names):
            label = what if len(targets) == 1 else f"{what} (output {out_name!r})"
            Ys.append(datasets.check_targets(target, len(first), kind=kind, outputs=units, what=label,
                                             dtype=self.train_step.dtype, sequence_length=T))
        if len(Ys) == 1:
            return X, Ys[0]
        return X, fitting.Columns({str(leaf.name): Y for leaf, Y in zip(self.ys, Ys)})

    def feed(self, X, Y, every: bool = False) -> dict:
        """The training step's arrays by leaf name for prepared ``(X, Y)`` (``every``: also the targets of
        outputs whose loss weight is 0, which the step does not read)."""
        xs = {"x": X} if isinstance(X, np.ndarray) else X.arrays
        ys = {"y": Y} if isinstance(Y, np.ndarray) else Y.arrays
        return {k: v for k, v in {**xs, **ys}.items() if every or k in self._fed}

    def step_outputs(self):
        """The last training step's outputs: one array, or ``{leaf name of the target: array}``."""
        if len(self.outputs) == 1:
            return self.train_step.output("out")
        return {str(y.name): self.train_step.output(f"out{j}") for j, y in enumerate(self.ys, 1)}

    def step_losses(self) -> dict:
        """Each output's (unweighted) loss at the last training step: ``{"{name}_loss": value}``."""
        return {f"{name}_loss": float(np.asarray(self.train_step.output(f"loss{j}")).reshape(-1)[0])
                for j, name in enumerate(self.output_names, 1)}

    def metrics(self, out, Y) -> dict:
        """Accuracy of a classifier (``{"accuracy": ...}``); for several outputs ``{name}_accuracy``
        of each classifying output (``out`` and ``Y`` then by target leaf name)."""
        if len(self.outputs) == 1:
            return _accuracy(self.kind, out, Y)
        result = {}
        for y, kind, out_name in zip(self.ys, self.kinds, self.output_names):
            result.update({f"{out_name}_{k}": v for k, v in _accuracy(kind, out[str(y.name)],
                                                                       Y.arrays[str(y.name)]).items()})
        return result

    def _run_forward(self, which: str, arrays: dict, n: int) -> dict:
        """The forward program (``"predict"``: outputs; ``"evaluate"``: losses too) on the model's backend."""
        if which not in self._forward:
            outputs = dict(zip(["out"] if len(self.outputs) == 1 else [f"out{j}" for j in range(1, len(self.ys) + 1)],
                               self.inference_exprs))
            if which == "evaluate":
                outputs["loss"] = self.inference_loss
                if len(self.outputs) > 1:
                    outputs.update({f"loss{j}": L for j, L in enumerate(self.inference_losses, 1)})
            self._forward[which] = compile_outputs(outputs, self.backend, self.dtype)
        runner = self._forward[which]
        externals = dict(arrays)
        for leaf in [*self.xs, *self.ys]:  # images (n, h, w, c) are (n·h·w, c) pixel rows in the graph,
            name = str(leaf.name)          # token ids (n, T) the column (n·T, 1), sequences (n·T, d) rows
            image = getattr(leaf, "image_shape", None)
            if name in arrays and (image is not None or isinstance(leaf, (TokenInput, SequenceInput))):
                externals[name] = np.ascontiguousarray(arrays[name]).reshape(-1, int(leaf.shape[1]))
        # a vector is a (1, k) row and a kernel (kh, kw, c_in, c_out) a (kh·kw·c_in, c_out) matrix
        for values in (self.train_step.params, self.train_step.statistics):
            externals.update({k: v.reshape(-1, v.shape[-1]) if v.ndim != 2 else v for k, v in values.items()})
        return runner.run(externals, {}, n)

    # ------------------------------------------------------------------ training

    def fit(self, X, y, epochs: int = 1, batch_size: int = 32, validation_data=None, validation_split: float = 0.0,
            shuffle: bool = True, callbacks=None, verbose: int = 1, seed: int | None = None,
            terminate_on_nan: bool = True, cluster=None, sync: str = "grads", every: int = 1) -> fitting.History:
        """Train for ``epochs`` more epochs; returns the model's ``History`` (all epochs so far).

        ``X`` and ``y``: an array each, or for several inputs / outputs a list (in the order of
        ``input_names`` / ``output_names``) or a dict keyed by those names. Token ids are integers
        ``(n, T)``; a sequence output ``(n, T, units)`` takes per-token targets: integer labels ``(n, T)``
        or one-hot ``(n, T, units)`` for ``softmax_cross_entropy`` (the mean over all ``n·T`` tokens, as
        PyTorch's ``CrossEntropyLoss``), ``(n, T, units)`` otherwise; ``batch_size`` counts sequences.
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
        try:
            return fitting.fit(self, X, y, epochs=epochs, batch_size=batch_size, validation_data=validation_data,
                               validation_split=validation_split, shuffle=shuffle, callbacks=callbacks,
                               verbose=verbose, seed=seed, terminate_on_nan=terminate_on_nan, cluster=cluster,
                               sync=sync, every=every)
        finally:
            self._share_with_nested()

    # ------------------------------------------------------------------ inference

    def predict(self, X, batch_size: int = 1024):
        """The model's outputs (logits for classification), in chunks of ``batch_size``: one array,
        or for several outputs a list (a dict when the outputs were given as a dict). A sequence
        output is ``(n, T, units)``; ``batch_size`` then counts sequences."""
        self.require_compiled()
        X = self._features(X, "prediction data")
        keys = ["out"] if len(self.outputs) == 1 else [f"out{j}" for j in range(1, len(self.ys) + 1)]
        outs = {k: [] for k in keys}
        for i in range(0, len(X), batch_size):
            xb = X[i : i + batch_size]
            result = self._run_forward("predict", {"x": xb} if isinstance(xb, np.ndarray) else xb.arrays, len(xb))
            for k in keys:
                outs[k].append(np.array(result[k]))
        joined = [np.concatenate(outs[k]) for k in keys]
        # a sequence output comes back as token rows (n·T, units): (n, T, units), as Keras gives it
        joined = [a.reshape(len(X), T, -1) if T else a for a, T in zip(joined, self.sequence_lengths)]
        if len(joined) == 1:
            return joined[0]
        return dict(zip(self.output_names, joined)) if self._out_keys is not None else joined

    def evaluate(self, X, y, batch_size: int = 1024, _prepared: bool = False) -> dict:
        """``{"loss": ..., "accuracy": ...}`` on ``(X, y)`` (the loss includes the regulariser and the
        loss weights); several outputs add each one's ``{name}_loss`` (unweighted) and
        ``{name}_accuracy``."""
        self.require_compiled()
        if not _prepared:  # prepared: C-contiguous in the model's dtype (datasets.check_dataset)
            X, y = self.prepare(X, y, "evaluation data")
        several = len(self.outputs) > 1
        keys = [f"out{j}" for j in range(1, len(self.ys) + 1)] if several else ["out"]
        sums = {"loss": 0.0, **({f"loss{j}": 0.0 for j in range(1, len(self.ys) + 1)} if several else {})}
        outs = {k: [] for k in keys}
        for i in range(0, len(X), batch_size):
            xb, yb = X[i : i + batch_size], y[i : i + batch_size]
            result = self._run_forward("evaluate", self.feed(xb, yb, every=True), len(xb))
            for k in sums:
                sums[k] += float(np.asarray(result[k]).reshape(-1)[0]) * len(xb)
            for k in keys:
                outs[k].append(np.array(result[k]))
        logs = {"loss": sums["loss"] / len(X)}
        if not several:
            return {**logs, **self.metrics(np.concatenate(outs["out"]), y)}
        logs.update({f"{name}_loss": sums[f"loss{j}"] / len(X) for j, name in enumerate(self.output_names, 1)})
        joined = {str(leaf.name): np.concatenate(outs[f"out{j}"]) for j, leaf in enumerate(self.ys, 1)}
        return {**logs, **self.metrics(joined, y)}

    # ------------------------------------------------------------------ reading

    def summary(self, print_fn=print) -> str:
        """A Keras-style table of layers, output shapes and parameter counts (trainable, and the
        non-trainable running statistics of batch norms); a functional model's table also says which
        layers (or inputs) feed each (``connected to``, the first call's for a shared layer). A model
        used as a layer is one row."""
        chain = type(self) is Sequential
        rows = [("layer", "output shape", "params", "activation") + (() if chain else ("connected to",))]
        total = frozen = 0
        for layer, name, params, writes, out, inbound in zip(
                self.layers, self.layer_names, self.layer_params, self.layer_writes, self.layer_outputs,
                self.layer_inbound):
            count = sum(int(np.prod(p.value_shape)) for p in params)
            fixed = sum(int(np.prod(s.shape)) for s in writes)
            total, frozen = total + count, frozen + fixed
            T = sequence_length(out)
            shape = "(n, " + ", ".join(map(str, image_shape(out) or ((T,) if T else ()) + (out.shape[1],))) + ")"
            feeds = () if chain else (", ".join(inbound),)
            rows.append((name, shape, f"{count + fixed:,}", layer.describe()) + feeds)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        if len(self.inputs) > 1:
            what = "inputs " + ", ".join(f"{n} {functional.shape_text(t.shape)}"
                                         for n, t in zip(self.input_names, self.inputs))
        else:
            images = isinstance(self.input_dim, tuple)
            what = f"input_shape={self.input_dim}" if images else f"input_dim={self.input_dim}"
            what += f", dtype={self.inputs[0].dtype}" if self.inputs[0].dtype else ""
        title = "Sequential" if chain else f"Model {self.name!r}" if self.name else "Model"
        lines = [f"{title} ({what})"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(2, "  ".join("-" * w for w in widths))
        if len(self.outputs) > 1:
            lines.append("outputs: " + ", ".join(self.output_names))
        lines.append(f"total params: {total + frozen:,}")
        lines.append(f"trainable params: {total:,}")
        lines.append(f"non-trainable params: {frozen:,}")
        text = "\n".join(lines)
        if print_fn:
            print_fn(text)
        return text

    def formulas(self, latex: bool = False) -> str:
        """Every gradient, derived: the textbook backward pass (``latex=True`` for LaTeX). A string;
        in a notebook it shows as the rendered derivation with the kernels each formula compiled to."""
        self.require_compiled()
        e = explain(self.loss, self.params)
        return Formulas(e.latex if latex else str(e), self)

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
        model its calls in order (``graph``: each input, then each layer call's place in
        ``layers`` and the positions of the tensors it was called on), the inputs' and outputs'
        positions, and the names a dict of inputs or outputs was keyed by."""
        arch = {"input_dim": _as_json(self.input_dim),
                "layers": [{"class": "Model" if isinstance(l, Model) else type(l).__name__, **l.config(name)}
                           for l, name in zip(self.layers, self.layer_names)]}
        if type(self) is Sequential:
            if self.inputs[0].dtype:  # token ids: an Input(shape=(T,), dtype=...) first
                arch["input_dtype"] = self.inputs[0].dtype
            return arch  # the 0.2 format
        place = {id(layer): i for i, layer in enumerate(self.layers)}
        position = {id(t): i for i, t in enumerate(self.calls)}
        graph = [{"input": t.name, "shape": list(t.shape), **({"dtype": t.dtype} if t.dtype else {})}
                 if t.layer is None else
                 {"layer": place[id(t.layer)], "inputs": [position[id(p)] for p in t.inputs], "many": t.many,
                  **({"output": t.index} if t.index else {})}  # output k > 0 of a call: inputs its first
                 for t in self.calls]
        return {**arch, "name": self.name, "graph": graph, "output": position[id(self.outputs[0])],
                "inputs": [position[id(t)] for t in self.inputs], "outputs": [position[id(t)] for t in self.outputs],
                "input_keys": self._in_keys, "output_keys": self._out_keys}

    def save(self, path) -> None:
        """Architecture, weights, optimizer state, step and epoch counts: atomically, no pickle."""
        self.require_compiled()
        reg = self.regularizer
        meta = {
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
            "architecture": self.architecture(),
            "compile": {"loss": self.loss_name, "loss_weights": _json_weights(self.loss_weights),
                        "optimizer": self.optimizer.config(),
                        "regularizer": None if reg is None else {"kind": reg.kind, "coefficient": reg.coefficient},
                        "backend": self.backend, "dtype": str(np.dtype(self.dtype)), "seed": self.seed},
            "epoch": self.epoch, "history": self.history.history,
        }
        checkpoint.write(path, meta, self.train_step.state_dict())


def _json_weights(weights):
    """``loss_weights`` as given (None, a number, a list or a dict), with plain floats for JSON."""
    if isinstance(weights, dict):
        return {k: float(v) for k, v in weights.items()}
    if isinstance(weights, (list, tuple)):
        return [float(v) for v in weights]
    return None if weights is None else float(weights)


def _weighted(terms, weights):
    total = None
    for term, w in zip(terms, weights):
        term = term if w == 1 else float(w) * term
        total = term if total is None else total + term
    return total


def _accuracy(kind, out, Y) -> dict:
    """Accuracy per sample, or per token for a sequence output (``out`` its rows ``(n·T, units)``,
    ``Y`` ``(n, T, units)``)."""
    out, Y = out.reshape(-1, out.shape[-1]), Y.reshape(-1, Y.shape[-1])
    if kind == "classes":
        return {"accuracy": float(np.mean(out.argmax(1) == Y.argmax(1)))}
    if kind == "binary":
        return {"accuracy": float(np.mean((out > 0) == (Y > 0.5)))}
    return {}


def _embedding_tables(layer, params, rng) -> dict:
    """An embedding layer's tables drawn by its initializers from ``rng`` (the compile seed), in layer
    order as ``Dense`` kernels are: ``{name: array}``; nothing for other layers."""
    if isinstance(layer, TokenAndPositionEmbedding):
        inits = [layer.embeddings_initializer, layer.position_initializer]
    elif isinstance(layer, Embedding):
        inits = [layer.embeddings_initializer]
    else:
        return {}
    return {str(p.name): np.asarray(init(rng, p.value_shape) if callable(init) else
                                    EMBEDDING_INITIALIZERS.get(init)(rng, p.value_shape))
            for p, init in zip(params, inits)}


def _split(flat, like):
    """``flat`` cut into lists of the lengths of ``like``'s lists."""
    out, i = [], 0
    for part in like:
        out.append(list(flat[i : i + len(part)]))
        i += len(part)
    return out


def _as_json(dim):
    if isinstance(dim, tuple):
        return list(dim)
    if isinstance(dim, list):
        return [_as_json(d) for d in dim]
    return dim


class Sequential(Model):
    """A stack of layers applied in order: the ``Model`` of ``Input`` -> each layer called on the last
    output. ``input_dim`` is the number of features, or ``input_shape=(h, w, c)`` the NHWC images a
    convolutional model reads (Keras's name); or, as in Keras 3, an ``sd.nn.Input`` first in the list
    (token ids need one, for their dtype):

    >>> import symdl as sd
    >>> model = sd.nn.Sequential([sd.nn.Input(shape=(5,), dtype="int32"), sd.nn.Embedding(10, 4), sd.nn.Dense(10)])
    >>> model.outputs[0]
    <SymbolicTensor shape=(None, 5, 10) from Dense>
    """

    def __init__(self, layers, input_dim: int | None = None, input_shape=None, name=None):
        layers = list(layers)
        if layers and isinstance(layers[0], functional.SymbolicTensor):  # Keras 3: [sd.nn.Input(...), layers...]
            x, layers = layers[0], layers[1:]
            if x.layer is not None:
                raise ValueError(f"Sequential: the first entry may be an sd.nn.Input, got {x!r}")
            if input_dim is not None or input_shape is not None:
                raise ValueError("Sequential: give an sd.nn.Input first or input_dim / input_shape, not both")
            if not layers:
                raise ValueError("Sequential needs at least one layer after its Input")
            super().__init__(x, _chain(x, layers), name=name)
            return
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        if input_shape is not None:
            input_shape = tuple(input_shape)
            if input_dim is not None:
                raise ValueError("Sequential: give input_dim or input_shape, not both")
            input_dim = input_shape[0] if len(input_shape) == 1 else input_shape
        if not (isinstance(input_dim, int) and input_dim > 0 or isinstance(input_dim, tuple) and len(input_dim) in (2, 3)):
            raise ValueError(f"Sequential: input_dim must be a positive integer or input_shape (h, w, c) or (steps, features), "
                             f"got {input_dim!r}")
        x = functional.Input(shape=input_dim if isinstance(input_dim, tuple) else (input_dim,))
        super().__init__(x, _chain(x, layers), name=name)


def _chain(x, layers):
    """Each layer called on the last one's output; a layer that returns several tensors is an error."""
    h = x
    for i, layer in enumerate(layers, start=1):
        h = layer(h)
        if isinstance(h, list):
            raise ValueError(f"Sequential: layer {i} ({functional.label(layer)}) returns {len(h)} tensors "
                             "(return_state=True: the output and the final states); a Sequential model passes one "
                             "tensor from layer to layer: build it with the functional API, sd.nn.Model(inputs, "
                             "[output, *states]), or set return_state=False")
    return h


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
        model = from_architecture(arch, path)
        reg = comp["regularizer"]
        regularizer = None if reg is None else {"l1": l1, "l2": l2}[reg["kind"]](reg["coefficient"])
        model.compile(loss=comp["loss"], optimizer=from_config(comp["optimizer"]), regularizer=regularizer,
                      backend=backend or comp["backend"], dtype=comp["dtype"], seed=comp["seed"],
                      loss_weights=comp.get("loss_weights"))
        model.train_step.load_state_dict(arrays)
        model.epoch = int(meta["epoch"])
        model.history = fitting.History(meta.get("history"))
    except checkpoint.CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise checkpoint.CheckpointError(f"{path} does not describe a model this symdl can build: {exc}") from exc
    return model



def from_architecture(arch: dict, path="the checkpoint") -> Model:
    """The (uncompiled) model ``Model.architecture()`` describes: a 0.2 ``Sequential`` (``layers``
    and ``input_dim``) or a functional model (its ``graph`` of calls replayed; a nested model is a
    layer with an ``architecture`` of its own)."""
    layers = []
    for cfg in arch["layers"]:
        cfg = dict(cfg)
        kind = cfg.pop("class", "Dense")  # the first version-1 files hold Dense layers only
        if kind == "Model":
            inner = from_architecture(cfg["architecture"], path)
            inner.name = cfg.get("name")
            layers.append(inner)
            continue
        act = cfg.get("activation")
        if act is not None and act not in functions.REGISTRY:
            raise checkpoint.CheckpointError(
                f"{path} uses the activation {act!r}, which is not registered: call "
                f"sd.activation({act!r}, formula) before loading")
        layers.append(LAYERS.get(kind)(**cfg))
    if "graph" not in arch:
        dim = arch["input_dim"]
        if arch.get("input_dtype"):
            return Sequential([functional.Input(shape=tuple(dim), dtype=arch["input_dtype"]), *layers])
        return Sequential(layers, input_dim=tuple(dim) if isinstance(dim, list) else dim)
    tensors, several = [], {}  # several: {position of a call's first output: all its outputs}
    for call in arch["graph"]:  # a functional model: replay its calls
        if "input" in call:
            tensors.append(functional.Input(shape=tuple(call["shape"]), dtype=call.get("dtype"), name=call["input"]))
        elif call.get("output"):  # output k of a call with several (return_state=True)
            tensors.append(several[call["inputs"][0]][call["output"]])
        else:
            ins = [tensors[i] for i in call["inputs"]]
            made = layers[call["layer"]](ins if call["many"] else ins[0])
            if isinstance(made, list):
                several[len(tensors)], made = made, made[0]
            tensors.append(made)
    ins = [tensors[i] for i in arch.get("inputs", [0])]
    outs = [tensors[i] for i in arch.get("outputs", [arch["output"]])]
    in_keys, out_keys = arch.get("input_keys"), arch.get("output_keys")
    inputs = dict(zip(in_keys, ins)) if in_keys else ins if len(ins) > 1 else ins[0]
    outputs = dict(zip(out_keys, outs)) if out_keys else outs if len(outs) > 1 else outs[0]
    return Model(inputs, outputs, name=arch.get("name"))
