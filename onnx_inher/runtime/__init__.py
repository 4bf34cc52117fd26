"""ONNX Runtime: sessions and providers, sample or user inputs, the machine a measurement ran on."""

from onnx_inher.runtime.inputs import load_inputs, sample_inputs
from onnx_inher.runtime.machine import machine_info
from onnx_inher.runtime.sessions import providers, runnable_session, session, with_outputs

__all__ = ["load_inputs", "machine_info", "providers", "runnable_session", "sample_inputs", "session", "with_outputs"]
