"""The online teacher in torch (`--teacher-runtime torch`): same targets as ONNX Runtime, chosen when it helps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from onnx_inher.cli import main
from onnx_inher.datasets import Dataset, input_specs, load_data
from onnx_inher.distill import torch_teacher
from onnx_inher.distill.options import DistillOptions
from onnx_inher.distill.teacher_cache import OnlineTeacher
from onnx_inher.distill.torch_teacher import TorchTeacher, choose_runtime, online_teacher
from onnx_inher.errors import CheckFailed, InputError
from onnx_inher.ir.io import load_model
from tests.helpers import distill_text, weights
from tests.zoo import minilm_torchscript

CPU = torch.device("cpu")
MINILM_FEATURES = ["/encoder/layer.2/output/LayerNorm/LayerNormalization_output_0", "last_hidden_state"]


def minilm_data(tmp_path: Path, rows: int = 6, width: int = 16) -> tuple[Path, Dataset]:
    """Right-padded token rows of random lengths; the teacher only needs well-formed ids."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, width + 1, size=rows)
    ids = np.zeros((rows, width), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = [101, *rng.integers(1000, 30000, size=n - 2), 102]
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    path = tmp_path / "tokens.npz"
    np.savez(path, input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    teacher = minilm_torchscript()
    return teacher, load_data(str(path), input_specs(load_model(teacher).model))


@pytest.mark.slow
def test_torch_teacher_matches_onnx_runtime_on_minilm_features(tmp_path: Path) -> None:
    teacher, data = minilm_data(tmp_path)
    feeds = data.batch(np.arange(len(data)))
    ort = OnlineTeacher(teacher, data, MINILM_FEATURES, preference="cpu")(feeds)
    got = {k: v.numpy() for k, v in TorchTeacher(teacher, data, MINILM_FEATURES, CPU)(feeds).items()}
    assert list(got) == MINILM_FEATURES
    for name in MINILM_FEATURES:
        assert got[name].dtype == np.float32 and got[name].shape == ort[name].shape
        assert np.abs(got[name] - ort[name]).max() / np.abs(ort[name]).max() < 1e-5


@pytest.mark.slow
def test_online_teacher_refuses_a_torch_teacher_that_disagrees_with_ort(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    teacher, data = minilm_data(tmp_path, rows=2, width=8)
    real = TorchTeacher.__call__

    def off(self: TorchTeacher, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: v * 1.01 for k, v in real(self, feeds).items()}

    monkeypatch.setattr(TorchTeacher, "__call__", off)
    with pytest.raises(CheckFailed, match=r"differs from ONNX Runtime.*--teacher-runtime ort"):
        online_teacher(teacher, data, ["last_hidden_state"], CPU, "torch")


def test_auto_runs_the_teacher_in_ort_unless_only_torch_reaches_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    assert choose_runtime("auto", CPU) == "ort"
    assert choose_runtime("torch", CPU) == "torch" and choose_runtime("ort", cuda) == "ort"
    monkeypatch.setattr(torch_teacher, "providers", lambda _: ["CPUExecutionProvider"])
    assert choose_runtime("auto", cuda) == "torch"
    monkeypatch.setattr(torch_teacher, "providers", lambda _: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choose_runtime("auto", cuda) == "ort"
    with pytest.raises(InputError, match="--teacher-runtime must be one of"):
        choose_runtime("tensorrt", CPU)
    with pytest.raises(InputError, match="--teacher-runtime must be one of"):
        DistillOptions(teacher_runtime="tensorrt").validate()
    with pytest.raises(InputError, match="add --teacher-mode online"):
        DistillOptions(teacher_runtime="torch").validate()
    DistillOptions(teacher_runtime="torch", augment="mix").validate()


def test_distill_with_the_torch_teacher_trains_like_the_ort_one(text: dict[str, Path],
                                                               tmp_path: Path) -> None:
    ort = distill_text(text, tmp_path / "ort.onnx", augment="mix", teacher_runtime="ort")
    bridged = distill_text(text, tmp_path / "torch.onnx", augment="mix", teacher_runtime="torch")
    assert (ort.teacher_runtime, bridged.teacher_runtime) == ("ort", "torch")
    a, b = weights(tmp_path / "ort.onnx"), weights(tmp_path / "torch.onnx")
    assert a.keys() == b.keys() and all(np.allclose(a[n], b[n], atol=1e-5) for n in a)
    assert bridged.train.final["val_loss"] < bridged.train.initial["val_loss"]


def test_time_limit_sizes_the_schedule_and_says_so(text: dict[str, Path], tmp_path: Path) -> None:
    # 2 s leaves room for the PACE_STEPS timed steps that size the schedule on a loaded machine (with 0.5 s
    # under `make test-fast` the limit once ran out before them, and the schedule was never sized)
    result = distill_text(text, tmp_path / "late.onnx", steps=10**7, time_limit=2.0)
    assert result.train.planned_steps == 10**7 and 0 < result.train.total_steps < 10**5  # sized to the time
    assert 0 < result.train.steps <= result.train.total_steps and result.train.seconds < 30
    assert result.train.out_of_time or result.train.steps == result.train.total_steps
    assert (tmp_path / "late.onnx").is_file() and result.ort_max_rel < 1e-3
    with pytest.raises(InputError, match="--time-limit must be >= 0"):
        DistillOptions(time_limit=-1).validate()


def test_cli_refuses_a_torch_teacher_without_the_online_mode(text: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["distill", str(text["student"]), "--teacher", str(text["teacher"]), "--data",
                                       str(text["data"]), "-o", str(out), "--teacher-runtime", "torch"])
    assert result.exit_code == 2 and "add --teacher-mode online" in result.output
    assert "Traceback" not in result.output and not out.exists()
