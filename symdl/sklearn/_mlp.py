"""``MLPClassifier`` and ``MLPRegressor``: scikit-learn's estimators, trained by symdl.

The training loop is scikit-learn's own (``sklearn/neural_network/_multilayer_perceptron.py``)
step for step: the same initialisation and random-number use, the same batches, losses,
update rules, stopping rules and fitted attributes. Only the batch step differs: one call
into symdl's compiled step (forward, backward and update) instead of NumPy code.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import scipy.sparse as sparse
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state, column_or_1d, gen_batches
from sklearn.utils.multiclass import type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted

import symdl as sd

from ._network import NetworkSpec, borrowed_step, build_graph, forward, hidden_activation, reported_loss

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - scikit-learn 1.4 / 1.5
    def _validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)

_BACKENDS = ("numpy", "cpu", "cuda")
_DTYPES = ("float32", "float64")


_FLOAT32_SAMPLE_WEIGHT = ("float32 training (the default dtype) agrees to ~1e-6, not the check's rtol=1e-7; "
                          "passes with dtype='float64' or None")


def expected_failed_checks(estimator) -> dict:
    """Checks of ``sklearn.utils.estimator_checks`` this estimator is known to fail, each with why.

    Pass it to ``parametrize_with_checks(..., expected_failed_checks=expected_failed_checks)``.
    With ``dtype="float64"`` (or None for float64 data) the list is empty.
    """
    if getattr(estimator, "dtype", None) != "float32":
        return {}
    return {"check_sample_weight_equivalence_on_dense_data": _FLOAT32_SAMPLE_WEIGHT,
            "check_sample_weight_equivalence_on_sparse_data": _FLOAT32_SAMPLE_WEIGHT}


def _shuffled(indices, random_state):
    """``sklearn.utils.shuffle(indices, random_state=...)``: the same draw, without its validation cost."""
    order = np.arange(len(indices))
    random_state.shuffle(order)
    return indices[order]


class _BaseMLP(BaseEstimator):
    """Shared by both estimators: parameters, validation, the training loop, pickling."""

    _output = None  # set per estimator: the output link for the training targets

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate="constant", learning_rate_init=0.001, power_t=0.5,
                 max_iter=200, shuffle=True, random_state=None, tol=1e-4, verbose=False, warm_start=False,
                 momentum=0.9, nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, l1=0.0, backend="cpu",
                 dtype="float32"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.l1 = l1
        self.backend = backend
        self.dtype = dtype

    # ------------------------------------------------------------------ validation

    def _hidden_sizes(self) -> list:
        sizes = self.hidden_layer_sizes
        sizes = list(sizes) if hasattr(sizes, "__iter__") else [sizes]
        if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ValueError(f"hidden_layer_sizes must be positive integers, got {self.hidden_layer_sizes!r}")
        return [int(s) for s in sizes]

    def _check_params(self) -> None:
        def number(name, low, high=np.inf, low_open=False, high_open=False):
            v = getattr(self, name)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and not np.isnan(v)
            ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
            if not ok:
                lo, hi = "(" if low_open else "[", ")" if high_open else "]"
                raise ValueError(f"{name} must be a number in {lo}{low}, {high}{hi}, got {v!r}")

        def integer(name, low):
            v = getattr(self, name)
            if not (isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low):
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

        def choice(name, options):
            v = getattr(self, name)
            if not (isinstance(v, str) and v in options):
                raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {v!r}")

        self._hidden_sizes()
        hidden_activation(self.activation)  # raises on unknown names
        choice("solver", ("adam", "sgd"))
        choice("learning_rate", ("constant", "invscaling", "adaptive"))
        choice("backend", _BACKENDS)
        if self.dtype is not None:
            choice("dtype", _DTYPES)
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, numbers.Integral)
                                              and not isinstance(self.batch_size, bool) and self.batch_size >= 1)):
            raise ValueError(f"batch_size must be 'auto' or an integer >= 1, got {self.batch_size!r}")
        number("alpha", 0)
        number("l1", 0)
        number("learning_rate_init", 0, low_open=True)
        number("power_t", 0)
        integer("max_iter", 1)
        number("tol", 0)
        number("momentum", 0, 1)
        number("validation_fraction", 0, 1, high_open=True)
        number("beta_1", 0, 1, high_open=True)
        number("beta_2", 0, 1, high_open=True)
        number("epsilon", 0, low_open=True)
        if self.n_iter_no_change != np.inf:
            integer("n_iter_no_change", 1)
        for flag in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping"):
            if not isinstance(getattr(self, flag), (bool, np.bool_)):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    def _check_sample_weight(self, sample_weight, n_samples):
        if sample_weight is None:
            return None
        if isinstance(sample_weight, numbers.Number):
            return np.full(n_samples, float(sample_weight))
        w = np.asarray(sample_weight, dtype=np.float64)
        if w.ndim != 1 or w.shape[0] != n_samples:
            raise ValueError(f"sample_weight.shape == {w.shape}, expected {(n_samples,)}!")
        if not np.isfinite(w).all():
            raise ValueError("sample_weight contains NaN or infinity")
        if (w < 0).any():
            raise ValueError("sample_weight must be non-negative")
        if not w.any():
            raise ValueError("Sample weights must contain at least one non-zero number.")
        return w

    def _train_dtype(self, X) -> np.dtype:
        return X.dtype if self.dtype is None else np.dtype(self.dtype)

    # ------------------------------------------------------------------ the network

    def _spec(self, layer_units, dtype) -> NetworkSpec:
        act = self.activation
        return NetworkSpec(tuple(layer_units), act if isinstance(act, str) else act.__name__, self.out_activation_,
                           self.solver, nesterov=bool(self.solver == "sgd" and self.nesterovs_momentum),
                           l1=bool(self.l1 > 0), backend=self.backend, dtype=np.dtype(dtype).name)

    def _init_coef(self, fan_in, fan_out, dtype):
        # scikit-learn's Glorot initialisation, drawing from the same random state in the same order.
        factor = 2.0 if self.activation == "logistic" else 6.0
        bound = np.sqrt(factor / (fan_in + fan_out))
        coef = self._random_state.uniform(-bound, bound, (fan_in, fan_out))
        intercept = self._random_state.uniform(-bound, bound, fan_out)
        return coef.astype(dtype, copy=False), intercept.astype(dtype, copy=False)

    def _initialize(self, Y, layer_units, dtype):
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = Y.shape[1]
        self.n_layers_ = len(layer_units)
        self.out_activation_ = self._output_activation()
        self.coefs_, self.intercepts_ = [], []
        for fan_in, fan_out in zip(layer_units[:-1], layer_units[1:]):
            coef, intercept = self._init_coef(fan_in, fan_out, dtype)
            self.coefs_.append(coef)
            self.intercepts_.append(intercept)
        self._best_coefs = [c.copy() for c in self.coefs_]
        self._best_intercepts = [i.copy() for i in self.intercepts_]
        self.loss_curve_ = []
        self._no_improvement_count = 0
        if self.early_stopping:
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
        else:
            self.best_loss_ = np.inf
            self.validation_scores_ = None
            self.best_validation_score_ = None

    def formulas(self, latex: bool = False) -> str:
        """Every gradient of the fitted network's training loss, derived: the textbook backward pass.

        Inputs of the printed loss: ``x`` the batch, ``y`` the targets (one-hot for
        classes), ``sw`` the sample weights divided by their sum over the batch, and
        ``reg`` holding ``alpha / (2 Σ sw)`` in its first row (``l1c`` likewise for ``l1``).
        """
        check_is_fitted(self)
        spec = self._spec([self.n_features_in_] + self._layer_sizes()[1:], self.coefs_[0].dtype)
        loss, params, _ = build_graph(spec)
        e = sd.explain(loss, params)
        return e.latex if latex else str(e)

    def _layer_sizes(self) -> list:
        return [self.coefs_[0].shape[0]] + [c.shape[1] for c in self.coefs_]

    # ------------------------------------------------------------------ fitting

    def _fit(self, X, y, sample_weight=None, incremental=False):
        self._check_params()
        hidden = self._hidden_sizes()
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, Y = self._validate_input(X, y, incremental, reset=first_pass)
        n_samples, n_features = X.shape
        sample_weight = self._check_sample_weight(sample_weight, n_samples)
        layer_units = [n_features] + hidden + [Y.shape[1]]
        self._random_state = check_random_state(self.random_state)
        dtype = self._train_dtype(X)
        if first_pass:
            self._initialize(Y, layer_units, dtype)
        elif self._layer_sizes() != layer_units:
            raise ValueError(f"the fitted network has layer sizes {self._layer_sizes()}, but these data and "
                             f"hidden_layer_sizes need {layer_units}; fit without warm_start to start afresh")
        self.n_outputs_ = Y.shape[1]
        self._fit_stochastic(X, Y, sample_weight, layer_units, dtype, incremental)
        if not all(np.isfinite(w).all() for w in self.coefs_ + self.intercepts_):
            raise ValueError("Solver produced non-finite parameter weights. The input data may contain large "
                             "values and need to be preprocessed.")
        return self

    def _fresh_optimizer_state(self):
        return {"t": 0, "lr": float(self.learning_rate_init), "state": None}

    def _fit_stochastic(self, X, Y, sample_weight, layer_units, dtype, incremental):
        if not incremental or getattr(self, "_optimizer_state", None) is None:
            self._optimizer_state = self._fresh_optimizer_state()
        if self.early_stopping and incremental:
            raise ValueError("partial_fit does not support early_stopping=True")
        early_stopping = self.early_stopping
        if early_stopping:
            stratify = Y if (is_classifier(self) and self.n_outputs_ == 1) else None
            arrays = (X, Y) if sample_weight is None else (X, Y, sample_weight)
            split = train_test_split(*arrays, random_state=self._random_state, test_size=self.validation_fraction,
                                     stratify=stratify)
            X_train, X_val, Y_train, Y_val = split[:4]
            sw_train, sw_val = (split[4], split[5]) if sample_weight is not None else (None, None)
            if X_val.shape[0] < 2:
                raise ValueError("The validation set is too small. Increase 'validation_fraction' or the size of "
                                 "your dataset.")
            y_val = self._decode(Y_val)
        else:
            X_train, Y_train, sw_train = X, Y, sample_weight
            X_val = y_val = sw_val = None

        n_samples = X_train.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n_samples)
        else:
            if self.batch_size > n_samples:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. It is going to be clipped")
            batch_size = int(np.clip(self.batch_size, 1, n_samples))

        dense = not sparse.issparse(X_train)
        X_train = np.ascontiguousarray(X_train, dtype=dtype) if dense else X_train.tocsr().astype(dtype)
        Y_train = np.ascontiguousarray(Y_train, dtype=dtype)
        reg = np.zeros((batch_size, 1), dtype=dtype)
        l1c = np.zeros((batch_size, 1), dtype=dtype)
        spec = self._spec(layer_units, dtype)
        opt = self._optimizer_state
        sample_idx = np.arange(n_samples, dtype=int)

        with borrowed_step(spec) as step:
            self._load_step(step, opt)
            self._set_hyper(step.optimizer, opt["lr"])
            try:
                self.n_iter_ = 0
                for _ in range(self.max_iter):
                    if self.shuffle:
                        sample_idx = _shuffled(sample_idx, self._random_state)
                    accumulated_loss = 0.0
                    for batch in gen_batches(n_samples, batch_size):
                        idx = sample_idx[batch] if self.shuffle else batch
                        xb = X_train[idx] if dense else X_train[idx].toarray()
                        yb = Y_train[idx]
                        nb = batch.stop - batch.start
                        if sw_train is None:
                            sw_sum = float(nb)
                            swb = np.full((nb, 1), 1.0 / nb, dtype=dtype)
                        else:
                            wb = sw_train[idx]
                            sw_sum = float(wb.sum())
                            if sw_sum == 0:  # nothing to learn from this batch: the weighted gradient is 0
                                continue
                            swb = (wb / sw_sum).astype(dtype).reshape(-1, 1)
                        reg[0, 0] = 0.5 * self.alpha / sw_sum
                        arrays = {"x": np.ascontiguousarray(xb), "y": yb, "sw": swb, "reg": reg[:nb]}
                        if spec.l1:
                            l1c[0, 0] = self.l1 / sw_sum
                            arrays["l1c"] = l1c[:nb]
                        batch_loss = reported_loss(spec, step, step.step(check_finite=False, **arrays))
                        accumulated_loss += batch_loss * nb
                    self.n_iter_ += 1
                    self.loss_ = accumulated_loss / X_train.shape[0]
                    self.t_ += n_samples
                    self.loss_curve_.append(self.loss_)
                    if self.verbose:
                        print("Iteration %d, loss = %.8f" % (self.n_iter_, self.loss_))
                    if np.isnan(self.loss_):
                        break  # diverged: the weights are NaN too, and the check after training says so
                    if early_stopping:
                        self._read_step(step, opt)  # the validation score reads the weights
                    self._update_no_improvement_count(early_stopping, X_val, y_val, sw_val)
                    if self.solver == "sgd" and self.learning_rate == "invscaling":
                        opt["lr"] = float(self.learning_rate_init) / (self.t_ + 1) ** self.power_t
                        step.optimizer.lr = opt["lr"]
                    if self._no_improvement_count > self.n_iter_no_change:
                        if early_stopping:
                            msg = ("Validation score did not improve more than tol=%f for %d consecutive epochs."
                                   % (self.tol, self.n_iter_no_change))
                        else:
                            msg = ("Training loss did not improve more than tol=%f for %d consecutive epochs."
                                   % (self.tol, self.n_iter_no_change))
                        if self._trigger_stopping(msg, opt):
                            break
                        step.optimizer.lr = opt["lr"]
                        self._no_improvement_count = 0
                    if incremental:
                        break
                    if self.n_iter_ == self.max_iter:
                        warnings.warn("Stochastic Optimizer: Maximum iterations (%d) reached and the optimization "
                                      "hasn't converged yet." % self.max_iter, ConvergenceWarning)
            except KeyboardInterrupt:
                warnings.warn("Training interrupted by user.")
            finally:
                self._read_step(step, opt)
        if early_stopping:
            self.coefs_ = self._best_coefs
            self.intercepts_ = self._best_intercepts

    def _trigger_stopping(self, msg, opt) -> bool:
        if self.solver != "sgd" or self.learning_rate != "adaptive":
            if self.verbose:
                print(msg + " Stopping.")
            return True
        if opt["lr"] <= 1e-6:
            if self.verbose:
                print(msg + " Learning rate too small. Stopping.")
            return True
        opt["lr"] /= 5.0
        if self.verbose:
            print(msg + " Setting learning rate to %f" % opt["lr"])
        return False

    def _set_hyper(self, optimizer, lr):
        optimizer.lr = lr
        if self.solver == "adam":
            optimizer.beta1, optimizer.beta2, optimizer.eps = self.beta_1, self.beta_2, self.epsilon
        else:
            optimizer.momentum = self.momentum

    def _load_step(self, step, opt):
        """Write this estimator's weights and optimizer state into a borrowed step."""
        arrays = {"t": np.array(opt["t"])}
        for i, (W, b) in enumerate(zip(self.coefs_, self.intercepts_), start=1):
            arrays[f"param/W{i}"], arrays[f"param/b{i}"] = W, b
        state = opt["state"]
        for name, states in step.state.items():
            for k, buf in states.items():
                arrays[f"state/{name}/{k}"] = state[f"state/{name}/{k}"] if state is not None else np.zeros_like(buf)
        step.load_state_dict(arrays)

    def _read_step(self, step, opt):
        arrays = step.state_dict()
        self.coefs_ = [arrays[f"param/W{i}"] for i in range(1, len(self.coefs_) + 1)]
        self.intercepts_ = [arrays[f"param/b{i}"] for i in range(1, len(self.intercepts_) + 1)]
        opt["t"] = int(arrays["t"])
        opt["state"] = {k: v for k, v in arrays.items() if k.startswith("state/")}

    def _update_no_improvement_count(self, early_stopping, X_val, y_val, sw_val):
        if early_stopping:
            score = self._score_unchecked(X_val, y_val, sw_val)
            self.validation_scores_.append(score)
            if self.verbose:
                print("Validation score: %f" % self.validation_scores_[-1])
            last = self.validation_scores_[-1]
            if last < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if last > self.best_validation_score_:
                self.best_validation_score_ = last
                self._best_coefs = [c.copy() for c in self.coefs_]
                self._best_intercepts = [i.copy() for i in self.intercepts_]
        else:
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    def _score_unchecked(self, X, y, sample_weight):
        pred = self._predict_checked(X)
        if np.issubdtype(np.asarray(pred).dtype, np.floating) and not np.isfinite(pred).all():
            return np.nan
        return self._score_function(y, pred, sample_weight=sample_weight)

    # ------------------------------------------------------------------ inference

    def _forward(self, X):
        """Validated ``X`` -> output-layer values (probabilities for classifiers), float64."""
        return forward(X, self.coefs_, self.intercepts_, self.activation, self.out_activation_)

    def _check_X(self, X):
        check_is_fitted(self)
        return _validate_data(self, X, accept_sparse=["csr", "csc"], reset=False, dtype=(np.float64, np.float32))

    def fit(self, X, y, sample_weight=None):
        """Fit the model to data matrix X and target(s) y (``sample_weight``: optional, per sample)."""
        return self._fit(X, y, sample_weight=sample_weight, incremental=False)

    # ------------------------------------------------------------------ pickling

    def __getstate__(self):
        # Configuration, weights and optimizer state: plain arrays. A compiled step is never
        # kept on an estimator (steps are borrowed from a per-process pool), and nothing
        # transient may slip in either.
        state = super().__getstate__()
        return {k: v for k, v in state.items() if not k.startswith("_step")}

    def __setstate__(self, state):
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {"_xfail_checks": expected_failed_checks(self)}


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier with scikit-learn's interface, trained by symdl.

    Parameters mean what they mean in ``sklearn.neural_network.MLPClassifier`` (solvers
    ``"adam"`` and ``"sgd"``; no ``"lbfgs"``), plus symdl's own:

    * ``activation``: ``"relu"``, ``"tanh"``, ``"logistic"``, ``"identity"``, or any symdl
      activation by name (``"gelu"``, ``"silu"``, one registered with ``sd.activation``);
    * ``l1``: an L1 penalty ``l1 · Σ|W| / Σ sample weights`` beside scikit-learn's ``alpha``;
    * ``backend``: ``"cpu"`` (Numba, the default), ``"numpy"`` (reference) or ``"cuda"``;
    * ``dtype``: ``"float32"`` (default, fastest), ``"float64"``, or None to follow ``X``
      as scikit-learn does.

    >>> from sklearn.datasets import load_iris
    >>> import symdl.sklearn as sds
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = sds.MLPClassifier((16,), learning_rate_init=0.01, max_iter=300, tol=1e-3, random_state=0,
    ...                         backend="numpy").fit(X, y)
    >>> clf.score(X, y) > 0.9, clf.predict_proba(X[:2]).shape
    (True, (2, 3))
    """

    def _output_activation(self):
        return "softmax" if self._label_binarizer.y_type_ == "multiclass" else "logistic"

    def _validate_input(self, X, y, incremental, reset):
        X, y = _validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True,
                              dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if (not hasattr(self, "classes_")) or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError("warm_start can only be used where `y` has the same classes as in the "
                                     f"previous call to fit. Previously got {self.classes_}, `y` has {classes}")
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` has {self.classes_}. "
                                 f"'y' has {classes}.")
        Y = self._label_binarizer.transform(y).astype(bool)
        return X, Y.reshape(-1, 1) if Y.ndim == 1 else Y

    def _decode(self, Y):
        return self._label_binarizer.inverse_transform(Y)

    _score_function = staticmethod(accuracy_score)

    def _predict_checked(self, X):
        proba = self._forward(X)
        if self.n_outputs_ == 1:
            proba = proba.ravel()
        return self._label_binarizer.inverse_transform(proba)

    def predict(self, X):
        """The predicted classes (or label indicators for multi-label targets)."""
        return self._predict_checked(self._check_X(X))

    def predict_proba(self, X):
        """Probability of each class, columns in the order of ``classes_``; rows sum to 1 (multi-class)."""
        proba = self._forward(self._check_X(X))
        if self.n_outputs_ == 1:
            proba = proba.ravel()
            return np.vstack([1 - proba, proba]).T
        return proba

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``."""
        proba = self.predict_proba(X)
        return np.log(proba, out=proba)

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over ``(X, y)``; ``classes`` (every label there will be) is required on the first call."""
        if getattr(self, "classes_", None) is None or not hasattr(self, "coefs_"):
            if classes is None and not type_of_target(y).startswith("multilabel"):
                raise ValueError("classes must be passed on the first call to partial_fit.")
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y if type_of_target(y).startswith("multilabel") else classes)
            self.classes_ = self._label_binarizer.classes_
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(f"`classes={classes!r}` is not the same as on last call to partial_fit, was: "
                             f"{self.classes_!r}")
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    def _more_tags(self):  # scikit-learn < 1.6
        return {**super()._more_tags(), "multilabel": True}


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor (half squared error) with scikit-learn's interface, trained by symdl.

    Parameters as for ``MLPClassifier``; ``y`` may have several columns (one output each).

    >>> import numpy as np, symdl.sklearn as sds
    >>> X = np.linspace(-2, 2, 200).reshape(-1, 1); t = np.sin(2 * X).ravel()
    >>> reg = sds.MLPRegressor((32,), activation="tanh", learning_rate_init=0.01, max_iter=500, tol=1e-3,
    ...                        random_state=0, backend="numpy").fit(X, t)
    >>> reg.score(X, t) > 0.95
    True
    """

    def _output_activation(self):
        return "identity"

    def _validate_input(self, X, y, incremental, reset):
        X, y = _validate_data(self, X, y, accept_sparse=["csr", "csc"], multi_output=True, y_numeric=True,
                              dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y.reshape(-1, 1) if y.ndim == 1 else y

    def _decode(self, Y):
        return Y.ravel() if Y.shape[1] == 1 else Y

    _score_function = staticmethod(r2_score)

    def _predict_checked(self, X):
        pred = self._forward(X)
        return pred.ravel() if pred.shape[1] == 1 else pred

    def predict(self, X):
        """The predicted values: shape (n,) for one output, (n, outputs) for several."""
        return self._predict_checked(self._check_X(X))

    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over ``(X, y)``, continuing from the current weights and optimizer state."""
        return self._fit(X, y, sample_weight=sample_weight, incremental=True)
