"""Doctest collection over ``symdl/``: modules of an optional extra are skipped when it is absent
(the extra's tests in ``tests/`` skip with the reason)."""
import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
    collect_ignore_glob += ["symdl/backends/onnx/*", "symdl/export/onnx.py"]
if importlib.util.find_spec("safetensors") is None:
    collect_ignore_glob += ["symdl/nn/weights.py", "symdl/nn/torch_weights.py"]
