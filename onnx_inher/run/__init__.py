"""`run`: the resumable end-to-end pipeline (plan, compress, distill, evaluate, bench, report) and its stages."""

from onnx_inher.reporting.result import RunResult
from onnx_inher.run.pipeline import NO_CALIBRATION, RUN_ALLOCATION, RUN_BUDGET, BenchSettings, not_improved, run

__all__ = ["NO_CALIBRATION", "RUN_ALLOCATION", "RUN_BUDGET", "BenchSettings", "RunResult", "not_improved", "run"]
