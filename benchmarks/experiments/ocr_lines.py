"""Issue 17: English text lines for a PP-OCR-style recogniser, and the init agreement of its students.

`python -m benchmarks.experiments.ocr_lines build [--n 200] [--out PATH]` renders seeded lines of
/usr/share/games/fortunes text with the DejaVu fonts at height 48 (PaddleOCR's recogniser input:
RGB, resized to height 48 keeping the aspect, `(x/255 - 0.5)/0.5`, zero-padded to width 320) and
writes an `.npz` keyed `x` (`[n, 3, 48, 320]` float32), plus the texts next to it (`.txt`).

`python -m benchmarks.experiments.ocr_lines score TEACHER STUDENT... --data PATH` prints, for every
student, the share of lines CTC-greedy decoded as the teacher does and the share of frames with the
teacher's argmax (blank = class 0), and the share of all-blank decodes. Nothing here is committed data:
the model and the lines stay under ~/.cache/onnx-inher or /tmp.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import random
from pathlib import Path

import numpy as np

HEIGHT, WIDTH = 48, 320
DEFAULT_OUT = Path.home() / ".cache" / "onnx-inher" / "ocr_lines.npz"


def fortune_lines() -> list[str]:
    lines: set[str] = set()
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if "." in Path(path).name:
            continue
        try:
            text = Path(path).read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        for line in text.splitlines():
            s = " ".join(line.split())
            if 8 <= len(s) <= 32 and s.isascii() and s != "%" and sum(c.isalpha() for c in s) > len(s) // 2:
                lines.add(s)
    return sorted(lines)


def render(text: str, font_path: str, size: int, rng: random.Random) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, size)
    left, top, right, bottom = font.getbbox(text)
    pad = rng.randint(2, 8)
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (255, 255, 255))
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=(rng.randint(0, 60),) * 3)
    w = min(WIDTH, math.ceil(HEIGHT * img.width / img.height))
    img = img.resize((w, HEIGHT), Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :w] = x
    return out


def build(n: int, out: Path, seed: int = 0) -> None:
    fonts = sorted(f for f in glob.glob("/usr/share/fonts/truetype/dejavu/*.ttf") if "Mono" in f or "Sans" in f)
    if not fonts:
        raise SystemExit("no DejaVu fonts: apt-get install fonts-dejavu-core")
    rng = random.Random(seed)
    texts = rng.sample(fortune_lines(), n)
    images = np.stack([render(t, rng.choice(fonts), rng.randint(28, 40), rng) for t in texts])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=images)
    out.with_suffix(".txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"wrote {out} {images.shape}")


def decode(probs: np.ndarray) -> list[tuple[int, ...]]:
    from onnx_inher.metrics import ctc_decode

    return ctc_decode(probs.argmax(-1), 0)


def run(path: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 25]})[0] for i in range(0, len(x), 25)])


def score(teacher: str, students: list[str], data: Path, keys: Path | None) -> None:
    x = np.load(data)["x"]
    ref = run(teacher, x)
    t_ids, t_seq = ref.argmax(-1), decode(ref)
    if keys is not None:
        chars = keys.read_text(encoding="utf-8").splitlines()  # line 0 is "blank"
        truth = data.with_suffix(".txt").read_text(encoding="utf-8").splitlines()
        read = ["".join(chars[i] for i in s) for s in t_seq]
        exact = np.mean([r == t for r, t in zip(read, truth, strict=False)])
        print(f"teacher reads {exact:.0%} of {len(x)} lines exactly; e.g. {read[:3]} for {truth[:3]}")
    rows = {}
    for s in students:
        out = run(s, x)
        seq = decode(out)
        rows[s] = {"lines": float(np.mean([a == b for a, b in zip(seq, t_seq, strict=True)])),
                   "frames": float(np.mean(out.argmax(-1) == t_ids)),
                   "all_blank": float(np.mean([len(q) == 0 for q in seq]))}
        r = rows[s]
        print(f"{s}: lines {r['lines']:.0%}  frames {r['frames']:.0%}  all-blank {r['all_blank']:.0%}")
    print(json.dumps(rows))


def _row_errors(m: np.ndarray, f, gram: np.ndarray) -> np.ndarray:
    """Relative output error of each output row (of group 0) on inputs with Gram matrix `gram`."""
    g = (gram[0] if gram.ndim == 3 else gram).astype(np.float64)
    diff = m[0].astype(np.float64) - f.up[0].astype(np.float64) @ f.down[0].astype(np.float64)
    ref = np.einsum("oi,ij,oj->o", m[0].astype(np.float64), g, m[0].astype(np.float64))
    return np.sqrt(np.einsum("oi,ij,oj->o", diff, g, diff) / np.maximum(ref, 1e-30))


def diagnose(teacher: str, data: Path, ratio: float) -> None:
    """Per factorised layer at the `--param-ratio` plan's rank: its relative output error on the calibration
    data (plain vs whitened SVD), and the frames / lines agreement when only that layer is truncated."""
    from onnx_inher import Options, RankPolicy, api
    from onnx_inher.planning.svd import full_svd, output_error, truncate, whitened_svd
    from onnx_inher.tuning.allocate import Prober, weight_from_matrices
    from onnx_inher.tuning.calibrate import calibrate

    options = Options(mode="svd", policy=RankPolicy("param_ratio", ratio), shapes={"x": [1, 3, HEIGHT, WIDTH]})
    a = api.analyze(teacher, shapes=options.shapes)
    plan = api.plan(teacher, options)
    cal = calibrate(a.loaded.model, a.views, plan, str(data))
    chosen = [c for c in plan.candidates if c.decision == "factorize"]
    views = [a.views[c.node] for c in chosen]
    prober = Prober(a.loaded.model, views, cal.feeds)
    outputs = [o.name for o in a.loaded.model.graph.output]
    ref = np.concatenate([prober.session.run(outputs[:1], {**b, **prober.weights})[0] for b in prober.batches])
    t_ids, t_seq = ref.argmax(-1), decode(ref)

    def agreement(swapped: dict[str, np.ndarray]) -> tuple[float, float]:
        w = {**prober.weights, **{prober.names[n]: v for n, v in swapped.items()}}
        out = np.concatenate([prober.session.run(outputs[:1], {**b, **w})[0] for b in prober.batches])
        seq = decode(out)
        lines = np.mean([x == y for x, y in zip(seq, t_seq, strict=True)])
        return float(np.mean(out.argmax(-1) == t_ids)), float(lines)

    rows = []
    for c, v in zip(chosen, views, strict=True):
        m, gram = v.matrices(), cal.grams[v.shared_key]
        plain, white = truncate(full_svd(m), c.rank), truncate(whitened_svd(m, gram), c.rank)
        row = {"node": c.node, "op": v.op, "kernel": list(v.kernel), "groups": v.groups, "shape": list(m.shape),
               "rank": c.rank, "energy": c.energy_kept,
               "out_err_plain": output_error(m, plain, gram), "out_err_white": output_error(m, white, gram)}
        for name, f in (("plain", plain), ("white", white)):
            row_err = _row_errors(m, f, gram)  # the classifier head's row 0 is the CTC blank
            row[f"row0_err_{name}"], row[f"median_row_err_{name}"] = float(row_err[0]), float(np.median(row_err))
            w = weight_from_matrices(v, (f.up.astype(np.float64) @ f.down.astype(np.float64)).astype(np.float32))
            row[f"frames_{name}"], row[f"lines_{name}"] = agreement({v.node: w})
        rows.append(row)
        print(f"{c.node[-40:]:>40} {v.op} k{v.kernel} g{v.groups} {m.shape[1]}x{m.shape[2]} r{c.rank} "
              f"energy {c.energy_kept:.3f} out-err plain {row['out_err_plain']:.3f} white {row['out_err_white']:.3f} "
              f"frames {row['frames_plain']:.0%}/{row['frames_white']:.0%} lines {row['lines_plain']:.0%}/"
              f"{row['lines_white']:.0%} row-0 err {row['row0_err_plain']:.3f}/{row['row0_err_white']:.3f}", flush=True)
    out = Path("/tmp/ocr_diagnose.json")
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--n", type=int, default=200)
    b.add_argument("--out", type=Path, default=DEFAULT_OUT)
    b.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("teacher")
    s.add_argument("students", nargs="*")
    s.add_argument("--data", type=Path, default=DEFAULT_OUT)
    s.add_argument("--keys", type=Path)
    d = sub.add_parser("diagnose")
    d.add_argument("teacher")
    d.add_argument("--data", type=Path, default=DEFAULT_OUT)
    d.add_argument("--param-ratio", type=float, default=0.5)
    a = p.parse_args()
    if a.cmd == "diagnose":
        diagnose(a.teacher, a.data, a.param_ratio)
    elif a.cmd == "build":
        build(a.n, a.out, a.seed)
    else:
        score(a.teacher, a.students, a.data, a.keys)


if __name__ == "__main__":
    main()
