"""The top-level `passes/` folder is installed as `onnx_inher.passes`, from a wheel and editable."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import onnx_inher.passes

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_passes_to_the_repo_folder() -> None:
    assert Path(onnx_inher.passes.__file__).resolve() == ROOT / "passes" / "__init__.py"


@pytest.mark.cli
def test_wheel_installs_passes_as_onnx_inher_passes(tmp_path: Path) -> None:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("onnx_inher-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "onnx_inher/passes/factorize.py" in names
    assert not any(n.startswith(("passes/", "tests/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    probe = ("import onnx_inher, onnx_inher.passes.factorize as f; "
             "print(onnx_inher.__file__); print(f.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in out), out
    help_text = subprocess.run([sys.executable, "-m", "onnx_inher", "--help"], check=True, cwd=tmp_path,
                               capture_output=True, text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    for command in ("inspect", "plan", "compress", "verify"):
        assert command in help_text.stdout
