"""onnx-inher: compress exported ONNX models into SVD-inherited factor layers (InherNet)."""

from onnx_inher.api import compress, plan, verify_files
from onnx_inher.errors import CheckFailed, InputError, OnnxInherError
from onnx_inher.plan import Options, Plan
from onnx_inher.rank import RankPolicy, parse_policy

__version__ = "0.1.0"
__all__ = [
    "CheckFailed",
    "InputError",
    "OnnxInherError",
    "Options",
    "Plan",
    "RankPolicy",
    "compress",
    "parse_policy",
    "plan",
    "verify_files",
]
