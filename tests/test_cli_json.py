"""Every command offers --json for deployment pipelines, and what it prints parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnx_inher.cli import main
from onnx_inher.demo import TEACHER

COMMANDS = ["inspect", "plan", "compress", "verify", "distill", "bench", "run", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_command_has_json_flag(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "--json" in result.output


def test_plan_and_compress_json_parse(tmp_path: Path) -> None:
    runner = CliRunner()
    plan = runner.invoke(main, ["plan", str(TEACHER), "-o", str(tmp_path / "p.json"), "--json"])
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.output)["totals"]["factorized"] >= 1
    comp = runner.invoke(main, ["compress", str(TEACHER), "-o", str(tmp_path / "s.onnx"), "--plan",
                                str(tmp_path / "p.json"), "--verify", "--json"])
    assert comp.exit_code == 0, comp.output
    assert json.loads(comp.output)["verification"]["outputs"]
