"""symdl's scikit-learn estimators in a pipeline, cross-validation and a grid search (no download).

``symdl.sklearn.MLPClassifier`` / ``MLPRegressor`` take scikit-learn's parameters and train
the same networks with symdl's compiled step; ``formulas()`` prints their derived gradients.
"""
import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import symdl as sd
import symdl.sklearn as sds
from _common import QUICK, epochs

warnings.simplefilter("ignore", ConvergenceWarning)  # short runs on purpose
# The quick mode (SYMDL_QUICK=1, used by the tests) trains a few epochs on the NumPy
# reference backend, which needs no Numba compilation.
BACKEND = "numpy" if QUICK else "cpu"

X, y = load_digits(return_X_y=True)
Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)

# 1. A pipeline, cross-validated.
clf = make_pipeline(StandardScaler(), sds.MLPClassifier(hidden_layer_sizes=(128,), max_iter=epochs(50, 3),
                                                        random_state=0, backend=BACKEND))
scores = cross_val_score(clf, Xtr, ytr, cv=3 if QUICK else 5)
print(f"cross-validated accuracy: {scores.mean():.4f} ± {scores.std():.4f}")

# 2. A grid search: alpha and the learning rate are runtime values of one compiled step,
#    so the four candidates (and every fold) share it.
search = GridSearchCV(
    make_pipeline(StandardScaler(), sds.MLPClassifier((64,), max_iter=epochs(30, 3), random_state=0,
                                                      backend=BACKEND)),
    {"mlpclassifier__alpha": [1e-4, 1e-3], "mlpclassifier__learning_rate_init": [1e-3, 1e-2]},
    cv=3,
)
search.fit(Xtr, ytr)
print(f"best parameters: {search.best_params_}")
print(f"held-out accuracy of the best pipeline: {search.score(Xte, yte):.4f}")
best = search.best_estimator_[-1]
print(f"loss curve: {np.round(best.loss_curve_[:5], 4).tolist()} ... ({best.n_iter_} epochs)")
print("The gradients it was trained with, derived by symdl:")
print(best.formulas())

# 3. Regression with two hidden tanh layers.
Xs, ts = sd.datasets.sine(500, seed=0)
reg = sds.MLPRegressor(hidden_layer_sizes=(64, 64), activation="tanh", learning_rate_init=1e-2,
                       max_iter=epochs(300, 20), random_state=0, backend=BACKEND).fit(Xs, ts.ravel())
print(f"sine regression R²: {reg.score(Xs, ts.ravel()):.4f}")
