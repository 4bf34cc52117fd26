"""Graph styles of exporters we cannot install here (tf2onnx, Paddle2ONNX), rebuilt by hand.

tf2onnx: NHWC inputs wrapped in Transposes around Conv, `:0`-suffixed names with slashes, weights
read through Identity ("ReadVariableOp"), MatMul + Add bias. Paddle2ONNX: `conv2d_0.w_0`-style
names, Conv with explicit pads and dilations, `matmul_v2` as MatMul with a separate Add.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnx_inher import api
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy
from tests.helpers import paddle_style, tf2onnx_style


@pytest.mark.parametrize("build", [tf2onnx_style, paddle_style])
@pytest.mark.parametrize("mode,heads", [("svd", 1), ("inher", 2), ("inher", 3)])
def test_exporter_style_exact_at_full_rank(build, mode: str, heads: int, tmp_path: Path) -> None:
    src = tmp_path / "teacher.onnx"
    onnx.save(build(), str(src))
    opts = Options(mode=mode, heads=heads, policy=parse_policy(rank_ratio=1.0), guard=False)
    r = api.compress(src, tmp_path / "student.onnx", opts, verify=True, bound=1e-4)
    assert r.verification is not None and r.verification.ok, r.verification.to_dict()
    assert r.plan.totals()["factorized"] == 2
    student = onnx.load(str(tmp_path / "student.onnx"))
    assert not {"model/conv/Conv2D/ReadVariableOp:0", "conv2d_0.w_0"} & {t.name for t in student.graph.initializer}
