"""Op converters grouped by family, registered by (domain, op type, opset range).

Importing this package registers every converter; `bridge/registry.py` documents how to add one.
"""

from onnx_inher.bridge.ops import control, loss, math, ml, nn, qrnn, quant, reduce, resize, rnn, shape

__all__ = ["control", "loss", "math", "ml", "nn", "qrnn", "quant", "reduce", "resize", "rnn", "shape"]
