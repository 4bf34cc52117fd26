"""`evaluate` scores batch by batch: its memory does not grow with the data, and its figures do not depend on
how the samples were batched (the PP-OCRv5 recogniser's evaluation peaked at 13.9 GB holding whole outputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_inher import metrics
from tests.helpers import CTC_CLASSES, CTC_FRAMES, ctc_inputs, ctc_teacher


def _student(teacher: Path, path: Path) -> Path:
    """The teacher with its second weight nudged: some frames change their top class."""
    model = onnx.load(str(teacher))
    for init in model.graph.initializer:
        if init.name == "w2":
            w = numpy_helper.to_array(init)
            w = w + np.random.default_rng(1).normal(scale=0.05, size=w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(w, "w2"))
    onnx.save(model, str(path))
    return path


def test_figures_do_not_depend_on_the_batching_and_batches_stay_small(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = ctc_teacher(tmp_path / "teacher.onnx")
    student = _student(teacher, tmp_path / "student.onnx")
    x = {"x": ctc_inputs(50)}
    whole = metrics.evaluate(teacher, student, x, provider="cpu", batch_size=1000).to_dict()
    assert 0 < whole["ctc_agreement"] < 1 and 0 < whole["top1_agreement"] < 1  # the check can fail

    seen: list[int] = []
    real = metrics.session

    def spy(path: Path, provider: str):  # type: ignore[no-untyped-def]
        sess = real(path, provider)
        run = sess.run
        sess_run = lambda names, feed: (seen.append(len(next(iter(feed.values())))), run(names, feed))[1]  # noqa: E731
        return type("Spy", (), {"run": staticmethod(sess_run), "get_outputs": sess.get_outputs,
                                "get_inputs": sess.get_inputs})()

    per_sample = CTC_FRAMES * CTC_CLASSES
    monkeypatch.setattr(metrics, "EVAL_VALUES", 3 * per_sample)
    monkeypatch.setattr(metrics, "session", spy)
    small = metrics.evaluate(teacher, student, x, provider="cpu", batch_size=1000).to_dict()
    assert small == whole
    assert max(seen) <= 8 and sum(seen) == 2 * 50 and seen[2:] and max(seen[2:]) == 3
