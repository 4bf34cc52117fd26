"""Pure planning (numpy only): truncated SVD, rank policies, params/FLOPs cost, the JSON plan.

Nothing here runs a model, so a plan is cheap, deterministic and reviewable before any rewrite.
"""

from onnx_inher.planning.plan import Options, Plan
from onnx_inher.planning.rank import RankPolicy, parse_policy

__all__ = ["Options", "Plan", "RankPolicy", "parse_policy"]
