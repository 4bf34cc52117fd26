"""Checkpoints: exact resume (weights, AdamW state, RNG), atomic files, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from onnx_inher.distill.checkpoint import latest, list_checkpoints, load_checkpoint, save_checkpoint
from onnx_inher.errors import InputError

RUN = {"student": "abc", "data": "def", "lr": 1e-3}


def toy() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    module.register_buffer("counter", torch.zeros(3))
    frozen = module[0].bias
    frozen.requires_grad_(False)
    return module, torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)


def steps(module: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    """n training steps whose batches and dropout masks both come from torch's global generator."""
    module.train()
    for _ in range(n):
        x = torch.randn(5, 4)
        loss = module(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    module, optimizer = toy()
    steps(module, optimizer, 3)
    best = {"0.weight": module[0].weight.detach().clone()}
    path = save_checkpoint(tmp_path, 3, module, optimizer, {"run": RUN, "epoch": 0}, extra=best)
    steps(module, optimizer, 4)
    uninterrupted = {k: v.clone() for k, v in module.state_dict().items()}

    torch.manual_seed(123)  # a fresh process would start from other generator states
    fresh, fresh_optimizer = toy()
    restored = load_checkpoint(path, fresh, fresh_optimizer, RUN)
    assert (restored.step, restored.state["epoch"]) == (3, 0)
    assert torch.equal(restored.extra["0.weight"], best["0.weight"])
    steps(fresh, fresh_optimizer, 4)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, uninterrupted[name]), name


def test_checkpoint_is_plain_safetensors(tmp_path: Path) -> None:
    module, optimizer = toy()
    steps(module, optimizer, 1)
    path = save_checkpoint(tmp_path, 1, module, optimizer, {"run": RUN})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "onnx-inher-checkpoint/1"
    assert {"model/0.weight", "model/counter", "rng/torch"} <= keys
    assert any(k.startswith("optim/") and k.endswith("/exp_avg_sq") for k in keys)


def test_only_the_newest_checkpoints_are_kept_and_temporaries_ignored(tmp_path: Path) -> None:
    module, optimizer = toy()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, module, optimizer, {"run": RUN}, keep=2)
    (tmp_path / ".tmp-abc.safetensors").write_bytes(b"half a file")  # what a kill -9 mid-write leaves
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000020.safetensors",
                                                            "step-000000030.safetensors"]
    assert latest(tmp_path) == tmp_path / "step-000000030.safetensors"
    assert latest(tmp_path / "none") is None


def test_refuses_other_runs_other_students_and_damaged_files(tmp_path: Path) -> None:
    module, optimizer = toy()
    path = save_checkpoint(tmp_path, 1, module, optimizer, {"run": RUN})
    with pytest.raises(InputError, match=r"different run.*lr"):
        load_checkpoint(path, *toy(), {**RUN, "lr": 1.0})
    other = torch.nn.Linear(4, 2)
    with pytest.raises(InputError, match="do not match this student"):
        load_checkpoint(path, other, torch.optim.AdamW(other.parameters()), RUN)
    broken = tmp_path / "step-000000002.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="not a readable checkpoint"):
        load_checkpoint(broken, *toy(), RUN)
