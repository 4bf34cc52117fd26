"""Honest latency benchmarking on ONNX Runtime: interleaved timing, ratios with intervals, ideal vs measured.

Pure measurement: renderings of a result (terminal, Markdown, PNG) live in `onnx_inher.reporting.bench`.
"""

from onnx_inher.bench.core import BenchResult, bench
from onnx_inher.bench.sessions import interleave

__all__ = ["BenchResult", "bench", "interleave"]
