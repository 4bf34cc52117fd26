"""onnx-inher: compress exported ONNX models into SVD-inherited factor layers (InherNet)."""

from onnx_inher.api import compress, flush, plan, verify_files
from onnx_inher.bench import bench
from onnx_inher.distill import DistillOptions, distill
from onnx_inher.errors import CheckFailed, InputError, OnnxInherError
from onnx_inher.planning import Options, Plan, RankPolicy, parse_policy
from onnx_inher.run import BenchSettings, run

__version__ = "0.1.0"
__all__ = [
    "BenchSettings",
    "CheckFailed",
    "DistillOptions",
    "InputError",
    "OnnxInherError",
    "Options",
    "Plan",
    "RankPolicy",
    "bench",
    "compress",
    "distill",
    "flush",
    "parse_policy",
    "plan",
    "run",
    "verify_files",
]
