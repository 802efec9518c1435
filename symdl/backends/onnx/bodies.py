"""A kernel body (a SymPy expression over the operands ``v0, v1, ...``) as ONNX nodes.

The functions whose NaN, ±0 and tie rules differ between targets are first rewritten into the
scalar vocabulary's primitives (``formulas.scalars.decompose``: comparisons, ``IsNaN``,
``Select``), which ONNX has as ``Greater``, ``IsNaN``, ``Where``...; every other function maps
to one ONNX operator (``FUNCTIONS``) or a short formula of them (``erfc``, ``log1p``,
``expm1``). Equal subexpressions are printed once (a dictionary keyed by the SymPy node).

>>> import numpy as np, sympy as sp
>>> from symdl.graph.nodes import VARS
>>> from symdl.backends.onnx.graph import Graph
>>> g = Graph(np.float32, opset=17)
>>> out = Body(g, {VARS[0]: "x"}).value(sp.tanh(VARS[0]) ** 2 + 1)
>>> [node.op_type for node in g.nodes]
['Tanh', 'Mul', 'Add']
"""
from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from ...formulas.scalars import IsNaN, Select, decompose
from ...graph.nodes import n as N

#: SymPy functions that are one ONNX operator.
FUNCTIONS = {sp.exp: "Exp", sp.log: "Log", sp.sin: "Sin", sp.cos: "Cos", sp.tan: "Tan", sp.Abs: "Abs",
             sp.sinh: "Sinh", sp.cosh: "Cosh", sp.atan: "Atan", sp.asinh: "Asinh", sp.atanh: "Atanh",
             sp.erf: "Erf", sp.tanh: "Tanh"}

#: Relations and logic, one ONNX operator each (``!=`` is ``Not(Equal)``: true when a NaN is compared).
RELATIONS = {sp.StrictGreaterThan: "Greater", sp.StrictLessThan: "Less", sp.GreaterThan: "GreaterOrEqual",
             sp.LessThan: "LessOrEqual", sp.Equality: "Equal"}
LOGIC = {sp.And: "And", sp.Or: "Or"}


class Body:
    """Prints SymPy expressions into ``graph``; ``symbols`` maps each operand or scalar symbol to
    its ONNX value."""

    def __init__(self, graph, symbols: dict):
        self.g, self.symbols = graph, dict(symbols)
        self.done = {}

    def value(self, e) -> str:
        e = sp.sympify(e)
        if e not in self.done:
            self.done[e] = self._print(e)
        return self.done[e]

    def _fold(self, op, args) -> str:
        out = self.value(args[0])
        for a in args[1:]:
            out = self.g.node(op, [out, self.value(a)])
        return out

    def _print(self, e) -> str:
        g = self.g
        if e in self.symbols:
            return self.symbols[e]
        if e is sp.true or e is sp.false:
            return g.const(bool(e), bool)
        if e == N:
            return g.batch_value()
        if e.is_number:  # numbers and constant formulas (pi, sqrt(2/pi)): one constant
            return g.const(float(e))
        if isinstance(e, sp.Symbol):
            raise ValueError(f"ONNX export: a formula reads {e}, which is neither an operand nor a runtime scalar "
                             "the export was given")
        rewritten = decompose(e)
        if rewritten is not None:
            return self.value(rewritten)
        if isinstance(e, sp.Add):
            return self._fold("Add", e.args)
        if isinstance(e, sp.Mul):
            coefficient, rest = e.as_coeff_Mul()
            if coefficient == -1:
                return g.node("Neg", [self.value(rest)])
            return self._fold("Mul", e.args)
        if isinstance(e, sp.Pow):
            return self._power(*e.args)
        if isinstance(e, Select):
            return g.node("Where", [self.value(a) for a in e.args])
        if isinstance(e, IsNaN):
            return g.node("IsNaN", [self.value(e.args[0])])
        if type(e) in RELATIONS:
            return g.node(RELATIONS[type(e)], [self.value(a) for a in e.args])
        if isinstance(e, sp.Unequality):
            return g.node("Not", [g.node("Equal", [self.value(a) for a in e.args])])
        if type(e) in LOGIC:
            return self._fold(LOGIC[type(e)], e.args)
        if isinstance(e, sp.Not):
            return g.node("Not", [self.value(e.args[0])])
        if type(e) in FUNCTIONS:
            return g.node(FUNCTIONS[type(e)], [self.value(e.args[0])])
        if isinstance(e, sp.Mod):  # fmod (C's): Python's % on the non-negative positions it is used on
            return g.node("Mod", [self.value(a) for a in e.args], fmod=1)
        if isinstance(e, sp.erfc):
            return g.node("Sub", [g.const(1.0), g.node("Erf", [self.value(e.args[0])])])
        if isinstance(e, log1p):
            return g.node("Log", [g.node("Add", [g.const(1.0), self.value(e.args[0])])])
        if isinstance(e, expm1):
            return g.node("Sub", [g.node("Exp", [self.value(e.args[0])]), g.const(1.0)])
        what = type(e).__name__
        if what == "UniformHash":
            raise ValueError("ONNX export: dropout's random mask (a counter-based hash) has no ONNX form; "
                             "export the inference graph, where dropout is the identity")
        raise ValueError(f"ONNX export: no ONNX operator for the function {what} in {e}")

    def _power(self, base, exponent) -> str:
        """Small integer powers as products (and their reciprocals), square roots as ``Sqrt``,
        any other power as ``Pow``."""
        g, x = self.g, self.value(base)
        if exponent.is_Integer and 1 <= abs(int(exponent)) <= 4:
            out = x
            for _ in range(abs(int(exponent)) - 1):
                out = g.node("Mul", [out, x])
            return out if exponent > 0 else g.node("Reciprocal", [out])
        if exponent == sp.S.Half:
            return g.node("Sqrt", [x])
        if exponent == -sp.S.Half:
            return g.node("Reciprocal", [g.node("Sqrt", [x])])
        return g.node("Pow", [x, self.value(exponent)])
