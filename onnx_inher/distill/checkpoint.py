"""Training checkpoints: one safetensors file per checkpoint, written atomically, no pickle anywhere.

A checkpoint holds everything a run needs to continue as if it had never stopped: the module's parameters
and buffers, the optimizer's per-parameter state, the random generators' states (torch CPU and CUDA), and a
small JSON state (step, epoch, best validation metric, scheduler, the run's identity) kept in the file's
metadata. Tensors go through safetensors and the rest through JSON, so loading a checkpoint can never run
code. A file lands by `os.replace` after an fsync: a `kill -9` leaves either the previous checkpoint or the
new one, never half of one, and resuming picks the newest complete file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from onnx_inher.errors import InputError

PATTERN = re.compile(r"^step-(\d{9})\.safetensors$")
MODEL, OPTIM, RNG, EXTRA = "model/", "optim/", "rng/", "extra/"
FORMAT = "onnx-inher-checkpoint/1"


@dataclass
class Checkpoint:
    """What a resumed run restores besides the tensors loaded in place: the step and the JSON state."""

    path: Path
    step: int
    state: dict[str, Any]
    extra: dict[str, torch.Tensor]


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:09d}.safetensors"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary files never match the pattern)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if PATTERN.match(p.name))


def latest(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split the optimizer's state dict into tensors (by param index and key) and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM}{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {f"{RNG}torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{RNG}cuda/{i}"] = s
    return tensors


def save_checkpoint(folder: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `step-<step>.safetensors` atomically, then drop all but the newest `keep` checkpoints.

    `extra` holds any other tensors the run needs back (e.g. the best weights seen on validation).
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{MODEL}{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tensors.update({f"{EXTRA}{k}": v.detach().cpu().contiguous().clone() for k, v in (extra or {}).items()})
    optim_tensors, optim_rest = _optimizer_tensors(optimizer)
    tensors.update(optim_tensors)
    tensors.update(_rng_tensors())
    metadata = {"format": FORMAT, "step": str(step),
                "state": json.dumps(state, sort_keys=True), "optimizer": json.dumps(optim_rest, sort_keys=True)}
    blob = save(tensors, metadata=metadata)
    final = checkpoint_path(folder, step)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"{final}: cannot write checkpoint ({err.strerror}); choose another --checkpoint-dir.") \
            from None
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut after replace must not resurrect the old name)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint file; a foreign or damaged file is an InputError."""
    try:
        blob = path.read_bytes()
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8:8 + header_len]).get("__metadata__", {})
    except (OSError, SafetensorError, ValueError) as err:
        raise InputError(f"{path}: not a readable checkpoint ({err}); delete it or start without --resume.") \
            from None
    if metadata.get("format") != FORMAT:
        raise InputError(f"{path}: not an onnx-inher checkpoint (format {metadata.get('format')!r}).")
    return tensors, metadata


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    run: dict[str, Any] | None = None) -> Checkpoint:
    """Restore module, optimizer and RNG states in place; refuse a checkpoint of a different run.

    `run` identifies the run (student, data, options that change the result); it must equal the `run`
    entry saved in the checkpoint's state, so `--resume` never silently mixes two experiments.
    """
    tensors, metadata = read_checkpoint(path)
    state = json.loads(metadata["state"])
    if run is not None and state.get("run") != run:
        changed = sorted(k for k in {*run, *state.get("run", {})} if run.get(k) != state.get("run", {}).get(k))
        raise InputError(f"{path}: checkpoint belongs to a different run (differs in {', '.join(changed)}); "
                         "use the same student, data and options, or another --checkpoint-dir.")
    weights = {k[len(MODEL):]: v for k, v in tensors.items() if k.startswith(MODEL)}
    expected = module.state_dict()
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in expected):
        raise InputError(f"{path}: checkpoint weights do not match this student's parameters; "
                         "resume with the student the run started from.")
    module.load_state_dict(weights)
    optimizer.load_state_dict(_optimizer_state(tensors, json.loads(metadata["optimizer"])))
    torch.set_rng_state(tensors[f"{RNG}torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith(f"{RNG}cuda/")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    extra = {k[len(EXTRA):]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    return Checkpoint(path, int(metadata["step"]), state, extra)


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(OPTIM):
            index, name = key[len(OPTIM):].split("/", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in rest["scalars"].items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}
