"""Beyond the gradient: Hessian-vector products, dense Hessians and Jacobians.

Every node a gradient contains has a vector-Jacobian rule, so a gradient is a graph like
any other and ``grad`` applies to it again (reverse over reverse). A Hessian-vector
product is the gradient of ``Σ_p sum(∂L/∂p ⊙ v_p)``:

    H·v = ∂/∂θ ⟨∇L(θ), v⟩

``hvp`` returns those expressions (printable, sharing every node with the gradient);
``hessian`` and ``jacobian`` compile them into a program whose directions are extra
leaves and call it once per basis vector: exact derivatives, no finite differences.

Dense results flatten the parameters *in the order given*, each one row-major (C order),
a vector parameter ``(k,)`` as its ``k`` entries: for ``[W1 (2, 3), b1 (3,)]`` column 0 is
``W1[0, 0]``, column 5 is ``W1[1, 2]`` and column 6 is ``b1[0]``.

>>> import numpy as np, symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 1)); V = sd.param("V", (2, 1))
>>> loss = sd.total(sd.hadamard(x @ W, x @ W)) / 2        # ½‖xW‖²: the Hessian is xᵀx
>>> print(sd.hvp(loss, [W], [V])[W])
x.T*(x*V)
>>> H = sd.hessian(loss, [W], backend="numpy")
>>> H(x=np.array([[1.0, 2.0], [3.0, 4.0]]), W=np.zeros((2, 1)))
array([[10., 14.],
       [14., 20.]])
"""
from __future__ import annotations

import numpy as np
import sympy as sp

from ..autodiff.vjp import grad
from ..backends.base import as_dtype
from ..graph.nodes import Input, MatrixExpr, Param, SumAll, VectorParam, hadamard, leaves, n as N, topological
from ..autodiff.jvp import check_directions, tangents
from .pipeline import compile_outputs
from .validate import check_arrays


def _check_wrt(wrt, what):
    wrt = list(wrt)
    if not wrt:
        raise ValueError(f"{what}: name at least one parameter")
    for p in wrt:
        if not isinstance(p, (Param, Input)):
            raise TypeError(f"{what} is taken with respect to parameters (sd.param) or inputs (sd.input), got {p!r}")
    if len(set(wrt)) != len(wrt):
        raise ValueError(f"{what}: a parameter is named twice")
    return wrt


def _directional(grads: dict, vectors: dict):
    """``Σ_p sum(grads[p] ⊙ vectors[p])``: the (1, 1) inner product ``⟨∇L, v⟩``."""
    total = None
    for p, v in vectors.items():
        term = SumAll(hadamard(grads[p], v))
        total = term if total is None else total + term
    return total


def _by_tangent(loss) -> bool:
    """Whether ``loss`` holds a node whose gradient node has no gradient rule but whose tangent is
    an ordinary node (a recurrence: ``hvp_by_tangent``): then ``H·v`` is reverse over forward."""
    return any(getattr(type(node), "hvp_by_tangent", False) for node in topological([loss]))


def hvp(loss, params, vectors) -> dict:
    """``{param: (H·v) for that param}``: the Hessian of ``loss`` times the directions.

    ``vectors`` holds one leaf per parameter, shaped like it (usually ``sd.param``s,
    passed at call time like any array). The result is the gradient of ``⟨∇L, v⟩``,
    so it shares every forward and gradient node with ``sd.grad(loss, params)``.

    Through a recurrent layer it is reverse over forward instead: the gradient of the loss's
    tangent ``L̇ = dL(θ + εv)/dε`` (``autodiff.jvp``), ``H·v = ∇_θ L̇``. A scan's tangent is a scan
    (the cell's ``sp.diff``), so no gradient of the backpropagation-through-time node is needed.

    >>> import symdl as sd
    >>> x = sd.input("x", 2); W = sd.param("W", (2, 3)); V = sd.param("V", (2, 3))
    >>> print(sd.hvp(sd.total(sd.tanh(x @ W)), [W], [V])[W])
    x.T*(-2*tanh(x*W)⊙(x*V)⊙(1 - tanh(x*W)**2))

    >>> from symdl.graph.nodes import sequence_input
    >>> from symdl.ops.recurrence import scan, simple_rnn_cell
    >>> x = sequence_input("x", (3, 2)); W = sd.param("W", (2, 1)); R = sd.param("R", (1, 1))
    >>> loss = sd.total(scan(simple_rnn_cell(), x @ W, R, None, 3))
    >>> hv = sd.hvp(loss, [W, R], [sd.param("V", (2, 1)), sd.param("Q", (1, 1))])
    >>> "simple_rnn_tangent_scan(x*V, R, " in str(hv[R])
    True
    """
    params = _check_wrt(params, "hvp")
    vectors = check_directions(params, vectors, "hvp")
    if _by_tangent(loss):
        rate = tangents([loss], dict(zip(params, vectors))).get(loss)
        if rate is not None:
            return grad(rate, params)
    g = grad(loss, params)
    return grad(_directional(g, dict(zip(params, vectors))), params)


def _direction_leaf(p, taken):
    name = f"v__{p.name}"
    while name in taken:
        name += "_"
    taken.add(name)
    if isinstance(p, Input):
        return Input(name, *p.shape)
    cls = VectorParam if isinstance(p, VectorParam) else Param
    return cls(name, *p.shape)


class _Dense:
    """Shared by ``Hessian`` and ``Jacobian``: one compiled program, called per basis vector."""

    def __init__(self, known, outputs, unit, wrt, backend, dtype):
        self.wrt, self.unit, self.backend = wrt, unit, backend
        self.dtype = as_dtype(dtype)
        self.runner = compile_outputs(outputs, backend, self.dtype)  # the one road: graph -> program -> runner
        self.program = self.runner.program
        unit_leaves = set(unit)
        self.inputs = [l for l in known if isinstance(l, Input) and l not in unit_leaves]
        self.params = [l for l in known if isinstance(l, Param) and l not in unit_leaves]

    @property
    def source(self) -> str:
        """The generated module (readable Python)."""
        return self.runner.source

    def _arrays(self, arrays):
        return check_arrays(arrays, self.inputs, self.params, self.dtype)

    def _columns(self, arrays, n_value, outputs):
        """One call per basis vector of the unit leaves (in order, each row-major): yields the
        flattened ``outputs`` of each call, one column of a Hessian or one row of a Jacobian."""
        zeros = {str(u.name): np.zeros(tuple(_size_shape(u, n_value)), self.dtype) for u in self.unit}
        for u in self.unit:
            z = zeros[str(u.name)]
            flat = z.reshape(-1)
            for k in range(flat.size):
                flat[k] = 1.0
                out = self.runner.run({**arrays, **zeros}, {}, n_value)
                yield np.concatenate([np.asarray(out[o], dtype=np.float64).reshape(-1) for o in outputs])
                flat[k] = 0.0


def _size_shape(leaf, n_value):
    return tuple(int(sp.sympify(d).xreplace({N: n_value})) for d in leaf.shape)


class Hessian(_Dense):
    """``H(**arrays) -> (P, P)`` ndarray; P counts the entries of ``wrt`` (see the module doc)."""

    def __init__(self, loss, wrt, backend="numpy", dtype="float64"):
        wrt = _check_wrt(wrt, "hessian")
        taken = {str(l.name) for l in leaves(loss)}
        self.directions = [_direction_leaf(p, taken) for p in wrt]
        hv = hvp(loss, wrt, self.directions)
        self.outputs = [f"hvp_{p.name}" for p in wrt]
        super().__init__(leaves(loss), {o: hv[p] for o, p in zip(self.outputs, wrt)}, self.directions, wrt,
                         backend, dtype)

    def __call__(self, **arrays) -> np.ndarray:
        arrays, n_value = self._arrays(arrays)
        cols = list(self._columns(arrays, n_value, self.outputs))
        return np.stack(cols, axis=1)


class Jacobian(_Dense):
    """``J(**arrays) -> (outputs.size, P)`` ndarray: row ``r`` is the gradient of output entry ``r``
    (row-major over ``outputs``), columns as in the module doc."""

    def __init__(self, outputs, wrt, backend="numpy", dtype="float64"):
        wrt = _check_wrt(wrt, "jacobian")
        if not isinstance(outputs, MatrixExpr):
            raise TypeError(f"jacobian: outputs must be a symdl matrix expression, got {type(outputs).__name__}")
        known = leaves(outputs)
        taken = {str(l.name) for l in known}
        name = "u__"
        while name in taken:
            name += "_"
        rows = outputs.shape[0]
        self.cotangent = Input(name, *outputs.shape) if sp.sympify(rows).has(N) else Param(name, *outputs.shape)
        vjp = grad(SumAll(hadamard(outputs, self.cotangent)), wrt)
        self.outputs = [f"vjp_{p.name}" for p in wrt]
        super().__init__(known, {o: vjp[p] for o, p in zip(self.outputs, wrt)}, [self.cotangent], wrt,
                         backend, dtype)

    def __call__(self, **arrays) -> np.ndarray:
        arrays, n_value = self._arrays(arrays)
        return np.stack(list(self._columns(arrays, n_value, self.outputs)), axis=0)


def hessian(loss, params, *, backend: str = "numpy", dtype: str = "float64") -> Hessian:
    """Compile the dense Hessian of ``loss``: ``H(**arrays)`` is a ``(P, P)`` ndarray.

    Built from the Hessian-vector product program (``hvp``), called once per basis
    vector: column ``k`` is ``H·e_k``. Parameters flatten in the order given, each
    row-major; a vector parameter contributes its ``k`` entries.

    >>> import numpy as np, symdl as sd
    >>> W = sd.param("W", (1, 2))
    >>> H = sd.hessian(sd.total(sd.tanh(W)), [W])
    >>> np.round(H(W=np.array([[0.0, 1.0]])), 4) + 0.0   # + 0.0: no negative zeros
    array([[ 0.    ,  0.    ],
           [ 0.    , -0.6397]])
    """
    return Hessian(loss, params, backend=backend, dtype=dtype)


def jacobian(outputs, wrt, *, backend: str = "numpy", dtype: str = "float64") -> Jacobian:
    """Compile the dense Jacobian of ``outputs`` (any shape): ``J(**arrays)`` is ``(outputs.size, P)``.

    Built from a vector-Jacobian product program called once per output entry (row-major);
    ``wrt`` may include inputs (``sd.input``): a saliency map, ``n * features`` columns.

    >>> import numpy as np, symdl as sd
    >>> x = sd.input("x", 2); W = sd.param("W", (2, 1))
    >>> J = sd.jacobian(x @ W, [W])
    >>> J(x=np.array([[1.0, 2.0], [3.0, 4.0]]), W=np.zeros((2, 1)))
    array([[1., 2.],
           [3., 4.]])
    """
    return Jacobian(outputs, wrt, backend=backend, dtype=dtype)
