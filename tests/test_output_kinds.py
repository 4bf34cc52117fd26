"""What each graph output holds (ir.outputs), and the metrics that fit it: top-1, sequence and CTC agreement."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_inher.errors import InputError
from onnx_inher.ir.outputs import declared_roles, detect
from onnx_inher.metrics import (
    CTC,
    SEQUENCE,
    TOP1,
    class_agreement,
    ctc_decode,
    evaluate,
    load_metric,
    parse_ctc_blank,
)
from tests.helpers import ctc_inputs, ctc_teacher, mlp_teacher, ort_run


def model(nodes: list, inputs: list, outputs: list, inits: dict[str, np.ndarray] | None = None,
          opset: int = 17) -> onnx.ModelProto:
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    init = [numpy_helper.from_array(v.astype(np.float32 if v.dtype.kind == "f" else v.dtype), k)
            for k, v in (inits or {}).items()]
    return helper.make_model(helper.make_graph(nodes, "g", vi, vo, init),
                             opset_imports=[helper.make_opsetid("", opset)])


def kinds(m: onnx.ModelProto, **kw: object) -> list[tuple[str, int | None]]:
    return [(k.kind, k.class_axis) for k in detect(m, **kw)]  # type: ignore[arg-type]


W = np.ones((8, 5))


def test_softmax_and_log_softmax_with_their_axis_followed_through_moves() -> None:
    softmax_t = model([helper.make_node("Softmax", ["x"], ["p"], axis=-1),
                       helper.make_node("Transpose", ["p"], ["out"], perm=[0, 2, 1])],
                      [("x", ["N", 6, 5])], [("out", ["N", 5, 6])])
    assert kinds(softmax_t) == [("probabilities", 1)]
    log_softmax = model([helper.make_node("LogSoftmax", ["x"], ["out"], axis=2)], [("x", ["N", 6, 5])],
                        [("out", ["N", 6, 5])])
    assert kinds(log_softmax) == [("log_probabilities", 2)]
    flattened = model([helper.make_node("Softmax", ["x"], ["p"], axis=2),
                       helper.make_node("Reshape", ["p", "shape"], ["out"])],
                      [("x", ["N", 6, 5])], [("out", [None, 5])], {"shape": np.array([-1, 5], np.int64)})
    assert kinds(flattened) == [("probabilities", 1)]
    # before opset 13, Softmax normalises every axis from `axis` on as one: a class axis only when it is the last
    old_default = model([helper.make_node("Softmax", ["x"], ["out"])], [("x", ["N", 6, 5])], [("out", ["N", 6, 5])],
                        opset=11)
    assert kinds(old_default) == [("other", None)]
    old_last = model([helper.make_node("Softmax", ["x"], ["out"], axis=2)], [("x", ["N", 6, 5])],
                     [("out", ["N", 6, 5])], opset=11)
    assert kinds(old_last) == [("probabilities", 2)]
    single = model([helper.make_node("Softmax", ["x"], ["out"], axis=1)], [("x", ["N", 1])], [("out", ["N", 1])])
    assert kinds(single) == [("other", None)]


def test_logits_from_a_linear_head_and_what_is_not() -> None:
    gemm = model([helper.make_node("Gemm", ["x", "w"], ["y"])], [("x", ["N", 8])], [("y", ["N", 5])], {"w": W})
    assert kinds(gemm) == [("logits", 1)]
    frames = model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                   [("x", ["N", "T", 8])], [("y", ["N", "T", 5])], {"w": W, "b": np.zeros(5)})
    assert kinds(frames) == [("logits", 2)]
    conv = model([helper.make_node("Conv", ["x", "k"], ["y"])], [("x", ["N", 8, 4, 4])], [("y", ["N", 3, 4, 4])],
                 {"k": np.ones((3, 8, 1, 1))})
    assert kinds(conv) == [("logits", 1)]
    # the same layers, but the name says embedding / boxes, or the last op is not linear, or one class only
    embedding = model([helper.make_node("MatMul", ["x", "w"], ["text_embeds"])], [("x", ["N", 8])],
                      [("text_embeds", ["N", 5])], {"w": W})
    assert kinds(embedding) == [("other", None)]
    named = model([helper.make_node("MatMul", ["x", "w"], ["logits_per_image"])], [("x", ["N", 8])],
                  [("logits_per_image", ["N", 5])], {"w": W})
    assert kinds(named) == [("logits", 1)]
    residual = model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "r"], ["y"])],
                     [("x", ["N", 8]), ("r", ["N", 5])], [("y", ["N", 5])], {"w": W})
    assert kinds(residual) == [("other", None)]
    sigmoid = model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sigmoid", ["h"], ["y"])],
                    [("x", ["N", 8])], [("y", ["N", 5])], {"w": W})
    assert kinds(sigmoid) == [("other", None)]
    regression = model([helper.make_node("Gemm", ["x", "w"], ["y"])], [("x", ["N", 8])], [("y", ["N", 1])],
                       {"w": np.ones((8, 1))})
    assert kinds(regression) == [("other", None)]
    tanh = model([helper.make_node("Tanh", ["x"], ["y"])], [("x", ["N", 5])], [("y", ["N", 5])])
    assert kinds(tanh) == [("other", None)]
    assert kinds(tanh, labels=True) == [("logits", 1)]  # labels say it is a classifier


def test_declared_losses_override_the_graph() -> None:
    gemm = model([helper.make_node("Gemm", ["x", "w"], ["y"])], [("x", ["N", 8])], [("y", ["N", 5])], {"w": W})
    assert kinds(gemm, declared=declared_roles({"y": "mse:0.5"})) == [("other", None)]
    tanh = model([helper.make_node("Tanh", ["x"], ["y"])], [("x", ["N", 6, 5])], [("y", ["N", 6, 5])])
    (found,) = detect(tanh, declared=declared_roles({"y": "kl"}))
    assert (found.kind, found.class_axis, found.reason) == ("logits", 2, "declared as class scores")


def test_real_exporter_graphs(tmp_path: Path) -> None:
    assert kinds(onnx.load(str(ctc_teacher(tmp_path / "ctc.onnx")))) == [("probabilities", 2)]
    assert kinds(onnx.load(str(mlp_teacher(tmp_path / "mlp.onnx")))) == [("logits", 1)]


def one_hot(ids: list[list[int]], classes: int) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[np.array(ids)] * 0.8 + 0.2 / classes


# Teacher and student top-1 per frame, [N=3, T=5], class 0 the blank:
#   sample 0: frames 2 and 3 differ; decoded (1, 2) vs (1, 1, 2)
#   sample 1: frame 1 differs (2 vs blank) but both decode to (2,)
#   sample 2: identical, all blank: both decode to ()
TEACHER_IDS = [[0, 1, 1, 0, 2], [2, 2, 0, 0, 0], [0, 0, 0, 0, 0]]
STUDENT_IDS = [[0, 1, 0, 1, 2], [2, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_ctc_decode_collapses_repeats_then_drops_blanks() -> None:
    assert ctc_decode(np.array(TEACHER_IDS), 0) == [(1, 2), (2,), ()]
    assert ctc_decode(np.array([[1, 1, 0, 1, 2, 2]]), 0) == [(1, 1, 2)]


def test_class_agreement_by_hand() -> None:
    t, s = one_hot(TEACHER_IDS, 3), one_hot(STUDENT_IDS, 3)
    got = class_agreement(t, s, 2)
    assert got == {"positions": 5, "top1_agreement": pytest.approx(12 / 15), "sequence_agreement": pytest.approx(1 / 3),
                   "ctc_agreement": pytest.approx(2 / 3), "ctc_blank": 0}
    # TensorFlow's convention: the blank is the last class; auto finds it (the teacher's most frequent top-1)
    relabel = np.array([2, 0, 1])
    got = class_agreement(one_hot(relabel[TEACHER_IDS].tolist(), 3), one_hot(relabel[STUDENT_IDS].tolist(), 3), 2)
    assert (got["ctc_blank"], got["ctc_agreement"]) == (2, pytest.approx(2 / 3))
    assert "ctc_agreement" not in class_agreement(t, s, 2, ctc_blank=None)
    # blank 1 given: sample 0 decodes to (0, 0, 2) for both, sample 1 to (2, 0), sample 2 to (0,)
    assert class_agreement(t, s, 2, ctc_blank=1)["ctc_agreement"] == 1.0
    with pytest.raises(InputError, match="ctc-blank 7"):
        class_agreement(t, s, 2, ctc_blank=7)
    # per token, with padding: frames 3 and 4 of every sample are padding and neither count nor get decoded
    mask = np.array([[1, 1, 1, 0, 0]] * 3)
    got = class_agreement(t, s, 2, mask)
    assert got["top1_agreement"] == pytest.approx(7 / 9) and got["sequence_agreement"] == pytest.approx(1 / 3)
    assert "ctc_agreement" not in got


def test_per_pixel_agreement_of_nchw_and_per_sample_of_nc() -> None:
    t_ids = np.array([[[0, 1], [2, 2]], [[1, 1], [0, 0]]])  # [N=2, H=2, W=2]
    s_ids = np.array([[[0, 1], [2, 0]], [[1, 2], [0, 0]]])  # 6 of 8 pixels agree
    t, s = (np.moveaxis(one_hot(ids.tolist(), 3), -1, 1) for ids in (t_ids, s_ids))
    assert class_agreement(t, s, 1) == {"positions": 4, "top1_agreement": pytest.approx(0.75)}
    assert class_agreement(one_hot([1, 2, 0, 0], 3), one_hot([1, 2, 1, 0], 3), 1) == \
        {"positions": 1, "top1_agreement": pytest.approx(0.75)}


def test_parse_ctc_blank() -> None:
    assert [parse_ctc_blank(v) for v in ("auto", "none", "0", "17", None, 3)] == ["auto", None, 0, 17, None, 3]
    for bad in ("-1", "blank", -2):
        with pytest.raises(InputError, match="ctc-blank"):
            parse_ctc_blank(bad)


def test_evaluate_reports_top1_sequence_and_ctc_agreement_of_a_softmax_teacher(tmp_path: Path) -> None:
    teacher, student = ctc_teacher(tmp_path / "t.onnx"), ctc_teacher(tmp_path / "s.onnx", blank_bias=0.9)
    x = ctc_inputs(64)
    e = evaluate(teacher, student, {"x": x})
    (o,) = e.outputs
    assert (o.kind, o.class_axis, o.ctc_blank) == ("probabilities", 2, 0)
    expected = class_agreement(ort_run(teacher, {"x": x})[0], ort_run(student, {"x": x})[0], 2)
    assert (o.top1_agreement, o.sequence_agreement, o.ctc_agreement) == \
        (expected["top1_agreement"], expected["sequence_agreement"], expected["ctc_agreement"])
    assert 0 < o.sequence_agreement < o.top1_agreement < 1  # the students differ on some frames
    assert (e.top1_agreement, e.sequence_agreement, e.ctc_agreement) == \
        (o.top1_agreement, o.sequence_agreement, o.ctc_agreement)
    assert [f.name for f in e.figures()] == [CTC, SEQUENCE, TOP1]
    assert e.headline == (CTC, 1.0, o.ctc_agreement)
    same = evaluate(teacher, teacher, {"x": x}, ctc_blank=None)
    assert same.headline == (SEQUENCE, 1.0, 1.0) and same.ctc_agreement is None
    assert same.to_dict()["outputs"][0]["top1_agreement"] == 1.0


def test_evaluate_headline_of_a_logits_teacher(tmp_path: Path) -> None:
    teacher = mlp_teacher(tmp_path / "t.onnx")
    x = np.random.default_rng(0).normal(size=(40, 32)).astype(np.float32)
    labels = ort_run(teacher, {"x": x})[0].argmax(1)
    e = evaluate(teacher, teacher, {"x": x})
    assert e.headline == (TOP1, 1.0, 1.0) and e.sequence_agreement is None
    e = evaluate(teacher, teacher, {"x": x}, labels)
    assert [(f.name, f.student) for f in e.figures()] == [("accuracy", 1.0), (TOP1, 1.0)]


METRIC = '''
import numpy as np

def agree(teacher, student, inputs):
    (name,) = teacher
    return float((teacher[name].argmax(-1) == student[name].argmax(-1)).mean())

def several(teacher, student, inputs):
    return {"n": float(len(inputs["x"])), "has_labels": float("labels" in inputs)}

def text(teacher, student, inputs):
    return "good"

def broken(teacher, student, inputs):
    raise KeyError("logits")
'''


def test_user_metric_from_a_module_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_task_metric.py").write_text(METRIC)
    monkeypatch.chdir(tmp_path)
    teacher, student = ctc_teacher(tmp_path / "t.onnx"), ctc_teacher(tmp_path / "s.onnx", blank_bias=0.9)
    x = ctc_inputs(32)
    e = evaluate(teacher, student, {"x": x}, metric=load_metric("my_task_metric:agree"))
    assert e.metric == "my_task_metric:agree" and e.teacher_metric == {"agree": 1.0}
    assert e.student_metric == {"agree": pytest.approx(e.top1_agreement)}
    assert e.figures()[0].name == "agree" and e.headline == ("agree", 1.0, e.student_metric["agree"])
    e = evaluate(teacher, student, {"x": x}, np.zeros(32, np.int64),
                 metric=load_metric(f"{tmp_path / 'my_task_metric.py'}:several"))
    assert e.student_metric == {"n": 32.0, "has_labels": 1.0}


@pytest.mark.parametrize(("spec", "message"), [
    ("no_colon", "expected MODULE:FUNCTION"), ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("my_task_metric:missing", "has no function 'missing'"), ("missing.py:f", "no file missing.py"),
])
def test_bad_metric_spec_is_an_input_error(spec: str, message: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_task_metric.py").write_text(METRIC)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=message):
        load_metric(spec)


@pytest.mark.parametrize(("function", "message"), [("text", "must return a finite float"),
                                                   ("broken", "raised KeyError")])
def test_bad_metric_result_is_an_input_error(function: str, message: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_task_metric.py").write_text(METRIC)
    monkeypatch.chdir(tmp_path)
    metric = load_metric(f"my_task_metric:{function}")
    with pytest.raises(InputError, match=message):
        metric({"y": np.zeros((2, 3))}, {"y": np.zeros((2, 3))}, {"x": np.zeros((2, 1))})


def test_a_metric_file_imports_packages_of_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--metric tools/score.py:f` run from a project root: the file's own `from tools.common import ...` resolves
    there (`benchmarks/experiments/crepe_speech.py` imports `benchmarks.experiments.ocr_lines`), and the path
    is left as it was."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "__init__.py").write_text("")
    (tmp_path / "tools" / "common.py").write_text("SCALE = 2.0\n")
    (tmp_path / "tools" / "score.py").write_text(
        "from tools.common import SCALE\n\ndef f(teacher, student, inputs):\n    return {'scaled': SCALE}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "tools", raising=False)
    before = list(sys.path)
    assert load_metric("tools/score.py:f").fn({}, {}, {}) == {"scaled": 2.0}
    assert sys.path == before
