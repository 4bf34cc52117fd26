"""`python -m benchmarks.reproduce --quick` runs end to end (teacher, every kind of student, benchmark, report)
and passes its sanity floors. It checks that the study works, never a figure of it (RESULTS.md has those)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

pytestmark = [pytest.mark.slow, pytest.mark.cli,
              pytest.mark.skipif(not FASHION.is_file(), reason="needs Debian's dataset-fashion-mnist")]


def test_quick_reproduce_runs_and_clears_the_floors(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    res = subprocess.run([sys.executable, "-m", "benchmarks.reproduce", "--quick", "--out", str(out),
                          "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    record = json.loads((out / "reproduce_quick.json").read_text())
    assert record["sanity"] == {"ok": True, "problems": []}
    vision = record["vision"]
    names = {r["name"] for r in vision["runs"]}
    assert {"inher2", "pair", "pair_noft", "pair_random", "thin", "wpair"} <= names
    for run in vision["runs"]:
        assert run["params"] < vision["teacher"]["params"]
        if run.get("distill"):  # a validation point at the start and after the epoch: the convergence curve
            curve = run["distill"]["curve"]
            assert curve[0]["epoch"] == 0 and len(curve) >= 2
    assert set(vision["latency"]["points"]) == {"1", "8"}
    markdown = (out / "reproduce_quick.md").read_text()
    assert "Wall time" in markdown and "| SVD pair |" in markdown
    assert "wall time" in res.stdout
