"""The layer map holds: the import contract passes, catches a wrong-way import, and no private name
crosses a package boundary."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")


def _installed_layout(tmp: Path) -> Path:
    """A copy of onnx_inher/ to break; the onnx_inher/passes symlink is copied as the folder it points to."""
    view = tmp / "view"
    shutil.copytree(ROOT / "onnx_inher", view / "onnx_inher", ignore=shutil.ignore_patterns("__pycache__", "data"))
    return view


def _lint(view: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / "pyproject.toml")], cwd=view,
                          env={"PYTHONPATH": str(view), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)


def test_the_layer_contract_is_kept() -> None:
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("module,bad_import", [
    ("planning/cost.py", "import onnx_inher.bench.stats"),          # planning is below bench
    ("ir/graph.py", "import onnx_inher.runtime.sessions"),           # ir is the bottom layer
    ("passes/cleanup.py", "import onnx_inher.distill.losses"),       # compression never needs the trainer
    ("bench/stats.py", "import onnx_inher.metrics"),                 # siblings stay independent
])
def test_a_wrong_way_import_breaks_the_contract(tmp_path: Path, module: str, bad_import: str) -> None:
    view = _installed_layout(tmp_path)
    target = view / "onnx_inher" / module
    target.write_text(target.read_text() + f"\n{bad_import}  # wrong way\n")
    done = _lint(view)
    assert done.returncode != 0, done.stdout[-2000:]
    assert "BROKEN" in done.stdout


def _package_of(module: str) -> str:
    """`onnx_inher.planning.plan` -> `onnx_inher.planning`; top-level modules are their own package."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "passes"):
        rel = path.relative_to(ROOT / "passes").with_suffix("")
        return ".".join(("onnx_inher", "passes", *rel.parts))
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def test_no_private_name_is_imported_across_packages() -> None:
    crossings = []
    for path in sorted([*ROOT.joinpath("onnx_inher").rglob("*.py"), *ROOT.joinpath("passes").rglob("*.py")]):
        importer = _package_of(_module_name(path))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("onnx_inher"):
                continue
            source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                private = alias.name.startswith("_") or any(p.startswith("_") for p in source.split(".")[1:])
                if private and _package_of(full if alias.name.startswith("_") else source) != importer \
                        and source != "onnx_inher._env" and not (source == "onnx_inher" and alias.name == "_env"):
                    crossings.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {source} import {alias.name}")
    assert not crossings, "\n".join(crossings)
