"""symdl.sklearn: scikit-learn's conformance suite, number-for-number agreement with
scikit-learn's MLP, and the behaviour users rely on in pipelines and searches."""
from __future__ import annotations

import inspect
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sparse
import sympy as sp
from sklearn.base import clone
from sklearn.datasets import load_digits, make_multilabel_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.neural_network import MLPClassifier as SkClassifier
from sklearn.neural_network import MLPRegressor as SkRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import (
    check_sample_weight_equivalence_on_dense_data,
    check_sample_weight_equivalence_on_sparse_data,
    parametrize_with_checks,
)

import symdl as sd
import symdl.sklearn as sds

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

# Small networks on the NumPy reference backend: no Numba compilation, and few distinct
# architectures, so the whole conformance run takes seconds. Every other setting is the
# estimator's default (dtype float32 included).
CONFORMANCE = dict(hidden_layer_sizes=(10,), learning_rate_init=0.01, max_iter=100, random_state=0, backend="numpy")

if "expected_failed_checks" in inspect.signature(parametrize_with_checks).parameters:
    _xfail = {"expected_failed_checks": sds.expected_failed_checks}
else:  # scikit-learn < 1.6 reads the estimators' _more_tags()["_xfail_checks"]
    _xfail = {}


@parametrize_with_checks([sds.MLPClassifier(**CONFORMANCE), sds.MLPRegressor(**CONFORMANCE)], **_xfail)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_expected_failures_are_few_and_explained():
    failures = sds.expected_failed_checks(sds.MLPClassifier())
    assert set(failures) == {"check_sample_weight_equivalence_on_dense_data",
                             "check_sample_weight_equivalence_on_sparse_data"}
    assert all("float32" in reason for reason in failures.values())
    assert sds.expected_failed_checks(sds.MLPRegressor(dtype="float64")) == {}


@pytest.mark.parametrize("Estimator", [sds.MLPClassifier, sds.MLPRegressor])
@pytest.mark.parametrize("check", [check_sample_weight_equivalence_on_dense_data,
                                   check_sample_weight_equivalence_on_sparse_data])
def test_sample_weight_equivalence_holds_in_float64(Estimator, check):
    # The two checks listed as expected failures in float32 pass in float64.
    est = Estimator(**{**CONFORMANCE, "dtype": "float64"})
    check(Estimator.__name__, est)


# --------------------------------------------------------------------------- differential


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


def _fit_both(Sk, Ours, X, y, sample_weight=None, backend="numpy", **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        theirs = Sk(**params).fit(X, y, sample_weight=sample_weight)
        ours = Ours(backend=backend, dtype="float64", **params).fit(X, y, sample_weight=sample_weight)
    return theirs, ours


def _assert_same_training(theirs, ours, tol=1e-9):
    assert ours.n_iter_ == theirs.n_iter_
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=0, atol=tol)
    for a, b in zip(ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_sgd_loss_curve_matches_sklearn_from_copied_weights(digits, backend):
    """The issue's differential test: same starting weights (copied in), no shuffling, plain SGD."""
    X, y = digits
    X, y = X[:600], y[:600]
    params = dict(hidden_layer_sizes=(16,), solver="sgd", momentum=0.0, nesterovs_momentum=False, shuffle=False,
                  learning_rate_init=0.1, alpha=1e-3, batch_size=128, max_iter=1, warm_start=True, random_state=0,
                  tol=0.0)
    theirs, ours = _fit_both(SkClassifier, sds.MLPClassifier, X, y, backend=backend, **params)
    rng = np.random.default_rng(7)  # weights neither estimator drew
    for est in (theirs, ours):
        est.coefs_ = [rng.normal(scale=0.3, size=c.shape) for c in theirs.coefs_]
        est.intercepts_ = [rng.normal(scale=0.1, size=b.shape) for b in theirs.intercepts_]
        rng = np.random.default_rng(7)
    for est in (theirs, ours):
        est.set_params(max_iter=6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
    assert len(ours.loss_curve_) == 7
    _assert_same_training(theirs, ours, tol=1e-9)  # the issue asks for 1e-6; measured ~1e-15


DIFFERENTIAL = {
    "adam-tanh-shuffled": dict(solver="adam", activation="tanh"),
    "nesterov": dict(solver="sgd", learning_rate_init=0.05),
    "invscaling": dict(solver="sgd", learning_rate="invscaling", nesterovs_momentum=False, learning_rate_init=0.2),
    "adaptive": dict(solver="sgd", learning_rate="adaptive", tol=0.5, n_iter_no_change=1, learning_rate_init=0.05),
    "logistic-binary": dict(solver="adam", activation="logistic", target="binary"),
    "early-stopping": dict(solver="adam", early_stopping=True, validation_fraction=0.2),
    "stop-on-tol": dict(solver="adam", tol=0.3, n_iter_no_change=2, max_iter=30),
    "sample-weight": dict(solver="adam", target="weighted"),
    "identity-minibatch": dict(solver="adam", activation="identity", batch_size=50),
}


@pytest.mark.parametrize("case", list(DIFFERENTIAL))
def test_classifier_training_matches_sklearn(digits, case):
    params = dict(hidden_layer_sizes=(12,), max_iter=6, random_state=0, alpha=1e-3)
    params.update(DIFFERENTIAL[case])
    target = params.pop("target", None)
    X, y = digits[0][:500], digits[1][:500]
    sample_weight = None
    if target == "binary":
        y = np.where(y % 2 == 0, "even", "odd")
    if target == "weighted":
        sample_weight = np.random.default_rng(0).uniform(0, 3, len(y))
    theirs, ours = _fit_both(SkClassifier, sds.MLPClassifier, X, y, sample_weight=sample_weight, **params)
    _assert_same_training(theirs, ours)
    if params.get("early_stopping"):
        np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_)
    assert np.array_equal(ours.predict(X), theirs.predict(X))
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-9)


def test_multilabel_and_multioutput_regression_match_sklearn():
    X, Y = make_multilabel_classification(300, 10, n_classes=4, random_state=0)
    params = dict(hidden_layer_sizes=(8,), max_iter=5, random_state=0, batch_size=64)
    theirs, ours = _fit_both(SkClassifier, sds.MLPClassifier, X, Y, **params)
    _assert_same_training(theirs, ours)
    assert ours.predict(X).shape == Y.shape and np.array_equal(ours.predict(X), theirs.predict(X))
    T = np.c_[X[:, 0] - X[:, 1], X[:, 2] * 0.5]
    # scikit-learn reports the squared error averaged over outputs but steps along the sum's gradient.
    theirs, ours = _fit_both(SkRegressor, sds.MLPRegressor, X, T, solver="sgd", learning_rate_init=1e-3, **params)
    _assert_same_training(theirs, ours)
    assert ours.predict(X).shape == (300, 2)


# --------------------------------------------------------------------------- behaviour


def test_string_labels_probabilities_and_score():
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X)[:400]
    labels = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])[y[:400]]
    clf = sds.MLPClassifier((16,), max_iter=40, learning_rate_init=0.01, random_state=0, backend="numpy")
    clf.fit(X, labels)
    assert list(clf.classes_) == sorted(set(labels))
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert set(clf.predict(X)) <= set(labels) and clf.score(X, labels) > 0.9
    np.testing.assert_allclose(clf.predict_log_proba(X[:5]), np.log(proba[:5]))
    assert clf.n_features_in_ == 64 and len(clf.loss_curve_) == clf.n_iter_ and clf.best_loss_ == min(clf.loss_curve_)


def test_bad_input_raises_value_error():
    clf = sds.MLPClassifier((4,), max_iter=2, backend="numpy")
    X = np.ones((5, 2))
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clf.fit(X, [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="activation"):
        sds.MLPClassifier(activation="swish2").fit(np.ones((4, 2)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="solver"):
        sds.MLPClassifier(solver="lbfgs").fit(np.ones((4, 2)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        sds.MLPRegressor(hidden_layer_sizes=(4, 0)).fit(np.ones((4, 2)), np.ones(4))


def test_one_sample_and_binary_targets():
    clf = sds.MLPClassifier((3,), max_iter=3, backend="numpy", random_state=0).fit([[1.0, 2.0]], ["a"])
    assert clf.predict([[0.0, 0.0]]).tolist() == ["a"]
    clf = sds.MLPClassifier((3,), max_iter=3, backend="numpy", random_state=0).fit([[0.0], [1.0]], [True, False])
    assert clf.coefs_[-1].shape == (3, 1) and clf.out_activation_ == "logistic"
    assert clf.predict_proba([[0.5]]).shape == (1, 2)


def test_partial_fit_needs_classes_first_then_continues():
    X, y = load_digits(return_X_y=True)
    X = X[:300] / 16
    clf = sds.MLPClassifier((8,), random_state=0, backend="numpy")
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X, y[:300])
    clf.partial_fit(X[:150], y[:150], classes=np.arange(10))
    assert list(clf.classes_) == list(range(10)) and clf.n_iter_ == 1
    losses = [clf.loss_]
    for _ in range(5):
        clf.partial_fit(X, y[:300])
        losses.append(clf.loss_)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="classes not in"):
        sds.MLPClassifier((8,), backend="numpy").partial_fit(X[:10], np.full(10, 12), classes=[0, 1])


def test_partial_fit_continues_the_optimizer_like_sklearn(digits):
    X, y = digits[0][:300], digits[1][:300]
    ours = sds.MLPClassifier((8,), random_state=0, backend="numpy", dtype="float64")
    theirs = SkClassifier((8,), random_state=0)
    for _ in range(3):
        for est in (ours, theirs):
            est.partial_fit(X, y, classes=np.arange(10))
    np.testing.assert_allclose(ours.loss_, theirs.loss_, rtol=0, atol=1e-9)


def test_clone_and_pickle_hold_weights_not_compiled_code(digits):
    X, y = digits[0][:300], digits[1][:300]
    clf = sds.MLPClassifier((8,), max_iter=5, random_state=0, backend="numpy").fit(X, y)
    blob = pickle.dumps(clf)
    for marker in (b"numba", b"TrainStep", b"Runner", b"sympy"):
        assert marker not in blob
    sds.clear_pool()  # the copy must rebuild its step from the compile cache
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.predict_proba(X), clf.predict_proba(X))
    again.partial_fit(X, y)
    clf.partial_fit(X, y)
    np.testing.assert_array_equal(again.coefs_[0], clf.coefs_[0])  # optimizer state travelled too
    fresh = clone(clf)
    assert not hasattr(fresh, "coefs_") and fresh.get_params() == clf.get_params()


def test_pipeline_grid_search_and_cross_validation(digits):
    X, y = digits[0][:400], digits[1][:400]
    pipe = make_pipeline(StandardScaler(), sds.MLPClassifier((16,), max_iter=30, learning_rate_init=0.01, random_state=0,
                                                         backend="numpy"))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.8
    search = GridSearchCV(sds.MLPClassifier((16,), max_iter=15, random_state=0, backend="numpy"),
                          {"alpha": [1e-4, 1e-2], "learning_rate_init": [1e-3, 1e-2]}, cv=2)
    search.fit(X, y)
    assert search.best_params_["learning_rate_init"] == 1e-2
    text = search.best_estimator_.formulas()
    assert "∂L/∂W1 = x.T*δ1 + 2*W1⊙sum(reg)" in text and "logsumexp" in text
    assert r"\frac{\partial L}{\partial W_{1}}" in search.best_estimator_.formulas(latex=True)


def test_regressor_fits_two_tanh_layers():
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (300, 2))
    t = np.sin(X[:, 0]) + 0.5 * X[:, 1]
    reg = sds.MLPRegressor(hidden_layer_sizes=(16, 16), activation="tanh", learning_rate_init=0.01, max_iter=150,
                           random_state=0, backend="numpy").fit(X, t)
    assert reg.score(X, t) > 0.95 and reg.predict(X).shape == (300,)
    assert [c.shape for c in reg.coefs_] == [(2, 16), (16, 16), (16, 1)] and reg.n_layers_ == 4


def test_symdl_activations_l1_and_sparse_input(digits):
    X, y = digits[0][:300], digits[1][:300]
    sd.activation("sqplus", lambda t: (t + sp.sqrt(t**2 + 4)) / 2)
    params = dict(hidden_layer_sizes=(8,), max_iter=4, random_state=0, backend="numpy", dtype="float64")
    custom = sds.MLPClassifier(activation="sqplus", **params).fit(X, y)
    assert "sqplus" in custom.formulas()
    h = X @ custom.coefs_[0] + custom.intercepts_[0]
    logits = (h + np.sqrt(h**2 + 4)) / 2 @ custom.coefs_[1] + custom.intercepts_[1]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(custom.predict_proba(X), expected / expected.sum(1, keepdims=True), atol=1e-12)
    gelu = sds.MLPClassifier(activation="gelu", **params).fit(X, y)
    assert np.isfinite(gelu.predict_proba(X)).all()
    # l1 adds l1 * Σ|W| / Σw to the batch loss: a larger first loss, and sign(W) in the gradient.
    plain = sds.MLPClassifier(**params).fit(X, y)
    lasso = sds.MLPClassifier(l1=0.5, **params).fit(X, y)
    assert lasso.loss_curve_[0] > plain.loss_curve_[0]
    assert "sign(W1)" in lasso.formulas()
    assert sum(np.abs(c).sum() for c in lasso.coefs_) < sum(np.abs(c).sum() for c in plain.coefs_)
    dense = sds.MLPClassifier(**params).fit(X, y)
    sparse_fit = sds.MLPClassifier(**params).fit(sparse.csr_matrix(X), y)
    np.testing.assert_allclose(sparse_fit.loss_curve_, dense.loss_curve_, rtol=1e-12)


def test_warm_start_keeps_weights_and_checks_shapes(digits):
    X, y = digits[0][:200], digits[1][:200]
    clf = sds.MLPClassifier((8,), max_iter=3, warm_start=True, random_state=0, backend="numpy").fit(X, y)
    first = [c.copy() for c in clf.coefs_]
    clf.fit(X, y)
    assert len(clf.loss_curve_) == 6 and not np.array_equal(first[0], clf.coefs_[0])
    with pytest.raises(ValueError, match="warm_start"):
        clf.set_params(hidden_layer_sizes=(9,)).fit(X, y)


@pytest.mark.slow
def test_sklearn_example_runs():
    env = dict(os.environ, SYMDL_QUICK="1")
    out = subprocess.run([sys.executable, "examples/sklearn_pipeline.py"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "best parameters" in out.stdout and "∂L/∂W1" in out.stdout and "sine regression R²" in out.stdout


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's overflow warnings on the way to NaN
def test_divergence_is_reported_like_sklearn():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 3))
    t = X @ np.array([1.0, 2.0, 3.0]) * 1e6
    reg = sds.MLPRegressor((8,), solver="sgd", learning_rate_init=1.0, max_iter=50, backend="numpy", random_state=0)
    with pytest.raises(ValueError, match="non-finite parameter weights"):
        reg.fit(X, t)
