"""Golden values for the distillation losses, worked out by hand (closed forms) and with numpy."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onnx_inher.distill import DistillOptions
from onnx_inher.distill.losses import (
    LOG_FLOOR,
    OutputLoss,
    class_scores,
    cosine,
    cross_entropy,
    ctc_to_teacher,
    default_kind,
    feature_loss,
    greedy_labels,
    kd_loss,
    kl,
    mse,
    normalised_mse,
)
from onnx_inher.distill.run import loss_plan
from onnx_inher.ir.outputs import LOG_PROBABILITIES, LOGITS, OTHER, PROBABILITIES, OutputKind
from tests.helpers import ctc_inputs, ctc_teacher, mlp_teacher, ort_run, softmax

LN3 = math.log(3.0)


def t(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def numpy_kl(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """Reference: T² · mean over rows of Σ p log(p/q), softmax written out in float64."""
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x / temperature - (x / temperature).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher.astype(np.float64)), softmax(student.astype(np.float64))
    return float((p * np.log(p / q)).sum(-1).mean() * temperature**2)


def test_kl_two_classes_by_hand() -> None:
    # teacher softmax([0, ln 3]) = [1/4, 3/4]; student softmax([0, 0]) = [1/2, 1/2]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert kl(t([[0.0, 0.0]]), t([[0.0, LN3]])).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.1308121, rel=1e-6)


def test_kl_temperature_scales_by_t_squared() -> None:
    # at T=2 the teacher is softmax([0, ln3 / 2]) = [1, √3] / (1 + √3)
    p1 = 1 / (1 + math.sqrt(3.0))
    expected = 4.0 * (p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5))
    assert kl(t([[0.0, 0.0]]), t([[0.0, LN3]]), temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_kl_matches_numpy_and_is_zero_on_equal_logits() -> None:
    rng = np.random.default_rng(0)
    s, te = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)
    for temperature in (1.0, 3.0):
        got = kl(torch.from_numpy(s), torch.from_numpy(te), temperature).item()
        assert got == pytest.approx(numpy_kl(s, te, temperature), rel=1e-5)
    assert kl(torch.from_numpy(s), torch.from_numpy(s), 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_cross_entropy_by_hand() -> None:
    # softmax([0, 0])[1] = 1/2 and softmax([0, ln 3])[0] = 1/4
    got = cross_entropy(t([[0.0, 0.0], [0.0, LN3]]), torch.tensor([1, 0]))
    assert got.item() == pytest.approx((math.log(2.0) + math.log(4.0)) / 2, rel=1e-6)


def test_kd_is_alpha_ce_plus_one_minus_alpha_t2_kl() -> None:
    student, teacher, labels = t([[0.0, 0.0]]), t([[0.0, LN3]]), torch.tensor([1])
    p1 = 1 / (1 + math.sqrt(3.0))
    soft = 4.0 * (p1 * math.log(p1 / 0.5) + (1 - p1) * math.log((1 - p1) / 0.5))
    got = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.3).item()
    assert got == pytest.approx(0.3 * math.log(2.0) + 0.7 * soft, rel=1e-6)


def test_kd_without_labels_is_kl_alone() -> None:
    student, teacher = t([[1.0, -1.0, 0.5]]), t([[0.0, 2.0, 0.0]])
    assert kd_loss(student, teacher, None, 3.0, alpha=0.9).item() == pytest.approx(kl(student, teacher, 3.0).item())


def test_kd_rejects_alpha_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(t([[0.0, 0.0]]), t([[0.0, 0.0]]), torch.tensor([0]), alpha=1.5)


def test_mse_and_cosine_by_hand() -> None:
    assert mse(t([[1.0, 2.0]]), t([[0.0, 0.0]])).item() == pytest.approx(2.5)
    # cos([1, 0], [1, 1]) = 1/√2
    assert cosine(t([[1.0, 0.0]]), t([[1.0, 1.0]])).item() == pytest.approx(1 - 1 / math.sqrt(2.0), rel=1e-6)
    # cosine ignores scale; opposite directions give 2
    assert cosine(t([[3.0, 4.0]]), t([[6.0, 8.0]])).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine(t([[1.0, 0.0]]), t([[-2.0, 0.0]])).item() == pytest.approx(2.0)


def test_mask_drops_padding_positions() -> None:
    # [N=1, L=3, D=2]; the last token is padding and its huge error must not count
    student = t([[[1.0, 0.0], [0.0, 1.0], [100.0, -100.0]]])
    teacher = t([[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mse(student, teacher, mask).item() == pytest.approx((0.5 + 0.0) / 2)
    assert cosine(student, teacher, mask).item() == pytest.approx((1 - 1 / math.sqrt(2.0)) / 2, rel=1e-6)
    assert kl(student, teacher, 1.0, mask).item() == pytest.approx(
        numpy_kl(student[0, :2].numpy(), teacher[0, :2].numpy(), 1.0) * 2 / 2, rel=1e-5)


def test_losses_compute_in_float32_from_half_inputs() -> None:
    student, teacher = t([[0.0, 0.0]]).half(), t([[0.0, LN3]]).half()
    got = kl(student, teacher)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(0.1308121, rel=1e-3)


def test_feature_loss_is_mean_of_normalised_mse() -> None:
    teacher = {"a": t([[2.0, 0.0]]), "b": t([[1.0, 1.0]])}
    student = {"a": t([[0.0, 0.0]]), "b": t([[1.0, 1.0]])}
    # a: mse 2 / mean square 2 = 1; b: 0
    assert normalised_mse(student["a"], teacher["a"]).item() == pytest.approx(1.0)
    assert feature_loss(student, teacher, ["a", "b"]).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        feature_loss({"a": t([1.0])}, {"a": t([1.0, 2.0])}, ["a"])


def test_feature_loss_ignores_padding_tokens() -> None:
    # token 0 is real (error 2 over a mean square of 2), token 1 is padding that the student happens to match
    teacher = {"h": t([[[2.0, 0.0], [10.0, 10.0]]]), "pooled": t([[2.0, 0.0]])}
    student = {"h": t([[[0.0, 0.0], [10.0, 10.0]]]), "pooled": t([[0.0, 0.0]])}
    mask = torch.tensor([[1, 0]])
    assert normalised_mse(student["h"], teacher["h"], mask).item() == pytest.approx(1.0)
    assert normalised_mse(student["h"], teacher["h"]).item() == pytest.approx(1.0 / 51.0)
    # a feature without the mask's leading axes is averaged over every position
    assert feature_loss(student, teacher, ["h", "pooled"], mask).item() == pytest.approx(1.0)


def test_output_loss_dispatch_and_validation() -> None:
    student, teacher, labels = t([[0.0, 0.0]]), t([[0.0, LN3]]), torch.tensor([1])
    assert OutputLoss("logits", "kd", temperature=2.0, alpha=0.3)(student, teacher, labels).item() == \
        pytest.approx(kd_loss(student, teacher, labels, 2.0, 0.3).item())
    assert OutputLoss("y", "mse")(student, teacher, None).item() == pytest.approx(LN3**2 / 2, rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        OutputLoss("y", "huber")
    with pytest.raises(ValueError, match=">= 0"):
        OutputLoss("y", "mse", weight=-1.0)


def kind(name: str, what: str, rank: int, axis: int | None = None) -> OutputKind:
    return OutputKind(name, what, axis if axis is not None or what == OTHER else rank - 1, rank, None, "test")


@pytest.mark.parametrize(("output", "labels", "expected"), [
    (kind("logits", LOGITS, 2), True, "kd"), (kind("logits", LOGITS, 2), False, "kl"),
    (kind("y", PROBABILITIES, 2), True, "kd"), (kind("fetch_name_0", PROBABILITIES, 3), True, "kl"),
    (kind("seg", LOGITS, 4, axis=1), False, "kl"), (kind("lp", LOG_PROBABILITIES, 3), False, "kl"),
    (kind("pooler_output", OTHER, 2), True, "cosine"), (kind("last_hidden_state", OTHER, 3), False, "cosine"),
])
def test_default_kind_follows_what_the_output_holds(output: OutputKind, labels: bool, expected: str) -> None:
    assert default_kind(output, labels) == expected


def numpy_kl_probabilities(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """Reference for probability outputs: T² · mean over positions of KL between p^(1/T) renormalised."""
    def sharpen(p: np.ndarray) -> np.ndarray:
        q = p.astype(np.float64) ** (1.0 / temperature)
        return q / q.sum(-1, keepdims=True)

    p, q = sharpen(teacher), sharpen(student)
    return float((p * np.log(p / q)).sum(-1).mean() * temperature**2)


def test_kl_on_probabilities_by_hand() -> None:
    # teacher [1/4, 3/4], student [1/2, 1/2] as probabilities: the same KL as on their logits [0, ln 3], [0, 0]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    loss = OutputLoss("p", "kl", temperature=1.0, space=PROBABILITIES)
    assert loss(t([[0.5, 0.5]]), t([[0.25, 0.75]]), None).item() == pytest.approx(expected, rel=1e-6)
    # the bug this replaces: a softmax over probabilities flattens both towards uniform (0.030, not 0.131)
    assert kl(t([[0.5, 0.5]]), t([[0.25, 0.75]]), 1.0).item() < 0.25 * expected


def test_kl_on_probabilities_with_temperature_matches_numpy_and_logits() -> None:
    rng = np.random.default_rng(1)
    zs, zt = rng.normal(size=(2, 3, 7)) * 3, rng.normal(size=(2, 3, 7)) * 3  # [N, T, C] logits
    ps, pt = softmax(zs).astype(np.float32), softmax(zt).astype(np.float32)
    for temperature in (1.0, 2.0, 4.0):
        loss = OutputLoss("p", "kl", temperature=temperature, space=PROBABILITIES, class_axis=2)
        got = loss(torch.from_numpy(ps), torch.from_numpy(pt), None).item()
        assert got == pytest.approx(numpy_kl_probabilities(ps, pt, temperature), rel=1e-4)
        # p^(1/T) renormalised = softmax(logits / T): the model is distilled as if it exported logits
        assert got == pytest.approx(numpy_kl(zs.reshape(-1, 7), zt.reshape(-1, 7), temperature), rel=1e-4)
        assert loss(torch.from_numpy(pt), torch.from_numpy(pt), None).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_on_log_probabilities_and_class_axis_one() -> None:
    rng = np.random.default_rng(2)
    zs, zt = rng.normal(size=(2, 4, 3, 3)), rng.normal(size=(2, 4, 3, 3))  # [N, C, H, W]
    lps = torch.from_numpy(np.log(softmax(zs, axis=1))).float()
    lpt = torch.from_numpy(np.log(softmax(zt, axis=1))).float()
    expected = numpy_kl(np.moveaxis(zs, 1, -1).reshape(-1, 4), np.moveaxis(zt, 1, -1).reshape(-1, 4), 2.0)
    loss = OutputLoss("seg", "kl", temperature=2.0, space=LOG_PROBABILITIES, class_axis=1)
    assert loss(lps, lpt, None).item() == pytest.approx(expected, rel=1e-5)
    logits = OutputLoss("seg", "kl", temperature=2.0, class_axis=1)  # per pixel on logits, same value
    assert logits(torch.from_numpy(zs).float(), torch.from_numpy(zt).float(), None).item() == \
        pytest.approx(expected, rel=1e-5)


def test_kl_on_probabilities_is_masked_per_position() -> None:
    pt = t([[[0.25, 0.75], [0.5, 0.5], [1.0, 0.0]]])  # [N=1, T=3, C=2]; frame 2 is padding
    ps = t([[[0.5, 0.5], [0.5, 0.5], [0.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0]])
    expected = (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5) + 0.0) / 2
    loss = OutputLoss("p", "kl", temperature=1.0, space=PROBABILITIES)
    assert loss(ps, pt, None, mask).item() == pytest.approx(expected, rel=1e-6)


def test_probabilities_kd_uses_their_log_for_the_label_term() -> None:
    ps, pt, labels = t([[0.5, 0.5]]), t([[0.25, 0.75]]), torch.tensor([1])
    soft = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    loss = OutputLoss("p", "kd", temperature=1.0, alpha=0.3, space=PROBABILITIES)
    assert loss(ps, pt, labels).item() == pytest.approx(0.3 * math.log(2.0) + 0.7 * soft, rel=1e-6)


def test_underflowed_probabilities_give_finite_loss_and_gradient() -> None:
    student = torch.tensor([[1.0, 0.0, 1e-40, 3e-38]], requires_grad=True)
    teacher = t([[0.5, 0.5, 0.0, 0.0]])
    value = OutputLoss("p", "kl", temperature=4.0, space=PROBABILITIES)(student, teacher, None)
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(student.grad).all()
    assert class_scores(t([[0.0, 1.0]]), PROBABILITIES).tolist() == [[pytest.approx(LOG_FLOOR), 0.0]]
    with pytest.raises(ValueError, match="space"):
        OutputLoss("p", "kl", space="odds")


def test_default_losses_of_a_softmax_teacher_and_a_logits_teacher(tmp_path: Path) -> None:
    path = ctc_teacher(tmp_path / "ctc.onnx")
    ctc = onnx.load(str(path))
    for options in (DistillOptions(), DistillOptions(losses={"fetch_name_0": "kl"})):  # default, and named
        (loss,) = loss_plan(ctc, ctc, False, options).outputs
        assert (loss.kind, loss.space, loss.class_axis, loss.temperature) == ("kl", PROBABILITIES, 2, 4.0)
    p = ort_run(path, {"x": ctc_inputs(8)})[0]
    assert loss(torch.from_numpy(p), torch.from_numpy(p), None).item() == pytest.approx(0.0, abs=1e-6)
    noisy = softmax(np.log(p) + np.random.default_rng(0).normal(scale=0.5, size=p.shape)).astype(np.float32)
    got = loss(torch.from_numpy(noisy), torch.from_numpy(p), None).item()
    assert got == pytest.approx(numpy_kl_probabilities(noisy, p, 4.0), rel=1e-4) and got > 1e-3
    (cos,) = loss_plan(ctc, ctc, False, DistillOptions(losses={"fetch_name_0": "cosine"})).outputs
    assert cos.kind == "cosine"
    mlp = onnx.load(str(mlp_teacher(tmp_path / "mlp.onnx")))
    for labels, expected in ((True, "kd"), (False, "kl")):
        (loss,) = loss_plan(mlp, mlp, labels, DistillOptions()).outputs
        assert (loss.kind, loss.space, loss.class_axis) == (expected, LOGITS, 1)


def test_the_default_batch_keeps_a_batch_of_teacher_outputs_under_16m_values() -> None:
    from onnx_inher.distill.options import auto_batch

    assert auto_batch(10) == 64  # MNIST logits
    assert auto_batch(32 * 384 + 384) == 64  # MiniLM at 32 tokens
    assert auto_batch(40 * 18385) == 16  # the PP-OCRv5 recogniser: 11.8 M values at 16, 23.5 M at 32
    assert auto_batch(10**9) == 8 and auto_batch(10**9, world_size=16) == 16


def test_an_unshaped_softmax_gets_its_default_temperature_from_a_teacher_output() -> None:
    """A Paddle export declares its [N, T, 18385] softmax without a shape: the class count comes from data."""
    from onnx_inher.distill.run import with_temperatures
    from onnx_inher.distill.trainer import LossPlan

    unknown = LossPlan([OutputLoss("p", "kl", temperature=-1.0, class_axis=2)])
    wide = with_temperatures(unknown, {"p": np.zeros((1, 40, 18385), np.float32)})
    narrow = with_temperatures(unknown, {"p": np.zeros((1, 40, 10), np.float32)})
    assert (wide.outputs[0].temperature, narrow.outputs[0].temperature) == (1.0, 4.0)
    given = LossPlan([OutputLoss("p", "kl", temperature=2.0, class_axis=2)])
    assert with_temperatures(given, {"p": np.zeros((1, 40, 18385), np.float32)}).outputs[0].temperature == 2.0


def _ctc_by_enumeration(log_probs: np.ndarray, labels: tuple[int, ...], blank: int) -> float:
    """-log Σ over every frame path that greedy-collapses to `labels` of Π its frame probabilities."""
    t, c = log_probs.shape
    total = 0.0
    for path in itertools.product(range(c), repeat=t):
        collapsed = [k for i, k in enumerate(path) if k != blank and (i == 0 or path[i - 1] != k)]
        if tuple(collapsed) == labels:
            total += math.exp(sum(log_probs[i, k] for i, k in enumerate(path)))
    return -math.log(total)


def test_ctc_to_teacher_is_the_nll_of_the_teachers_greedy_text_by_enumeration() -> None:
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 3, generator=g)
    # teacher frames: "a a - b" -> "ab", and "- a - a" -> "aa" (blank 0, repeats split by a blank)
    teacher = torch.full((2, 4, 3), -5.0)
    for n, path in enumerate(((1, 1, 0, 2), (0, 1, 0, 1))):
        for i, k in enumerate(path):
            teacher[n, i, k] = 5.0
    labels, lengths = greedy_labels(teacher, blank=0)
    assert labels.tolist() == [1, 2, 1, 1] and lengths.tolist() == [2, 2]
    log_probs = torch.log_softmax(student, dim=-1).numpy()
    expected = np.mean([_ctc_by_enumeration(log_probs[0], (1, 2), 0) / 2,
                        _ctc_by_enumeration(log_probs[1], (1, 1), 0) / 2])  # per label, then over sequences
    assert float(ctc_to_teacher(student, teacher, blank=0)) == pytest.approx(expected, rel=1e-5)
    # a student that is the teacher reads the same text almost surely: the term vanishes
    assert float(ctc_to_teacher(teacher * 3, teacher, blank=0)) < 1e-6


def test_ctc_kind_adds_the_sequence_term_to_the_per_frame_kl() -> None:
    g = torch.Generator().manual_seed(4)
    teacher = torch.randn(3, 6, 5, generator=g)
    student = teacher + 0.5 * torch.randn(3, 6, 5, generator=g)
    probs_s, probs_t = torch.softmax(student, -1), torch.softmax(teacher, -1)  # a Softmax-ending model
    ctc = OutputLoss("y", "ctc", temperature=2.0, space=PROBABILITIES, blank=4)(probs_s, probs_t, None)
    expected = kl(student, teacher, 2.0) + ctc_to_teacher(student, teacher, blank=4)
    assert float(ctc) == pytest.approx(float(expected), rel=1e-4)
    assert float(ctc) > float(OutputLoss("y", "kl", temperature=2.0, space=PROBABILITIES)(probs_s, probs_t, None))


def test_an_output_that_reads_as_ctc_gets_the_ctc_loss_unless_the_user_says_otherwise(tmp_path: Path) -> None:
    from onnx_inher.distill.run import with_ctc
    from onnx_inher.errors import InputError

    path = ctc_teacher(tmp_path / "ctc.onnx", blank_bias=3.0)  # blank on most frames, as in a recogniser
    model, x = onnx.load(str(path)), ctc_inputs(16)
    teacher = {"fetch_name_0": ort_run(path, {"x": x})[0]}

    def kinds(options: DistillOptions, outputs: dict[str, np.ndarray] = teacher) -> list[tuple[str, int]]:
        plan = with_ctc(loss_plan(model, model, False, options), outputs, {"x": x}, options)
        return [(o.kind, o.blank) for o in plan.outputs]

    assert kinds(DistillOptions()) == [("ctc", 0)]
    assert kinds(DistillOptions(ctc_blank=None)) == [("kl", 0)]  # --ctc-blank none
    assert kinds(DistillOptions(losses={"fetch_name_0": "kl"})) == [("kl", 0)]  # the user's choice stands
    assert kinds(DistillOptions(ctc_blank=3)) == [("ctc", 3)]
    # class 0 is not the most frequent: not CTC unless the user names the blank
    flat = {"fetch_name_0": ort_run(ctc_teacher(tmp_path / "flat.onnx", blank_bias=0.0), {"x": x})[0]}
    assert np.bincount(flat["fetch_name_0"].argmax(-1).ravel()).argmax() == 3  # of 5 classes
    assert kinds(DistillOptions(), flat) == [("kl", 0)]
    with pytest.raises(InputError, match="--ctc-blank N"):
        kinds(DistillOptions(losses={"fetch_name_0": "ctc"}), flat)
