"""ONNX -> torch.nn.Module with named, trainable parameters; write-back by name (issue 4).

`to_torch(model, trainable)` converts a graph once into an `OnnxModule` and a `param_map` (ONNX weight
name -> parameter name); `write_back(model, module, param_map)` puts trained values back into the same
graph, node list untouched. Converters live in `bridge/ops/`, registered as `bridge/registry.py` explains.
"""

from onnx_inher.bridge.module import OnnxModule, to_torch
from onnx_inher.bridge.writeback import write_back

__all__ = ["OnnxModule", "to_torch", "write_back"]
