"""ONNX -> torch.nn.Module with named, trainable parameters; write-back by name (issue 4)."""
