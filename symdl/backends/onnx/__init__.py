"""The ONNX backend: the lowered program printed as ONNX operators (one printer per kernel class,
as every backend), run by ONNX Runtime or written to a file by ``symdl.export``.

* ``graph``   the graph under construction (fresh names, constants, sizes in ``n``);
* ``bodies``  a kernel body (SymPy) as ONNX nodes, through the scalar vocabulary's primitives;
* ``images``  image kernels as gathers over constant index tables;
* ``kernels`` ``emit``: one handler per kernel class;
* ``model``   the ``ModelProto`` (checked, IR version for the opset) and the ONNX Runtime ``Runner``.

It needs the optional packages ``onnx`` and (to run) ``onnxruntime``: ``pip install symdl[onnx]``.
"""
from .graph import MIN_OPSET, Graph
from .kernels import emit, emit_program
from .model import DEFAULT_OPSET, Runner, check_opset, compile_program, make_model, program_model, session

__all__ = ["MIN_OPSET", "DEFAULT_OPSET", "Graph", "emit", "emit_program", "Runner", "check_opset",
           "compile_program", "make_model", "program_model", "session"]
