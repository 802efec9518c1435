"""A printed graph as an ONNX ``ModelProto`` that the released ONNX Runtime loads, and the backend's
``Runner``: a program run by ONNX Runtime (CPU, one thread), every external an input.

onnx 1.23's ``make_model`` writes IR version 14, which ONNX Runtime releases before it refuse;
``make_model_gen_version`` picks the IR version of the opset instead.

>>> import numpy as np, symdl as sd
>>> from symdl.ir.lowering import lower
>>> x = sd.input("x", 2); W = sd.param("W", (2, 3))
>>> runner = compile_program(lower({"h": sd.relu(x @ W)}), "float32")
>>> runner.run({"x": np.ones((4, 2)), "W": np.ones((2, 3))}, {}, 4)["h"].tolist()[0]
[2.0, 2.0, 2.0]
"""
from __future__ import annotations

import numpy as np
import onnx
import sympy as sp
from onnx import TensorProto, helper

from ..base import Runner as RunnerBase
from .graph import MIN_OPSET, Graph, onnx_dtype
from .kernels import emit_program

DEFAULT_OPSET = 17


def check_opset(opset) -> int:
    """``opset`` if the printers and this onnx package support it, else a ``ValueError`` saying which do."""
    highest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= highest:
        raise ValueError(f"ONNX export: opset must be an int from {MIN_OPSET} (the operators symdl prints need it) "
                         f"to {highest} (this onnx package's newest), got {opset!r}")
    return opset


def value_info(name: str, elem_type: int, dims) -> onnx.ValueInfoProto:
    """A graph input or output: ``dims`` are ints or strings (symbolic dimensions such as ``"batch"``)."""
    return helper.make_tensor_value_info(name, elem_type, list(dims))


def make_model(graph: Graph, inputs: list, outputs: list, name: str = "symdl", doc: str = "") -> onnx.ModelProto:
    """The ``ModelProto`` of ``graph`` with these inputs and outputs (``ValueInfoProto``s), checked by
    ``onnx.checker``, IR version chosen for the opset."""
    proto = helper.make_graph(graph.nodes, name, inputs, outputs, initializer=graph.initializers, doc_string=doc)
    model = helper.make_model_gen_version(proto, opset_imports=[helper.make_opsetid("", graph.opset)],
                                          producer_name="symdl")
    onnx.checker.check_model(model, full_check=True)
    return model


def session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session on one thread (the oracle setting)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _dims(shape) -> list:
    """A buffer's shape as ONNX dimensions: ints, or ``"n*k"`` where the size depends on ``n``."""
    return [int(d) if not sp.sympify(d).free_symbols else str(d).replace(" ", "") for d in shape]


def program_model(program, dtype, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Every external of ``program`` an input of its graph shape, every scalar a scalar input, the
    batch size an int64 ``[1]`` input ``"n"``, every output an output."""
    if program.persistent:
        raise NotImplementedError(f"onnx backend: the program writes {sorted(program.persistent)} in place (a "
                                  "training step); print forward and gradient programs")
    g = Graph(dtype, check_opset(opset))
    elem = onnx_dtype(dtype)
    g.n = "n"
    inputs = [value_info("n", TensorProto.INT64, [1])]
    values = {}
    for name in program.externals:
        inputs.append(value_info(name, elem, _dims(program.shape_of(name))))
        values[name] = name
    for s in program.scalars:
        inputs.append(value_info(str(s), elem, []))
        values[str(s)] = str(s)
    values = emit_program(g, program, values)
    outputs = []
    for name, buffer in program.outputs.items():
        g.node("Identity", [values[buffer]], outputs=[f"out:{name}"])
        outputs.append(value_info(f"out:{name}", elem, _dims(program.shape_of(buffer))))
    return make_model(g, inputs, outputs)


class Runner(RunnerBase):
    """A program run by ONNX Runtime; ``source`` is the model's text form."""

    def __init__(self, program, dtype, opset: int = DEFAULT_OPSET):
        super().__init__(program, dtype)
        self.model = program_model(program, self.dtype, opset)
        self.source = onnx.printer.to_text(self.model.graph)
        self.session = session(self.model)

    def call(self, external: list, scalars: list, n: int) -> float:
        feed = {"n": np.array([n], np.int64)}
        feed.update({k: np.ascontiguousarray(v, dtype=self.dtype) for k, v in zip(self.external, external)})
        feed.update({k: np.array(v, dtype=self.dtype) for k, v in zip(self.scalar_names, scalars)})
        names = list(self.program.outputs)
        results = self.session.run([f"out:{k}" for k in names], feed)
        bufs = self.buffers(n)
        for name, value in zip(names, results):
            bufs[self.program.outputs[name]][...] = value
        return float(bufs["loss"][0, 0]) if "loss" in self.program.outputs else 0.0


def compile_program(program, dtype) -> Runner:
    return Runner(program, dtype)


__all__ = ["compile_program", "program_model", "make_model", "session", "check_opset", "value_info"]
