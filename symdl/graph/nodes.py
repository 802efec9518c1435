"""The graph: SymPy matrix expressions plus the few nodes SymPy does not have.

Every node is a SymPy object, so hashing, equality (and therefore CSE),
``xreplace`` and printing work on whole networks. SymPy supplies the leaves
(``MatrixSymbol``), ``MatMul``, ``MatAdd`` and ``Transpose``; symdl adds:

* ``Map``          an elementwise formula applied to same-shaped matrices,
                   ``Map(Lambda((a, b), a*tanh(b)), G, Z)``;
* ``Broadcast``    a row (1, m), column (r, 1) or scalar (1, 1) repeated to (r, m);
* ``SumRows`` / ``SumCols`` / ``SumAll``   reductions (bias gradients, losses);
* ``RowLogSumExp`` the stable log-sum-exp of each row (softmax, cross-entropy).

>>> import symdl as sd
>>> x = sd.input("x", 2); W = sd.param("W", (2, 3)); b = sd.param("b", 3)
>>> z = x @ W + b
>>> z.shape
(n, 3)
>>> print(z)
x*W + b
"""
from __future__ import annotations

import itertools
import numbers
from collections import Counter
from typing import NamedTuple

import sympy as sp
from sympy.core.symbol import Str
from sympy.matrices.expressions import MatAdd, MatMul, MatrixExpr, MatrixSymbol, Transpose

from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pretty.stringpict import prettyForm

from ..registry import RuleTable

#: The symbolic batch size shared by every input.
n = sp.Symbol("n", integer=True, positive=True)
#: The step count of a training run, 1 on the first step: a runtime scalar of the compiled step
#: (Adam's bias correction and dropout's masks read it).
STEP = sp.Symbol("t", real=True)

#: The variables of every elementwise formula: ``Map(Lambda((v0, v1), ...), a, b)``.
#: Lowered kernels use the same alphabet for their operands.
VARS = sp.symbols("v0:256", real=True)
VARSET = frozenset(VARS)

#: The loop indices ``(i, j)`` of the entry an elementwise formula computes. A body may use
#: them (dropout's counter-based mask is a hash of the entry's position); every backend's
#: loop binds them (NumPy as broadcast ``arange``s) and ``Map._entry`` substitutes them.
ROW_INDEX = sp.Symbol("i", integer=True, nonnegative=True)
COL_INDEX = sp.Symbol("j", integer=True, nonnegative=True)
INDEX_SYMBOLS = frozenset((ROW_INDEX, COL_INDEX))

#: How each symdl node reads, ``rule(node, printer, latex: bool) -> str``. ``symdl.graph.printing``
#: (the next module in the pipeline) fills it; nodes only look it up.
PRINT_RULES = RuleTable("printing")


def is_atomic(e) -> bool:
    """Whether ``e`` reads as one symbol (no parentheses needed around it in a product)."""
    if isinstance(e, MatrixSymbol) or (isinstance(e, Transpose) and isinstance(e.arg, MatrixSymbol)):
        return True
    if isinstance(e, (Reduce, RowLogSumExp)):
        return True
    if isinstance(e, Broadcast):
        return is_atomic(e.args[0])
    if isinstance(e, Map):
        body = e.lam.expr
        return isinstance(body, sp.Function) or body.is_Symbol
    return False


class Printable:
    """Mixin giving a node SymPy's three print hooks, answered by ``PRINT_RULES``."""

    @property
    def precedence(self):
        # SymPy's MatMul printer reads this to decide on parentheses: a compound
        # elementwise formula binds like a sum, so ``X.T*(δ⊙A)`` keeps its parentheses.
        return PRECEDENCE["Atom"] if is_atomic(self) else PRECEDENCE["Add"]

    def _sympystr(self, printer):
        return PRINT_RULES.lookup(self)(self, printer, False)

    def _latex(self, printer):
        return PRINT_RULES.lookup(self)(self, printer, True)

    def _pretty(self, printer):
        return prettyForm(PRINT_RULES.lookup(self)(self, sp.printing.str.StrPrinter(), False))


class ShapeMismatch(ValueError):
    """Two operands whose shapes do not fit the operation."""


def shape_text(e) -> str:
    return "(" + ", ".join(str(d) for d in e.shape) + ")"


def name_of(e) -> str:
    s = str(e)
    return s if len(s) <= 60 else s[:57] + "..."


class Ops:
    """Operators for symdl nodes (mixed into every node class).

    ``_op_priority`` beats SymPy's matrix expressions, so ``x @ W + b`` reaches
    our ``__radd__`` (which knows about bias broadcasting) even when the left
    operand is a plain SymPy ``MatMul``.
    """

    _op_priority = 20.0

    def __add__(self, other):
        return elementwise(lambda a, b: a + b, self, other, op="+")

    def __radd__(self, other):
        return elementwise(lambda a, b: a + b, other, self, op="+")

    def __sub__(self, other):
        return elementwise(lambda a, b: a - b, self, other, op="-")

    def __rsub__(self, other):
        return elementwise(lambda a, b: a - b, other, self, op="-")

    def __neg__(self):
        return elementwise(lambda a: -a, self)

    def __mul__(self, other):
        _require_scalar(self, other, "*")
        return elementwise(lambda a, b: a * b, self, other, op="*")

    def __rmul__(self, other):
        if isinstance(other, MatrixExpr) and not isinstance(other, Ops) and other.shape != (1, 1):
            # SymPy sends both ``A*B`` and ``A@B`` here when A is SymPy's own MatMul:
            # in SymPy '*' between matrices is the matrix product.
            return matmul(other, self)
        _require_scalar(other, self, "*")
        return elementwise(lambda a, b: a * b, other, self, op="*")

    def __truediv__(self, other):
        _require_scalar(self, other, "/")
        return elementwise(lambda a, b: a / b, self, other, op="/")

    def __pow__(self, other):
        _require_scalar(self, other, "**")
        return elementwise(lambda a, b: a**b, self, other, op="**")

    def __matmul__(self, other):
        return matmul(self, other)

    def __rmatmul__(self, other):
        return matmul(other, self)


def _require_scalar(a, b, op):
    if isinstance(a, MatrixExpr) and isinstance(b, MatrixExpr) and (a.shape != (1, 1) and b.shape != (1, 1)):
        raise TypeError(
            f"'{op}' between two matrices {name_of(a)} {shape_text(a)} and {name_of(b)} {shape_text(b)}: "
            "use '@' for the matrix product or sd.hadamard(a, b) for the elementwise product"
        )


class ParamName(Str):
    """A parameter's name that also carries which ``sd.param`` call made it.

    SymPy's ``MatrixSymbol``s with equal names and shapes are one object, so two
    ``sd.param("W", (4, 4))`` calls would silently be one tied weight. With this name
    each call makes its own leaf (printed by its name alone), and ``check_leaf_names``
    refuses a graph that holds two different leaves with one name. To tie a weight,
    use the same ``Param`` object twice.
    """

    __slots__ = ("uid",)

    def __new__(cls, name, uid):
        obj = Str.__new__(cls, name)
        obj.uid = int(uid)
        return obj

    def __getnewargs__(self):
        return (self.name, self.uid)

    def _hashable_content(self):
        return (self.name, self.uid)


_param_ids = itertools.count()


class ShapedName(Str):
    """A leaf's name that also carries the shape its arrays have outside the graph.

    An image input ``(n, H, W, C)`` is the matrix ``(n·H·W, C)`` in the graph and a
    convolution kernel ``(kh, kw, c_in, c_out)`` the matrix ``(kh·kw·c_in, c_out)``; the
    outer shape is part of the name's identity (two inputs ``x`` of other geometries differ).
    """

    __slots__ = ("dims", "uid")

    def __new__(cls, name, dims, uid=-1):
        obj = Str.__new__(cls, name)
        obj.dims, obj.uid = tuple(int(d) for d in dims), int(uid)
        return obj

    def __getnewargs__(self):
        return (self.name, self.dims, self.uid)

    def _hashable_content(self):
        return (self.name, self.dims, self.uid)


class Input(Ops, MatrixSymbol):
    """A data array fed at call time: ``(n, features)`` with the batch symbol ``n``."""


class Param(Ops, MatrixSymbol):
    """A trainable matrix parameter."""

    @property
    def value_shape(self) -> tuple:
        return (int(self.shape[0]), int(self.shape[1]))


class VectorParam(Param):
    """A trainable vector (e.g. a bias): a (1, k) row in the graph, a (k,) array outside."""

    @property
    def value_shape(self) -> tuple:
        return (int(self.shape[1]),)


class ImageInput(Input):
    """A batch of NHWC images ``(n, H, W, C)``, held as the matrix ``(n·H·W, C)``: one row per pixel."""

    @property
    def image_shape(self) -> tuple:
        return self.args[0].dims


class TokenInput(Input):
    """A batch of ``n`` sequences of ``T`` token ids ``(n, T)``, held as the column ``(n·T, 1)``: one
    row per token (row ``b·T + t``), the way images are pixel rows. The ids are exact integers in
    the program's float dtype; the arrays passed are integers (``run.validate`` checks them)."""

    @property
    def sequence_length(self) -> int:
        return self.args[0].dims[0]

    @property
    def token_shape(self) -> tuple:
        return self.args[0].dims


class SequenceInput(Input):
    """A batch of ``n`` sequences of ``T`` vectors ``(n, T, d)``, held as ``(n·T, d)``: one row per token
    (per-token targets, or features already embedded)."""

    @property
    def sequence_length(self) -> int:
        return self.args[0].dims[0]

    @property
    def sequence_shape(self) -> tuple:
        return self.args[0].dims


class KernelParam(Param):
    """A convolution kernel ``(kh, kw, c_in, c_out)``, held as the matrix ``(kh·kw·c_in, c_out)``."""

    @property
    def value_shape(self) -> tuple:
        return self.args[0].dims


class State(Ops, MatrixSymbol):
    """A persistent buffer that is not trained: optimizer state, later running statistics.

    Training writes it (``{State: new value}``, see ``lowering.lower``); it keeps its
    value between steps like a parameter.
    """


def input(name: str, features, dtype=None) -> Input:  # noqa: A001 - public name from the design
    """A batch of data with ``features`` columns and ``n`` (symbolic) rows.

    ``features = (H, W, C)`` declares a batch of NHWC images, held as ``(n·H·W, C)``;
    ``features = (T,)`` with an integer ``dtype`` a batch of token sequences ``(n, T)``, held as
    the column of ids ``(n·T, 1)`` (``ops.embedding`` looks them up; ``sequence_input`` declares
    sequences of vectors):

    >>> x = input("x", 4); x.shape
    (n, 4)
    >>> input("img", (8, 8, 1)).shape
    (64*n, 1)
    >>> input("tokens", (5,), dtype="int32").shape
    (5*n, 1)
    """
    _check_name(name)
    if dtype is not None:
        if str(dtype) not in ("int32", "int64"):
            raise ValueError(f"input {name!r}: dtype must be 'int32' or 'int64' (token ids), got {dtype!r}; "
                             "float inputs take no dtype")
        dims = tuple(features) if isinstance(features, (tuple, list)) else (features,)
        if len(dims) != 1 or not (isinstance(dims[0], numbers.Integral) and dims[0] > 0):
            raise ValueError(f"input {name!r}: token ids are sequences (sequence_length,) of a positive int, "
                             f"got {features!r}")
        # each call its own leaf (as ``param``): the embeddings built on it check the ids passed for it
        return TokenInput(ShapedName(name, dims, next(_param_ids)), n * int(dims[0]), 1)
    if isinstance(features, (tuple, list)):
        dims = tuple(features)
        if len(dims) != 3 or not all(isinstance(d, numbers.Integral) and d > 0 for d in dims):
            raise ValueError(f"input {name!r}: an image shape is (height, width, channels) of positive ints, "
                             f"got {features!r}")
        h, w, c = (int(d) for d in dims)
        return ImageInput(ShapedName(name, dims), n * h * w, c)
    if not (isinstance(features, numbers.Integral) and features > 0):
        raise ValueError(f"input {name!r}: features must be a positive integer, got {features!r}")
    return Input(name, n, int(features))


def sequence_input(name: str, shape) -> Input:
    """A batch of ``n`` sequences of ``T`` vectors of ``d`` features ``(n, T, d)``, held as ``(n·T, d)``
    (row ``b·T + t``, as an embedding's output): per-token targets, or features already embedded.

    >>> sequence_input("y", (5, 3)).shape
    (5*n, 3)
    """
    _check_name(name)
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else ()
    if len(dims) != 2 or not all(isinstance(d, numbers.Integral) and d > 0 for d in dims):
        raise ValueError(f"sequence_input {name!r}: shape is (sequence_length, features) of positive ints, "
                         f"got {shape!r}")
    return SequenceInput(ShapedName(name, dims), n * int(dims[0]), int(dims[1]))


def param(name: str, shape) -> Param:
    """A trainable parameter: ``param("W", (2, 16))`` is a matrix, ``param("b", 16)`` a vector.

    >>> param("b", 16).shape   # a vector is a row in the graph, shape (16,) outside
    (1, 16)
    """
    _check_name(name)
    if isinstance(shape, numbers.Integral):
        if shape <= 0:
            raise ValueError(f"param {name!r}: size must be positive, got {shape}")
        return VectorParam(ParamName(name, next(_param_ids)), 1, int(shape))
    shape = tuple(shape)
    if len(shape) == 1:
        return param(name, shape[0])
    if len(shape) == 4 and all(isinstance(d, numbers.Integral) and d > 0 for d in shape):
        kh, kw, cin, cout = (int(d) for d in shape)  # a convolution kernel, as in Keras
        return KernelParam(ShapedName(name, shape, next(_param_ids)), kh * kw * cin, cout)
    if len(shape) != 2 or not all(isinstance(d, numbers.Integral) and d > 0 for d in shape):
        raise ValueError(f"param {name!r}: shape must be an int, a pair of positive ints or a convolution "
                         f"kernel (kh, kw, c_in, c_out), got {shape!r}")
    return Param(ParamName(name, next(_param_ids)), int(shape[0]), int(shape[1]))


def _check_name(name):
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"names must be Python identifiers (they name the arrays you pass), got {name!r}")
    if name == "n" or name.startswith("_"):
        raise ValueError(f"the name {name!r} is reserved (n is the batch size); choose another")


# --------------------------------------------------------------------------- elementwise


class Map(Printable, Ops, MatrixExpr):
    """``Map(Lambda(vars, body), *args)``: ``body`` applied to every element of the args.

    All args have the same shape (``elementwise`` inserts ``Broadcast`` where needed).
    """

    def __new__(cls, lam, *args):
        return MatrixExpr.__new__(cls, lam, *args)

    @property
    def lam(self) -> sp.Lambda:
        return self.args[0]

    @property
    def operands(self) -> tuple:
        return self.args[1:]

    @property
    def shape(self):
        # Kept once asked: a deep net's chain of maps and products would otherwise be walked to
        # its input for every node's shape.
        shape = self.__dict__.get("_shape")
        if shape is None:
            shape = self.__dict__["_shape"] = self.args[1].shape
        return shape

    def _entry(self, i, j, **kw):
        value = self.lam(*[a._entry(i, j, **kw) for a in self.operands])
        return value.xreplace({ROW_INDEX: i, COL_INDEX: j}) if value.has(ROW_INDEX, COL_INDEX) else value


def _scalar_of(a):
    """A Python / SymPy number (or symbol) as a SymPy scalar, else None."""
    if isinstance(a, MatrixExpr):
        return None
    if isinstance(a, (numbers.Number, sp.Expr)) and not isinstance(a, bool):
        return sp.sympify(a)
    raise TypeError(f"cannot use {a!r} ({type(a).__name__}) in a symdl expression")


def broadcast_to(x: MatrixExpr, shape, *, what="") -> MatrixExpr:
    """``x`` repeated to ``shape`` along its size-1 axes (an error if it does not fit)."""
    if tuple(x.shape) == tuple(shape):
        return x
    ok = all(xd == d or xd == 1 for xd, d in zip(x.shape, shape))
    if not ok:
        raise ShapeMismatch(f"{what}cannot broadcast {name_of(x)} {shape_text(x)} to ({shape[0]}, {shape[1]})")
    return Broadcast(x, *shape)


def _broadcast_shape(mats, op):
    rows = [m.shape[0] for m in mats]
    cols = [m.shape[1] for m in mats]

    def pick(ds):
        big = [d for d in ds if d != 1]
        return big[0] if big else sp.Integer(1)

    shape = (pick(rows), pick(cols))
    for m in mats:
        if not all(md == d or md == 1 for md, d in zip(m.shape, shape)):
            desc = " and ".join(f"{name_of(a)} {shape_text(a)}" for a in mats)
            raise ShapeMismatch(f"shapes do not match for '{op}': {desc}")
    return shape


def elementwise(fn, *operands, op="elementwise") -> MatrixExpr:
    """Apply the scalar function ``fn`` elementwise; scalars and size-1 axes broadcast.

    >>> x = input("x", 3)
    >>> print(elementwise(lambda a: a**2 + 1, x))
    x**2 + 1
    """
    mats = [o for o in operands if isinstance(o, MatrixExpr)]
    if not mats:
        raise TypeError(f"'{op}' needs at least one matrix operand")
    shape = _broadcast_shape(mats, op)
    args, syms = [], []
    for o in operands:
        s = _scalar_of(o)
        if s is not None:
            syms.append(s)
            continue
        o = broadcast_to(o, shape)
        if o in args:
            syms.append(VARS[args.index(o)])
        else:
            syms.append(VARS[len(args)])
            args.append(o)
    return make_map(sp.sympify(fn(*syms)), args)


def make_map(body, args) -> MatrixExpr:
    """Build a canonical ``Map`` from a body over ``VARS[:len(args)]``.

    Canonical: unused args are dropped, repeated args share a variable, variables
    are numbered by first use, and the identity map returns its argument.
    """
    args = list(args)
    free = body.free_symbols
    for i, a in enumerate(args):  # fold constant operands (the seed 1, 1/n) into the body
        c = constant_value(a)
        if c is not None and VARS[i] in free:
            body = body.xreplace({VARS[i]: c})
            free = body.free_symbols
    used = [i for i, _ in enumerate(args) if VARS[i] in free]
    if not used:  # a constant: keep one operand to carry the shape
        return Map(sp.Lambda((VARS[0],), body), args[0])
    new_args, remap = [], {}
    for i in used:
        a = args[i]
        if a not in new_args:
            new_args.append(a)
        remap[VARS[i]] = VARS[new_args.index(a)]
    body = body.xreplace(remap)
    if body == VARS[0] and len(new_args) == 1:
        return new_args[0]
    return Map(sp.Lambda(tuple(VARS[: len(new_args)]), body), *new_args)


def constant_value(a):
    """The scalar value of a constant ``Map`` (or a broadcast of one), else None."""
    if isinstance(a, Broadcast):
        return constant_value(a.args[0])
    if isinstance(a, Map) and not (a.lam.expr.free_symbols & VARSET):
        return a.lam.expr
    return None


def hadamard(a, b) -> MatrixExpr:
    """The elementwise product ``a ⊙ b`` of two same-shaped matrices."""
    return elementwise(lambda u, v: u * v, a, b, op="hadamard")


# --------------------------------------------------------------------------- broadcast & reductions


class Broadcast(Printable, Ops, MatrixExpr):
    """``Broadcast(x, rows, cols)``: a (1, m) row, (r, 1) column or (1, 1) scalar repeated."""

    def __new__(cls, x, rows, cols):
        return MatrixExpr.__new__(cls, x, sp.sympify(rows), sp.sympify(cols))

    @property
    def shape(self):
        return (self.args[1], self.args[2])

    def _entry(self, i, j, **kw):
        x = self.args[0]
        return x._entry(0 if x.shape[0] == 1 else i, 0 if x.shape[1] == 1 else j, **kw)


class Reduce(Printable, Ops, MatrixExpr):
    """Base for sums over rows, columns or everything."""

    def __new__(cls, x):
        return MatrixExpr.__new__(cls, x)


class SumRows(Reduce):
    """Column sums ``1ᵀX``: (r, m) -> (1, m). The gradient of a broadcast bias."""

    @property
    def shape(self):
        return (sp.Integer(1), self.args[0].shape[1])

    def _entry(self, i, j, **kw):
        x = self.args[0]
        return sum(x._entry(k, j, **kw) for k in range(int(x.shape[0])))


class SumCols(Reduce):
    """Row sums ``X1``: (r, m) -> (r, 1)."""

    @property
    def shape(self):
        return (self.args[0].shape[0], sp.Integer(1))

    def _entry(self, i, j, **kw):
        x = self.args[0]
        return sum(x._entry(i, k, **kw) for k in range(int(x.shape[1])))


class SumAll(Reduce):
    """The sum of all entries: (r, m) -> (1, 1)."""

    @property
    def shape(self):
        return (sp.Integer(1), sp.Integer(1))

    def _entry(self, i, j, **kw):
        x = self.args[0]
        return sum(x._entry(a, b, **kw) for a in range(int(x.shape[0])) for b in range(int(x.shape[1])))


class RowLogSumExp(Printable, Ops, MatrixExpr):
    """``log Σ_j exp(Z_ij)`` per row, (r, m) -> (r, 1); computed with the row max subtracted."""

    def __new__(cls, x):
        return MatrixExpr.__new__(cls, x)

    @property
    def shape(self):
        return (self.args[0].shape[0], sp.Integer(1))

    def _entry(self, i, j, **kw):
        x = self.args[0]
        return sp.log(sum(sp.exp(x._entry(i, k, **kw)) for k in range(int(x.shape[1]))))


def total(x) -> MatrixExpr:
    """The sum of all entries of ``x`` as a (1, 1) expression."""
    return SumAll(x)


def sum_squares(x) -> MatrixExpr:
    """``Σ x²`` over all entries of ``x``, a (1, 1) expression (a gradient penalty's norm).

    >>> print(sum_squares(input("x", 2)))
    sum(x**2)
    """
    return SumAll(elementwise(lambda a: a**2, x, op="sum_squares"))


def mean(x) -> MatrixExpr:
    """The mean of all entries of ``x`` (the batch symbol ``n`` appears in the divisor)."""
    count = x.shape[0] * x.shape[1]
    return elementwise(lambda s: s / count, SumAll(x))


def matmul(a, b) -> MatrixExpr:
    """The matrix product ``a @ b`` with a shape check that names both operands."""
    if not (isinstance(a, MatrixExpr) and isinstance(b, MatrixExpr)):
        raise TypeError(f"'@' needs two matrices, got {type(a).__name__} and {type(b).__name__}")
    if a.shape[1] != b.shape[0]:
        raise ShapeMismatch(
            f"shapes do not match for '@': {name_of(a)} {shape_text(a)} @ {name_of(b)} {shape_text(b)} "
            f"(inner dimensions {a.shape[1]} != {b.shape[0]})"
        )
    return MatMul(a, b)


def leaves(expr) -> list:
    """The ``Input`` and ``Param`` leaves of ``expr``, in first-seen order."""
    seen, out, stack = set(), [], [expr]
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        if isinstance(e, (Input, Param, State)):
            out.append(e)
        elif isinstance(e, MatrixSymbol):
            raise TypeError(f"{e} is a plain SymPy MatrixSymbol: declare it with sd.input or sd.param")
        else:
            stack.extend(reversed(children(e)))
    return out


def _leaf_kind(leaf) -> str:
    kind = ("vector parameter" if isinstance(leaf, VectorParam) else "parameter" if isinstance(leaf, Param)
            else "input" if isinstance(leaf, Input) else "state")
    shape = leaf.value_shape if isinstance(leaf, Param) else tuple(leaf.shape)
    return f"{kind} of shape {_value_shape_text(shape)}"


def _value_shape_text(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


def check_leaf_names(nodes) -> None:
    """Raise if two different leaves among ``nodes`` share a name.

    Arrays are passed, returned and saved by name, so one name must mean one leaf.
    Two ``sd.param`` calls with one name are two leaves even when their shapes agree.
    """
    seen = {}
    for e in nodes:
        if not isinstance(e, (Input, Param, State)):
            continue
        other = seen.setdefault(str(e.name), e)
        if other is e or other == e:
            continue
        same = _leaf_kind(other) == _leaf_kind(e)
        hint = ("each sd.param call makes a new parameter: give them different names, or reuse one "
                "Param object to tie the weights" if same else "give them different names")
        raise ValueError(f"the graph uses two different leaves named {e.name!r}: a {_leaf_kind(other)} "
                         f"and a {_leaf_kind(e)}; {hint}")


def children(e) -> tuple:
    """The matrix operands of a node (scalars, shapes and lambdas are not operands)."""
    if isinstance(e, Map):
        return e.operands
    if isinstance(e, (MatrixSymbol,)):
        return ()
    return tuple(a for a in e.args if isinstance(a, MatrixExpr))


class Walk(NamedTuple):
    """One walk of a graph: what every later pass over it reads instead of walking again."""

    order: list  #: every node reachable from the roots, each once, operands before their users
    uses: Counter  #: how many times each node is an operand (each root counts once more)


def walk(roots) -> Walk:
    """Visit the graph under ``roots`` once (depth first, operands in order): its ``Walk``.

    >>> import symdl as sd
    >>> x = sd.input("x", 2); h = sd.tanh(x)
    >>> w = walk([h.T @ h])
    >>> [str(e) for e in w.order], w.uses[h]
    (['x', 'tanh(x)', 'tanh(x).T', 'tanh(x).T*tanh(x)'], 2)
    """
    order, seen, uses = [], set(), Counter(roots)
    for root in roots:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            operands = children(node)
            uses.update(operands)
            for c in reversed(operands):
                if c not in seen:
                    stack.append((c, False))
    return Walk(order, uses)


def topological(roots) -> list:
    """Every node reachable from ``roots``, each once, operands before their users."""
    return walk(roots).order


__all__ = [
    "n", "STEP", "VARS", "ROW_INDEX", "COL_INDEX", "INDEX_SYMBOLS", "input", "param", "Input", "Param", "VectorParam", "State", "ImageInput", "TokenInput", "SequenceInput", "sequence_input", "KernelParam", "is_atomic", "PRINT_RULES", "Map", "Broadcast", "SumRows", "SumCols",
    "SumAll", "RowLogSumExp", "Reduce", "elementwise", "make_map", "hadamard", "total", "mean", "sum_squares",
    "matmul", "broadcast_to", "leaves", "check_leaf_names", "children", "topological", "ShapeMismatch", "MatMul",
    "walk", "Walk", "MatAdd", "Transpose",
]
