"""Rule tables are complete: no class is left half handled (in the spirit of JAX's autodidax)."""
from __future__ import annotations

from functools import singledispatch

import numpy as np
import pytest
from sympy import MatAdd, MatMul, MatrixSymbol, Transpose

import symdl as sd  # every node family registers its rules on import
from symdl.autodiff.jvp import JVP
from symdl.autodiff.vjp import VJP
from symdl.backends import image_code, numpy_backend, scalar_code
from symdl.backends.cpu import backend as cpu_backend, llvm_code
from symdl.graph.nodes import PRINT_RULES
from symdl.ir import kernels as ir
from symdl.ir.lowering import LOWER
from symdl.ops import conv
from symdl.run.pipeline import compile_outputs


# --- kernel classes
# Every IR kernel class (``ir.KERNELS``) has a shape check and a handler in every backend's
# dispatch table (``functools.singledispatch`` functions: a handler registered for a base class
# counts).


def _cuda_emit():
    try:
        import numba.cuda  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"numba.cuda does not import ({exc}), so the CUDA backend is not checked")
    from symdl.backends import cuda_backend

    return cuda_backend.emit


def _of(*bases) -> tuple:
    return tuple(k for k in ir.KERNELS if issubclass(k, bases))


#: ``name: (the dispatcher, got lazily; the kernel classes it must handle)``.
def _onnx_emit():
    pytest.importorskip("onnx", reason="the ONNX printer needs the onnx package (symdl[onnx])")
    from symdl.backends.onnx import kernels

    return kernels.emit


KERNEL_TABLES = {
    "ir.kernels._check_shapes": (lambda: ir._check_shapes, ir.KERNELS),  # check()'s shape rules
    "numpy_backend.emit": (lambda: numpy_backend.emit, ir.KERNELS),
    "cpu.backend.emit": (lambda: cpu_backend.emit, ir.KERNELS),
    "cpu.backend.units": (lambda: cpu_backend.units, ir.KERNELS),  # what the step's threads share
    "cpu.llvm_code._reduce": (lambda: llvm_code._reduce, _of(ir.Reduction)),
    "cpu.llvm_code.emit": (lambda: llvm_code.emit, ir.KERNELS),  # image kernels: cpu.llvm_image
    "scalar_code.loop_body": (lambda: scalar_code.loop_body, _of(ir.Elementwise, ir.Update, ir.Reduction)),
    "image_code.row_body": (lambda: image_code.row_body, _of(ir.ImageKernel, ir.Reshape)),
    "cuda_backend.emit": (_cuda_emit, ir.KERNELS),
    "onnx.kernels.emit": (_onnx_emit, ir.KERNELS),
}

#: ``(table, kernel class): why the table needs no handler for it``.
NO_HANDLER_NEEDED = {
    ("cpu.backend.emit", ir.Gemm): "every product calls the prebuilt cpu_gemm kernel (cpu.backend.kernel_source)",
    ("cpu.llvm_code.emit", ir.Gemm): "every product calls the prebuilt cpu_gemm kernel (cpu.backend.kernel_source)",
    ("cpu.backend.emit", ir.BlockGemm): "every product within sequences calls the prebuilt block_gemm kernel",
    ("cpu.llvm_code.emit", ir.BlockGemm): "every product within sequences calls the prebuilt block_gemm kernel",
}


def missing_handlers(dispatcher, classes) -> list:
    """The names of the ``classes`` that ``dispatcher`` (a singledispatch function) sends to its fallback."""
    fallback = dispatcher.dispatch(object)
    return [k.__name__ for k in classes if dispatcher.dispatch(k) is fallback]


def _needed(table: str) -> tuple:
    return tuple(k for k in KERNEL_TABLES[table][1] if (table, k) not in NO_HANDLER_NEEDED)


def test_kernels_lists_every_kernel_class():
    """``ir.KERNELS`` holds every concrete kernel class the module defines (a new one cannot be missed)."""
    bases = (ir.Reduction, ir.ImageKernel)
    defined = {v for v in vars(ir).values() if isinstance(v, type) and v.__module__ == ir.__name__
               and hasattr(v, "reads") and v not in bases}
    assert defined == set(ir.KERNELS)


@pytest.mark.parametrize("table", list(KERNEL_TABLES))
def test_every_kernel_class_has_a_handler(table):
    dispatcher = KERNEL_TABLES[table][0]()
    assert missing_handlers(dispatcher, _needed(table)) == []
    exempt = [k for (t, k) in NO_HANDLER_NEEDED if t == table]
    assert missing_handlers(dispatcher, exempt) == [k.__name__ for k in exempt], "an exemption is stale"


def _without(dispatcher, cls):
    """A copy of ``dispatcher`` with the handler registered for ``cls`` taken out."""
    copy = singledispatch(dispatcher.dispatch(object))
    for k, handler in dispatcher.registry.items():
        if k not in (object, cls):
            copy.register(k, handler)
    return copy


@pytest.mark.parametrize("table", list(KERNEL_TABLES))
def test_taking_out_any_handler_is_reported(table):
    """Every registration handles some kernel class, and without it the check names that class."""
    dispatcher = KERNEL_TABLES[table][0]()
    for registered in [k for k in dispatcher.registry if k is not object]:
        missing = missing_handlers(_without(dispatcher, registered), _needed(table))
        assert missing, f"{table}: the handler registered for {registered.__name__} handles no kernel class"
        assert all(issubclass(getattr(ir, name), registered) for name in missing)


def test_the_table_test_fails_when_a_backend_loses_a_handler(monkeypatch):
    monkeypatch.setattr(numpy_backend, "emit", _without(numpy_backend.emit, ir.MaxPoolGrad))
    with pytest.raises(AssertionError, match="MaxPoolGrad"):
        test_every_kernel_class_has_a_handler("numpy_backend.emit")


# --- node tables
# Every graph node class that one rule table knows is known to all four: the chain rule (``VJP``),
# forward mode (``JVP``), lowering (``LOWER``) and printing (``PRINT_RULES``). A rule registered for
# a base class (``ImageNode``) counts for its subclasses; what needs no rule says why, here.

NODE_TABLES = {"VJP": VJP, "JVP": JVP, "LOWER": LOWER, "PRINT_RULES": PRINT_RULES}

#: ``(table, node class): why the table needs no rule for it``.
NO_RULE_NEEDED = {
    ("PRINT_RULES", MatMul): "a SymPy class: SymPy prints products (symdl's nodes inside print by their own rules)",
    ("PRINT_RULES", MatAdd): "a SymPy class: SymPy prints sums",
    ("PRINT_RULES", Transpose): "a SymPy class: SymPy prints X.T",
}


def _symdl_subclasses(cls) -> set:
    """Every subclass of ``cls`` that symdl defines, however deep."""
    out = set()
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("symdl"):
            out |= {sub} | _symdl_subclasses(sub)
    return out


def _library_node(cls) -> bool:
    """A node class of symdl or SymPy, not a leaf (a test module's own classes are its business)."""
    return cls.__module__.split(".")[0] in ("symdl", "sympy") and not issubclass(cls, MatrixSymbol)


def node_classes() -> set:
    """The concrete node classes the tables know: every registered class and its symdl subclasses,
    less leaves (``MatrixSymbol``s: the walks start and stop there), bases with subclasses, and
    classes a test module defines (the extending recipe's ``RowMean``)."""
    known = set()
    for table in NODE_TABLES.values():
        for cls in table:
            known |= {cls} | _symdl_subclasses(cls)
    return {c for c in known if _library_node(c) and not _symdl_subclasses(c) & known}


def missing_rules() -> list:
    """``[(table, class name)]`` for every node class a table does not handle (and need not skip)."""
    return sorted((name, cls.__name__) for cls in node_classes() for name, table in NODE_TABLES.items()
                  if not any(c in table for c in cls.__mro__) and (name, cls) not in NO_RULE_NEEDED)


def test_every_node_class_has_every_rule():
    assert {"Map", "MatMul", "Patches", "MaxPoolGrad", "PickMax", "Reshape"} <= {c.__name__ for c in node_classes()}
    assert missing_rules() == []
    stale = [(t, c.__name__) for (t, c) in NO_RULE_NEEDED if any(k in NODE_TABLES[t] for k in c.__mro__)]
    assert stale == [], "an exemption is stale: the table has the rule"


@pytest.mark.parametrize("table", list(NODE_TABLES))
def test_taking_out_any_node_rule_is_reported(table, monkeypatch):
    """Removing any registered rule of any table makes the check name the classes left without it."""
    for cls in [c for c in list(NODE_TABLES[table]) if _library_node(c)]:
        with monkeypatch.context() as m:
            m.delitem(NODE_TABLES[table], cls)
            missing = missing_rules()
        assert missing and all(t == table for t, _ in missing), (table, cls.__name__, missing)


def test_the_node_table_test_fails_when_a_family_loses_a_rule(monkeypatch):
    monkeypatch.delitem(JVP, conv.MaxPool)
    with pytest.raises(AssertionError, match="MaxPool"):
        test_every_node_class_has_every_rule()


def test_a_sympy_sum_differentiates_and_lowers():
    """``MatAdd`` (SymPy's own ``+``; symdl's builds a Map) has all four rules, and they agree."""
    x = sd.input("x", 2); W = sd.param("W", (2, 2)); V = sd.param("V", (2, 2))
    z = MatAdd(x @ W, x @ V.T)
    loss = sd.total(sd.tanh(z))
    assert str(z) == "x*W + x*V.T"
    rng = np.random.default_rng(0)
    X, Wv, Vv = rng.normal(size=(3, 2)), rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
    out = compile_outputs({"z": z}).run({"x": X, "W": Wv, "V": Vv}, {}, 3)
    np.testing.assert_allclose(out["z"], X @ Wv + X @ Vv.T, rtol=1e-12)
    _, grads = sd.value_and_grad(loss, [W, V])(x=X, W=Wv, V=Vv)
    delta = 1 - np.tanh(X @ Wv + X @ Vv.T) ** 2
    np.testing.assert_allclose(grads["W"], X.T @ delta, rtol=1e-12)
    np.testing.assert_allclose(grads["V"], (X.T @ delta).T, rtol=1e-12)
