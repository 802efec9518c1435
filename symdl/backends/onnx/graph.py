"""An ONNX graph under construction: nodes with fresh value names, constants, and sizes in ``n``.

The printers (``kernels``, ``bodies``, ``images``) add nodes through one ``Graph``; sizes that
depend on the batch symbol ``n`` become small int64 tensors computed from ``n``'s tensor
(``Graph.n``, set by whoever builds the graph's interface: the first dimension of an input).

>>> import numpy as np, sympy as sp
>>> from symdl.graph.nodes import n
>>> g = Graph(np.float32, opset=17)
>>> g.n = "batch"                      # an int64 [1] tensor the caller computes (Shape of an input)
>>> rows_and_cols = g.shape((n * 4, 3))
>>> [node.op_type for node in g.nodes]   # batch * 4, then [batch * 4, 3]
['Mul', 'Concat']
>>> g.shape((2, 3)) in {t.name for t in g.initializers}   # a constant shape is an initializer
True
"""
from __future__ import annotations

import numpy as np
import sympy as sp
from onnx import TensorProto, helper, numpy_helper

from ...graph.nodes import n as N

#: The lowest opset the printers use (``Shape`` with ``start``/``end``; ``Pad``'s inputs).
MIN_OPSET = 15


def onnx_dtype(dtype) -> int:
    """The ``TensorProto`` element type of a NumPy float dtype."""
    return {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}[np.dtype(dtype)]


class Graph:
    """Nodes, initializers and a name counter; ``dtype`` is the arithmetic's (float32 or float64)."""

    def __init__(self, dtype, opset: int, native_images: bool | None = None):
        self.dtype, self.opset = np.dtype(dtype), int(opset)
        # ONNX Runtime's Conv and pools are float32 kernels: float64 graphs gather (``images``)
        self.native_images = self.dtype == np.float32 if native_images is None else bool(native_images)
        self.nodes, self.initializers = [], []
        self.count = 0
        self.constants = {}  # (dtype, shape, bytes) -> name: each constant stored once
        self.sizes = {}  # a size expression -> its int64 [1] tensor
        self.n = None  # the int64 [1] tensor holding the batch size

    def fresh(self, stem: str = "t") -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def node(self, op: str, inputs, outputs: int | list = 1, **attrs):
        """Add ``op`` on ``inputs``; returns its output name (or the list of them)."""
        names = [self.fresh(op.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), names, name=self.fresh("node"), **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=None) -> str:
        """A constant tensor (the graph's float dtype unless ``dtype``), stored once per value."""
        array = np.asarray(value, dtype=self.dtype if dtype is None else dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self.constants[key] = name
        return self.constants[key]

    def initializer(self, name: str, array) -> str:
        """A named initializer (a weight), in the graph's dtype."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=self.dtype), name))
        return name

    def size(self, expr) -> str:
        """An int64 ``[1]`` tensor holding ``expr`` (a polynomial in ``n`` with integer coefficients)."""
        expr = sp.expand(sp.sympify(expr))
        if expr in self.sizes:
            return self.sizes[expr]
        if not expr.free_symbols:
            return self.const([int(expr)], np.int64)
        if expr.free_symbols != {N}:
            raise ValueError(f"ONNX export: a size {expr} depends on {sorted(map(str, expr.free_symbols))}, "
                             "not only on the batch size n")
        if self.n is None:
            raise ValueError(f"ONNX export: the size {expr} depends on the batch size n, but no input carries n")
        poly = sp.Poly(expr, N)
        total = None
        for (power,), coefficient in poly.terms():
            term = self.n if power else None
            for _ in range(max(power - 1, 0)):
                term = self.node("Mul", [term, self.n])
            c = int(coefficient)
            if term is None:
                term = self.const([c], np.int64)
            elif c != 1:
                term = self.node("Mul", [term, self.const([c], np.int64)])
            total = term if total is None else self.node("Add", [total, term])
        self.sizes[expr] = total
        return total

    def batch_value(self) -> str:
        """The batch size as a scalar in the graph's float dtype (a body may read ``n``: a mean)."""
        if "n_float" not in self.sizes:
            if self.n is None:
                raise ValueError("ONNX export: a formula reads the batch size n, but no input carries n")
            scalar = self.node("Reshape", [self.n, self.const(np.zeros(0), np.int64)])
            self.sizes["n_float"] = self.node("Cast", [scalar], to=onnx_dtype(self.dtype))
        return self.sizes["n_float"]

    def shape(self, dims) -> str:
        """An int64 shape tensor for ``dims`` (ints or expressions in ``n``)."""
        dims = [sp.sympify(d) for d in dims]
        if not any(d.free_symbols for d in dims):
            return self.const([int(d) for d in dims], np.int64)
        return self.node("Concat", [self.size(d) for d in dims], axis=0)

    def reshape(self, value: str, dims) -> str:
        return self.node("Reshape", [value, self.shape(dims)])

    def reduce(self, op: str, value: str, axes, keepdims: int = 1) -> str:
        """``ReduceSum``/``ReduceMax``/... over ``axes``: an input from opset 18 (ReduceSum: 13), else an attribute."""
        axes_as_input = self.opset >= 18 or op == "ReduceSum"
        if axes_as_input:
            return self.node(op, [value, self.const(list(axes), np.int64)], keepdims=keepdims)
        return self.node(op, [value], axes=list(axes), keepdims=keepdims)
