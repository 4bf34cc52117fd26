"""Every command in README.md runs: shell lines here (in a temp folder, on the embedded teacher), or in the
test / CI step named in COVERED_ELSEWHERE; every Python block is executed.

Training lengths are shortened (`--epochs N` -> `--steps 3`, `--steps N` -> `--steps 3`) so the README can
show realistic settings while the suite stays fast; nothing else is rewritten.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_inher.demo import TEACHER

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# Shell commands this test does not run itself, and the test or CI step that does.
COVERED_ELSEWHERE = {
    "make test": ".ci/run (CI runs it on a clean clone)",
    "make demo": "tests/test_run_demo.py (`demo --quick`, the same code path)",
    "pip install": "tests/test_packaging.py (builds the wheel and installs it)",
    "pip uninstall": "documentation of the gpu extra (nothing to run on a CPU machine)",
    "torchrun": "tests/test_distill_trainer.py (2 gloo processes vs 1)",
    "bash benchmarks/gpu/gpu_check.sh": "tests/test_bench.py (the CPU fallback path)",
    "python -m benchmarks.": "benchmarks (long measurements, figures in benchmarks/RESULTS.md)",
    ".venv/bin/python -m benchmarks.": "benchmarks (long measurements, figures in benchmarks/RESULTS.md)",
}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def shell_lines() -> list[str]:
    lines = []
    for block in blocks("bash"):
        for raw in block.splitlines():
            line = raw.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def shorten(line: str) -> str:
    return re.sub(r"--(epochs|steps) \d+", "--steps 3", line)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """teacher.onnx (the embedded CNN), sample.npz and images.npz with labels, like a user would have."""
    from onnx_inher.datasets.adapters import mnist5k, normalise

    d = tmp_path_factory.mktemp("readme")
    shutil.copy(TEACHER, d / "teacher.onnx")
    images = mnist5k("test")
    np.savez(d / "sample.npz", image=normalise(images.pixels[:8]))
    np.savez(d / "images.npz", image=normalise(images.pixels[:256]), labels=images.labels[:256])
    return d


def test_every_shell_line_is_run_or_covered(workdir: Path) -> None:
    env = {**os.environ, "ONNX_INHER_QUIET": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    variables: dict[str, str] = {}
    ran = 0
    for line in shell_lines():
        if any(line.startswith(prefix) for prefix in COVERED_ELSEWHERE):
            continue
        m = re.fullmatch(r"(\w+)=(\S+)", line)
        if m:
            variables[m.group(1)] = str(ROOT / m.group(2)) if (ROOT / m.group(2)).exists() else m.group(2)
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        assert line.startswith("onnx-inher "), f"README line neither run here nor covered elsewhere: {line}"
        proc = subprocess.run(shlex.split(shorten(line)), cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=600)
        if "--provider cuda" in line and not cuda_available():
            # on a machine without CUDA the command must refuse clearly (exit 2), not fall back silently
            assert proc.returncode == 2 and "CUDA was requested" in proc.stderr, f"{line}\n{proc.stderr}"
        else:
            assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        ran += 1
    assert ran >= 8


def test_every_python_block_runs(workdir: Path) -> None:
    for code in blocks("python"):
        proc = subprocess.run([sys.executable, "-c", shorten(code)], cwd=workdir, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "ONNX_INHER_QUIET": "1"})
        assert proc.returncode == 0, f"{code}\n{proc.stderr[-3000:]}"
