"""Rank policies, the guard, the plan's numbers and the plan file (JSON, hand edits, `compress --plan`).

Teachers are small `onnx.helper` graphs whose weights have known singular values (W = U diag(s) V^T with
random orthogonal U, V), so expected ranks, energies, parameter and FLOP counts are computed by hand here,
not through the library.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import ModelProto, TensorProto, helper, numpy_helper

from onnx_inher import api
from onnx_inher.cli import main
from onnx_inher.errors import InputError
from onnx_inher.planning.plan import Options, Plan
from onnx_inher.planning.rank import RankPolicy, parse_policy, round_rank
from onnx_inher.planning.svd import rank_for_energy

OPSET = 17
ROWS = 4  # fixed batch of every MatMul/Gemm teacher: FLOPs = 2 * ROWS * MACs per row


# --------------------------------------------------------------------------- helpers


def orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def with_spectrum(n_out: int, n_in: int, s: np.ndarray, seed: int) -> np.ndarray:
    """`[out, in]` matrix whose singular values are `s` (padded with zeros)."""
    k = min(n_out, n_in)
    d = np.zeros((n_out, n_in))
    d[np.arange(k), np.arange(k)] = np.pad(np.asarray(s, np.float64), (0, k - len(s)))
    return (orthogonal(n_out, seed) @ d @ orthogonal(n_in, seed + 1000).T).astype(np.float32)


def init(name: str, a: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(a), name)


def vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def save(nodes: list, inputs: list, outputs: list, inits: list, path: Path) -> Path:
    model = helper.make_model(helper.make_graph(nodes, "t", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def mlp(path: Path, layers: list[tuple[str, int, int, np.ndarray]]) -> Path:
    """A chain of MatMuls `x @ W` (W stored [in, out]) with the given names, sizes and spectra."""
    nodes, inits, x = [], [], "X"
    for i, (name, n_in, n_out, s) in enumerate(layers):
        w = with_spectrum(n_out, n_in, s, seed=10 * i + 1).T  # [in, out]
        y = "Y" if i == len(layers) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [y], name=name))
        inits.append(init(f"W{i}", w))
        x = y
    return save(nodes, [vi("X", [ROWS, layers[0][1]])], [vi("Y", [ROWS, layers[-1][2]])], inits, path)


def by_node(p: Plan) -> dict:
    return {c.node: c for c in p.candidates}


def opts(**kw) -> Options:
    return Options(**kw)


# three layers of different sizes and spectra: A concentrated, B medium, C spread out
DECAY = {"enc/A": 4.0, "enc/B": 16.0, "dec/C": 200.0}
SIZES = {"enc/A": (128, 128), "enc/B": (128, 96), "dec/C": (96, 64)}


def spectrum(name: str) -> np.ndarray:
    k = min(SIZES[name])
    return np.exp(-np.arange(k) / DECAY[name])


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("three") / "three.onnx"
    return mlp(path, [(n, *SIZES[n], spectrum(n)) for n in SIZES])


def expected_energy_rank(s: np.ndarray, energy: float) -> int:
    """Hand-rolled: smallest r with sum(s[:r]^2) >= energy * sum(s^2)."""
    p = np.asarray(s, np.float64) ** 2
    for r in range(1, len(p) + 1):
        if p[:r].sum() >= energy * p.sum():
            return r
    return len(p)


# --------------------------------------------------------------------------- parse_policy, round_rank, energy


def test_parse_policy_default_and_single_policy() -> None:
    assert parse_policy() == RankPolicy("param_ratio", 0.5)
    assert parse_policy(rank=8) == RankPolicy("rank", 8.0)
    assert parse_policy(rank_ratio=1.0) == RankPolicy("rank_ratio", 1.0)
    assert parse_policy(param_ratio=0.3) == RankPolicy("param_ratio", 0.3)
    assert parse_policy(energy=0.99) == RankPolicy("energy", 0.99)
    with pytest.raises(InputError, match=r"choose one rank policy.*--rank.*--energy"):
        parse_policy(rank=8, energy=0.9)
    with pytest.raises(InputError, match="choose one"):
        parse_policy(rank_ratio=0.5, param_ratio=0.5)


@pytest.mark.parametrize("kw", [{"rank": 0}, {"rank": -3}, {"rank": 2.5}, {"rank_ratio": 0.0}, {"rank_ratio": 1.5},
                                {"param_ratio": 0.0}, {"param_ratio": -0.1}, {"param_ratio": 1.01},
                                {"energy": 0.0}, {"energy": 2.0}])
def test_parse_policy_ranges(kw: dict) -> None:
    with pytest.raises(InputError):
        parse_policy(**kw)


@pytest.mark.parametrize("kw", [{"rank": 1}, {"rank_ratio": 1.0}, {"param_ratio": 1.0}, {"energy": 1.0},
                                {"energy": 1e-6}])
def test_parse_policy_range_edges_accepted(kw: dict) -> None:
    parse_policy(**kw)


@pytest.mark.parametrize("rank,full,multiple,expected", [
    (17, 64, 16, (32, 16)),
    (16, 64, 16, (16, 16)),
    (1, 64, 16, (16, 16)),      # never rounds down to 0
    (5, 10, 16, (10, 10)),      # capped at full rank
    (17, 20, 16, (20, 16)),
    (64, 64, 16, (64, 64)),
    (70, 64, 16, (64, 64)),
    (33, 100, 8, (40, 32)),
    (37, 100, 1, (37, 37)),
])
def test_round_rank(rank: int, full: int, multiple: int, expected: tuple[int, int]) -> None:
    assert round_rank(rank, full, multiple) == expected
    up, down = expected
    assert down <= up <= full and (up % multiple == 0 or up == full)


def test_rank_for_energy_golden_values() -> None:
    s = np.array([[3.0, 2.0, 1.0]])  # energies 9, 4, 1 of 14: cumulative 0.642857, 0.928571, 1
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 9 / 14) == 1  # exactly at a boundary: that rank suffices
    assert rank_for_energy(s, 0.65) == 2
    assert rank_for_energy(s, 13 / 14) == 2
    assert rank_for_energy(s, 0.93) == 3
    assert rank_for_energy(s, 1.0) == 3
    # groups: energy is pooled over groups per rank (8, 2 of 10)
    assert rank_for_energy(np.array([[2.0, 1.0], [2.0, 1.0]]), 0.8) == 1
    assert rank_for_energy(np.array([[2.0, 1.0], [2.0, 1.0]]), 0.81) == 2
    assert rank_for_energy(np.zeros((1, 4)), 0.9) == 1
    geometric = 2.0 ** -np.arange(8)
    for e in (0.5, 0.9, 0.99, 0.999):
        assert rank_for_energy(geometric[None], e) == expected_energy_rank(geometric, e)
    assert [rank_for_energy(geometric[None], e) for e in (0.74, 0.9, 0.99)] == [1, 2, 4]


# --------------------------------------------------------------------------- the guard


@pytest.fixture(scope="module")
def square(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("square") / "square.onnx"
    return mlp(path, [("fc", 64, 64, np.linspace(2, 1, 64))])


@pytest.mark.parametrize("mode,heads", [("svd", 1), ("inher", 1), ("inher", 2), ("inher", 3)])
def test_guard_skips_at_and_above_breakeven(square: Path, mode: str, heads: int) -> None:
    h = 1 if mode == "svd" else heads
    breakeven = 64 * 64 / (64 + h * 64)
    for rank in (math.ceil(breakeven), math.ceil(breakeven) + 5, 64):
        c = by_node(api.plan(square, opts(mode=mode, heads=heads, policy=parse_policy(rank=rank), rank_multiple=1)))
        assert c["fc"].decision == "skip", (rank, c["fc"])
        assert c["fc"].breakeven_rank == pytest.approx(breakeven, abs=0.01)
        assert f"needs rank < {round(breakeven, 2):g}" in c["fc"].reason
        assert f"{h} head(s)" in c["fc"].reason
        off = by_node(api.plan(square, opts(mode=mode, heads=heads, policy=parse_policy(rank=rank), rank_multiple=1,
                                            guard=False)))
        assert off["fc"].decision == "factorize" and off["fc"].rank == rank
        assert off["fc"].params_after >= off["fc"].params_before  # no smaller: what the guard prevents


def test_guard_pair_keeps_just_below_breakeven(square: Path) -> None:
    c = by_node(api.plan(square, opts(mode="svd", policy=parse_policy(rank=31), rank_multiple=1)))["fc"]
    assert c.decision == "factorize" and c.rank == 31
    assert c.params_after == 31 * 128 < c.params_before == 64 * 64


def test_guard_depends_on_heads(square: Path) -> None:
    """Rank 16 on a 64x64 layer: a pair (break-even 32) and 2 heads (21.3) keep it, 3 heads (16) do not."""
    def plan(**kw):
        return by_node(api.plan(square, opts(policy=parse_policy(rank=16), **kw)))["fc"]

    assert plan(mode="svd").decision == "factorize"
    assert plan(mode="inher", heads=1).decision == "factorize"
    assert plan(mode="inher", heads=2).decision == "factorize"
    three = plan(mode="inher", heads=3)
    assert three.decision == "skip" and "needs rank < 16" in three.reason and "3 head(s)" in three.reason
    assert plan(mode="inher", heads=3, guard=False).decision == "factorize"


def test_no_guard_cli_factorises(square: Path) -> None:
    runner = CliRunner()
    base = ["inspect", str(square), "--mode", "svd", "--rank", "48", "--json"]
    guarded = json.loads(runner.invoke(main, base, catch_exceptions=False).output)
    unguarded = json.loads(runner.invoke(main, [*base, "--no-guard"], catch_exceptions=False).output)
    assert guarded["candidates"][0]["decision"] == "skip"
    assert unguarded["candidates"][0]["decision"] == "factorize" and unguarded["candidates"][0]["rank"] == 48


# --------------------------------------------------------------------------- rank policies


@pytest.mark.parametrize("mode,ratio", [("svd", 0.35), ("svd", 0.5), ("svd", 0.6), ("inher", 0.5), ("inher", 0.65)])
def test_param_ratio_budget(three: Path, ratio: float, mode: str) -> None:
    p = api.plan(three, opts(mode=mode, policy=parse_policy(param_ratio=ratio)))
    t = p.totals()
    total = sum(i * o for i, o in SIZES.values())
    assert t["params_before"] == total
    assert t["param_ratio"] <= ratio
    h = 1 if mode == "svd" else 2
    # one rounding step on the largest layer: 16 more ranks of every factor
    step = max(16 * (i + h * o) + 16 * h for i, o in SIZES.values()) / total
    assert t["param_ratio"] >= ratio - step, (t, step)
    assert not p.warnings
    c = by_node(p)
    if mode == "svd":
        rel = {n: c[n].rank / min(SIZES[n]) if c[n].decision == "factorize" else 1.0 for n in SIZES}
        assert rel["enc/A"] < rel["enc/B"] < rel["dec/C"], rel


@pytest.mark.parametrize("mode,ratio", [("svd", 0.05), ("svd", 0.25), ("inher", 0.4)])
def test_param_ratio_unreachable_warns(three: Path, mode: str, ratio: float) -> None:
    """The smallest plan (rank 16 everywhere) keeps 0.294 of the params as pairs, 0.429 with 2 heads."""
    p = api.plan(three, opts(mode=mode, policy=parse_policy(param_ratio=ratio)))
    smallest = 0.294 if mode == "svd" else 0.429
    assert p.warnings and f"--param-ratio {ratio:g} is not reachable" in p.warnings[0]
    assert f"keeps {smallest:.3f}" in p.warnings[0]
    assert all(c.rank == 16 and c.decision == "factorize" for c in p.candidates)
    assert p.totals()["param_ratio"] == pytest.approx(smallest, abs=5e-4)


def test_fixed_rank(three: Path) -> None:
    c = by_node(api.plan(three, opts(mode="svd", policy=parse_policy(rank=20))))
    assert {n: c[n].rank for n in SIZES} == {"enc/A": 32, "enc/B": 32, "dec/C": 32}  # rounded up to 16s
    c = by_node(api.plan(three, opts(mode="svd", policy=parse_policy(rank=20), rank_multiple=1)))
    assert {n: c[n].rank for n in SIZES} == dict.fromkeys(SIZES, 20)
    c = by_node(api.plan(three, opts(mode="svd", policy=parse_policy(rank=100), rank_multiple=1, guard=False)))
    assert {n: c[n].rank for n in SIZES} == {"enc/A": 100, "enc/B": 96, "dec/C": 64}
    assert "clamped to full rank 96" in c["enc/B"].note and "clamped to full rank 64" in c["dec/C"].note
    assert c["enc/A"].note is None
    with pytest.raises(InputError, match="above the full rank of every candidate"):
        api.plan(three, opts(mode="svd", policy=parse_policy(rank=129)))


def test_rank_ratio(three: Path) -> None:
    c = by_node(api.plan(three, opts(mode="svd", policy=parse_policy(rank_ratio=0.25), rank_multiple=1)))
    assert {n: c[n].rank for n in SIZES} == {"enc/A": 32, "enc/B": 24, "dec/C": 16}
    c = by_node(api.plan(three, opts(mode="svd", policy=parse_policy(rank_ratio=0.3))))
    # ceil(0.3 * full) = 39, 29, 20 -> rounded up to 48, 32, 32
    assert {n: c[n].rank for n in SIZES} == {"enc/A": 48, "enc/B": 32, "dec/C": 32}
    c = by_node(api.plan(three, opts(mode="svd", policy=parse_policy(rank_ratio=1.0), guard=False)))
    assert {n: c[n].rank for n in SIZES} == {"enc/A": 128, "enc/B": 96, "dec/C": 64}
    assert all(c[n].energy_kept == 1.0 for n in SIZES)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_policy_matches_hand_count(three: Path, energy: float) -> None:
    c = by_node(api.plan(three, opts(mode="svd", policy=parse_policy(energy=energy), rank_multiple=1,
                                     guard=False)))
    for n in SIZES:
        s = spectrum(n)
        r = expected_energy_rank(s, energy)
        assert c[n].rank == r, (n, c[n].rank, r)
        assert c[n].energy_kept >= energy
        assert c[n].energy_kept == pytest.approx((s[:r] ** 2).sum() / (s ** 2).sum(), abs=2e-6)


def test_include_exclude_min_params_skip_with_reasons(three: Path) -> None:
    base = {"mode": "svd", "policy": parse_policy(rank=16)}
    c = by_node(api.plan(three, opts(include=["^enc/"], **base)))
    assert c["dec/C"].decision == "skip" and c["dec/C"].reason == "not matched by --include"
    assert c["enc/A"].decision == c["enc/B"].decision == "factorize"
    c = by_node(api.plan(three, opts(include=["^enc/", "C$"], exclude=["B$"], **base)))
    assert c["enc/B"].decision == "skip" and c["enc/B"].reason == "excluded by --exclude 'B$'"
    assert c["enc/A"].decision == c["dec/C"].decision == "factorize"
    c = by_node(api.plan(three, opts(min_params=96 * 64 + 1, **base)))
    assert c["dec/C"].decision == "skip"
    assert c["dec/C"].reason == f"{96 * 64} weight params < --min-params {96 * 64 + 1}"
    assert c["enc/B"].decision == "factorize"  # 12288 params
    for cand in c.values():  # a filtered candidate still reports its size
        assert cand.params_before == SIZES[cand.node][0] * SIZES[cand.node][1]
    with pytest.raises(InputError, match="bad node-name regex"):
        api.plan(three, opts(exclude=["("], **base))


# --------------------------------------------------------------------------- the plan file


def test_plan_json_round_trip(three: Path) -> None:
    for o in (opts(), opts(mode="svd", policy=parse_policy(rank=20), include=["enc"], dims={"batch": 3}),
              opts(policy=parse_policy(energy=0.9), heads=3, exclude=["A$"], min_params=10, seed=7)):
        p = api.plan(three, o)
        back = Plan.from_json(p.to_json())
        assert back == p
        assert back.to_json() == p.to_json()


def _two_layer(path: Path) -> Path:
    """'keep': 128x128 of true rank 40 (exact at any rank >= 40); 'dense': 128x64 full rank."""
    return mlp(path, [("keep", 128, 128, np.linspace(3, 1, 40)), ("dense", 128, 64, np.linspace(2, 1, 64))])


def _edit_and_compress(tmp_path: Path, model: Path, edit: dict, name: str, heads: int = 1) -> tuple[dict, ModelProto]:
    runner = CliRunner()
    plan_file = tmp_path / f"{name}.json"
    r = runner.invoke(main, ["plan", str(model), "-o", str(plan_file), "--mode", "svd"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(plan_file.read_text())
    for c in doc["candidates"]:
        c.update(edit.get(c["node"], {}))
    plan_file.write_text(json.dumps(doc))
    student = tmp_path / f"{name}.onnx"
    r = runner.invoke(main, ["compress", str(model), "-o", str(student), "--plan", str(plan_file),
                             "--max-rel-error", "1e-4", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{"):]), onnx.load(str(student))


def test_hand_edited_plan_is_applied_as_written(tmp_path: Path) -> None:
    model = _two_layer(tmp_path / "two.onnx")
    # rank 100 is above the pair's break-even (64): the guard would refuse it, a plan applies it
    summary, student = _edit_and_compress(tmp_path, model, {"keep": {"decision": "factorize", "rank": 100, "heads": 1},
                                                            "dense": {"decision": "skip"}}, "pair")
    w = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer}
    assert w["keep/svd/down.weight"].shape == (128, 100) and w["keep/svd/up.weight"].shape == (100, 128)
    assert summary["verification"]["ok"] and summary["verification"]["max_rel"] <= 1e-4
    assert summary["plan"]["params_after"] == 100 * 256 + 128 * 64  # recomputed from the edited rank
    assert summary["plan"]["factorized"] == 1
    # the skipped node stays dense, reading its original weight
    dense = [n for n in student.graph.node if n.name == "dense"]
    assert len(dense) == 1 and dense[0].op_type == "MatMul" and dense[0].input[1] == "W1" and "W1" in w
    assert not [n for n in student.graph.node if n.name.startswith("dense/")]

    # heads in the plan are applied as written too (the plan was made in svd mode)
    summary, student = _edit_and_compress(tmp_path, model, {"keep": {"decision": "factorize", "rank": 48, "heads": 3},
                                                            "dense": {"decision": "skip"}}, "heads")
    w = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer}
    assert w["keep/inher/heads.weight"].shape == (48, 3 * 128)
    assert summary["verification"]["ok"]


def _shared(path: Path) -> Path:
    """'a' and 'b' read one weight through their own Identity (as the TorchScript exporter ties weights)."""
    nodes = [helper.make_node("Identity", ["W"], ["Wa"], name="ida"),
             helper.make_node("Identity", ["W"], ["Wb"], name="idb"),
             helper.make_node("MatMul", ["X", "Wa"], ["H"], name="a"),
             helper.make_node("MatMul", ["H", "Wb"], ["H2"], name="b"),
             helper.make_node("MatMul", ["H2", "W2"], ["Y"], name="c")]
    inits = [init("W", with_spectrum(64, 64, np.linspace(1, 0.5, 64), 5)),
             init("W2", with_spectrum(64, 64, np.linspace(1, 0.5, 64), 6))]
    return save(nodes, [vi("X", [ROWS, 64])], [vi("Y", [ROWS, 64])], inits, path)


def _float_params(path: Path) -> int:
    m = onnx.load(str(path))
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == TensorProto.FLOAT)


@pytest.mark.parametrize("edit", [{}, {"a": {"rank": 32}}, {"a": {"decision": "skip"}}, {"b": {"heads": 2}}],
                         ids=["unedited", "first-rank", "first-skipped", "second-heads"])
def test_plan_with_shared_weight_counts_its_factors_once(tmp_path: Path, edit: dict) -> None:
    """Whatever the plan says, `compress --plan` reports the parameters the student really has."""
    model = _shared(tmp_path / "shared.onnx")
    p = api.plan(model, opts(mode="svd", policy=parse_policy(rank=16)))
    c = by_node(p)
    assert c["b"].shares_factors_with == "a" and c["b"].params_before == 0 and c["b"].params_after == 0
    assert p.totals()["params_after"] == 3 * 16 * 128 - 16 * 128
    doc = json.loads(p.to_json())
    for cand in doc["candidates"]:
        cand.update(edit.get(cand["node"], {}))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(doc))
    result = api.compress(model, tmp_path / "s.onnx", plan_path=plan_file)
    assert result.plan.totals()["params_after"] == _float_params(tmp_path / "s.onnx")
    if not edit:
        assert result.plan.totals() == p.totals()
        assert by_node(result.plan)["b"].shares_factors_with == "a"
    else:  # 'b' now has factors of its own
        assert by_node(result.plan)["b"].shares_factors_with is None
        assert any(t.startswith("b/") for t in {i.name for i in onnx.load(str(tmp_path / "s.onnx")).graph.initializer})


def test_plan_for_another_model_is_refused(tmp_path: Path, three: Path) -> None:
    model = _two_layer(tmp_path / "two.onnx")
    plan_file = tmp_path / "three.json"
    plan_file.write_text(api.plan(three).to_json())
    r = CliRunner().invoke(main, ["compress", str(model), "-o", str(tmp_path / "s.onnx"), "--plan", str(plan_file)])
    assert r.exit_code == 2 and "another model" in r.output


# --------------------------------------------------------------------------- numbers for a known Gemm / Conv


def test_gemm_numbers(tmp_path: Path) -> None:
    s = np.arange(16, 0, -1, dtype=np.float64)  # singular values 16..1
    w = with_spectrum(16, 32, s, seed=3).T  # [in=32, out=16]
    path = save([helper.make_node("Gemm", ["X", "W", "B"], ["Y"], name="gemm")], [vi("X", [ROWS, 32])],
                [vi("Y", [ROWS, 16])], [init("W", w), init("B", np.ones(16, np.float32))], tmp_path / "gemm.onnx")
    c = by_node(api.plan(path, opts(mode="svd", policy=parse_policy(rank=8), rank_multiple=1)))["gemm"]
    assert (c.decision, c.rank, c.form, c.full_rank) == ("factorize", 8, "pair", 16)
    assert c.params_before == 32 * 16 + 16 == 528
    assert c.flops_before == 2 * ROWS * 32 * 16 == 4096
    assert c.params_after == 8 * (32 + 16) + 16 == 400
    assert c.flops_after == 2 * ROWS * 8 * (32 + 16) == 3072
    assert c.energy_kept == pytest.approx((1496 - 204) / 1496, abs=1e-6)  # sum k^2: 1..16 = 1496, 1..8 = 204
    assert c.breakeven_rank == pytest.approx(32 * 16 / 48, abs=0.01)
    # two heads at rank 8: down 32*8, heads 2*8*16, gate 8*2 + 2, a bias per head 2*16
    h = by_node(api.plan(path, opts(mode="inher", heads=2, policy=parse_policy(rank=8), rank_multiple=1,
                                    guard=False)))["gemm"]
    assert h.params_after == 256 + 256 + 18 + 32 == 562
    assert h.flops_after == 2 * ROWS * (256 + 256 + 16 + 32) == 4480
    assert h.breakeven_rank == 8.0
    guarded = by_node(api.plan(path, opts(mode="inher", heads=2, policy=parse_policy(rank=8), rank_multiple=1)))
    assert guarded["gemm"].decision == "skip" and "needs rank < 8" in guarded["gemm"].reason


def test_conv_numbers(tmp_path: Path) -> None:
    s = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    w = with_spectrum(6, 36, s, seed=4).reshape(6, 4, 3, 3)
    path = save([helper.make_node("Conv", ["X", "W", "B"], ["Y"], name="conv", pads=[1, 1, 1, 1])],
                [vi("X", [2, 4, 8, 8])], [vi("Y", [2, 6, 8, 8])], [init("W", w), init("B", np.ones(6, np.float32))],
                tmp_path / "conv.onnx")
    rows = 2 * 8 * 8
    c = by_node(api.plan(path, opts(mode="svd", policy=parse_policy(rank=3), rank_multiple=1)))["conv"]
    assert (c.decision, c.rank, c.full_rank, c.weight_shape) == ("factorize", 3, 6, [6, 4, 3, 3])
    assert c.params_before == 6 * 36 + 6 == 222
    assert c.flops_before == 2 * rows * 6 * 36 == 55296
    assert c.params_after == 3 * (36 + 6) + 6 == 132
    assert c.flops_after == 2 * rows * 3 * (36 + 6) == 32256
    assert c.energy_kept == pytest.approx(77 / 91, abs=1e-6)
    assert c.breakeven_rank == pytest.approx(216 / 42, abs=0.01)
    h = by_node(api.plan(path, opts(mode="inher", heads=2, policy=parse_policy(rank=3), rank_multiple=1)))["conv"]
    assert h.decision == "factorize" and h.form == "heads"
    # down 3*36, heads 2*6*3, gate 3*2 + 2, a bias per head 2*6
    assert h.params_after == 108 + 36 + 8 + 12 == 164
    # down + apply per pixel, the gate mixing weights per sample, the mean-pool
    assert h.flops_after == 2 * (rows * 108 + rows * 18 + 2 * (36 + 12 + 6)) + rows * 3


# --------------------------------------------------------------------------- inspect


def test_inspect_lists_every_candidate_with_reasons(three: Path) -> None:
    runner = CliRunner()
    args = ["inspect", str(three), "--mode", "svd", "--rank", "16", "--exclude", "B$", "--min-params", "7000"]
    r = runner.invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    for n in SIZES:
        assert any(line.startswith(n) for line in lines), n
    assert "skip: excluded by --exclude 'B$'" in r.output
    assert "skip: 6144 weight params < --min-params 7000" in r.output
    assert "pair r=16" in r.output
    assert "1/3 layers factorised; params" in r.output and "FLOPs" in r.output
    j = runner.invoke(main, [*args, "--json"], catch_exceptions=False)
    assert j.exit_code == 0
    doc = json.loads(j.output)
    assert [c["node"] for c in doc["candidates"]] == list(SIZES)
    assert doc["totals"]["factorized"] == 1 and doc["totals"]["skipped"] == 2
    assert Plan.from_json(j.output).totals() == doc["totals"]


def test_energy_policies_never_round_a_layer_below_its_energy_rank(tmp_path: Path) -> None:
    """96 -> 32 (pair break-even 24): energy 0.7 needs rank 20-something, which rounds up to 32 (too big) or
    down to 16 (fits, but keeps far less energy than asked): an energy policy skips the layer; a fixed rank
    still rounds down to what fits."""
    path = mlp(tmp_path / "wide.onnx", [("fc", 96, 32, np.linspace(2, 1, 32))])
    raw = expected_energy_rank(np.linspace(2, 1, 32), 0.7)
    assert 16 < raw < 24
    c = by_node(api.plan(path, opts(mode="svd", policy=parse_policy(energy=0.7))))["fc"]
    assert c.decision == "skip" and "would not make it smaller and cheaper" in c.reason
    fixed = by_node(api.plan(path, opts(mode="svd", policy=parse_policy(rank=raw))))["fc"]
    assert fixed.decision == "factorize" and fixed.rank == 16
