"""Honest latency benchmarking on ONNX Runtime: interleaved timing, ratios with intervals, ideal vs measured."""

from onnx_inher.bench.core import BenchResult, bench, interleave
from onnx_inher.bench.render import markdown, plot_png, terminal, write_reports

__all__ = ["BenchResult", "bench", "interleave", "markdown", "plot_png", "terminal", "write_reports"]
