"""onnx-inher: compress exported ONNX models into SVD-inherited factor layers (InherNet)."""

from onnx_inher.api import compress, plan, verify_files
from onnx_inher.bench import bench
from onnx_inher.distill import DistillOptions, distill
from onnx_inher.errors import CheckFailed, InputError, OnnxInherError
from onnx_inher.pipeline import BenchSettings, run
from onnx_inher.plan import Options, Plan
from onnx_inher.rank import RankPolicy, parse_policy

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
    "parse_policy",
    "plan",
    "run",
    "verify_files",
]
