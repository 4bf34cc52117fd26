"""Thin helpers over ONNX protobufs: load/save, graph index and constant folding, shapes, names."""
