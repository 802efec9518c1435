"""Leaving symdl: a model or graph exported to ONNX (forward pass, or loss and gradients).

* ``onnx``  ``export_model(model, path, opset=17, gradients=False)`` and ``export_onnx(outputs, path,
            inputs=..., params=...)``, printed by the ONNX backend (``symdl.backends.onnx``).

Weights in safetensors files and PyTorch state dicts are ``symdl.nn.weights`` and
``symdl.nn.torch_weights``. The ONNX functions need the optional packages ``onnx`` and
``onnxruntime`` (``pip install symdl[onnx]``); importing this package does not, so ``import
symdl`` works without them: ``export_model`` and ``export_onnx`` load ``symdl.export.onnx`` on
first use.
"""
from __future__ import annotations

_LAZY = ("export_model", "export_onnx")


def __getattr__(name):
    if name in _LAZY:
        from . import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module 'symdl.export' has no attribute {name!r}")


def export(model, path, format: str = "onnx", **kwargs):  # noqa: A002 - Keras's argument name
    """Keras 3's ``model.export(path, format="onnx")``: ``format`` ``"onnx"`` only (keywords go to
    ``export_model``: ``opset``, ``gradients``, ``training``, ``dtype``)."""
    if format != "onnx":
        raise ValueError(f"export: unknown format {format!r}; symdl exports 'onnx'")
    return __getattr__("export_model")(model, path, **kwargs)


__all__ = ["export", "export_model", "export_onnx"]


def _register() -> None:
    from ..nn.model import EXPORTERS

    EXPORTERS["onnx"] = lambda model, path, **kwargs: export(model, path, "onnx", **kwargs)


_register()
