"""scikit-learn estimators trained by symdl: ``MLPClassifier`` and ``MLPRegressor``.

Drop-in replacements for ``sklearn.neural_network``'s estimators of the same names
(parameters, fitted attributes, stopping rules and numbers follow scikit-learn's), whose
batch steps run as symdl's compiled training step, and whose gradients you can read:

>>> from sklearn.datasets import load_iris
>>> from sklearn.pipeline import make_pipeline
>>> from sklearn.preprocessing import StandardScaler
>>> import symdl.sklearn as sds
>>> X, y = load_iris(return_X_y=True)
>>> clf = make_pipeline(StandardScaler(), sds.MLPClassifier((8,), max_iter=200, tol=1e-3, learning_rate_init=0.01,
...                                                         random_state=0, backend="numpy"))
>>> clf.fit(X, y).score(X, y) > 0.9
True
>>> print(clf[-1].formulas().splitlines()[-1])
  ∂L/∂b1 = sum_rows(δ1)

A pickled estimator holds its configuration, weights and optimizer state, never compiled
code: each process derives and compiles a network once (symdl's compile cache makes that
fast) and reuses the compiled step for every estimator of the same architecture.
"""
from ._mlp import MLPClassifier, MLPRegressor, expected_failed_checks
from ._network import ScikitAdam, ScikitNesterov, ScikitSGD, clear_pool

__all__ = ["MLPClassifier", "MLPRegressor", "ScikitAdam", "ScikitNesterov", "ScikitSGD", "clear_pool",
           "expected_failed_checks"]
