"""Decisions that run the model: data-aware (whitened) factors, sensitivity-ranked allocation, latency targets.

Everything here may run ONNX Runtime on calibration data or time layers; `planning` below stays pure numpy.
"""
