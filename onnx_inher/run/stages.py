"""Resumable stages of a run folder.

A run is a chain of stages (plan -> compress -> distill -> verify -> bench -> report), each writing
files into one folder. `run.json` in that folder records, per finished stage, a fingerprint of what
it was computed from (its options and the hashes of its input files) and the hashes of the files it
wrote. A rerun skips a stage only when that record still holds — same fingerprint, every output
present with the recorded hash — so a crash, a Ctrl-C or a hand-deleted file leaves a folder that
the next run completes rather than trusts. The record is written after the stage's own (atomic)
outputs, so an interrupted stage is simply not recorded.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnx_inher.ir.io import write_text

MANIFEST = "run.json"
FORMAT = "onnx-inher-run/1"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(options: dict[str, Any], inputs: Sequence[Path]) -> str:
    """What a stage's result depends on: its options and the content of its input files."""
    doc = {"options": options, "inputs": {str(p.name): file_sha256(p) for p in inputs}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StageRecord:
    name: str
    fingerprint: str
    outputs: dict[str, str]
    seconds: float
    result: dict[str, Any] = field(default_factory=dict)


class RunFolder:
    """The run folder and its manifest; stages are run through `stage`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, StageRecord] = {}
        manifest = folder / MANIFEST
        if manifest.exists():
            try:
                doc = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                doc = {}
            if doc.get("format") == FORMAT:
                self.records = {r["name"]: StageRecord(**r) for r in doc.get("stages", [])}

    def path(self, name: str) -> Path:
        return self.folder / name

    def is_done(self, name: str, fp: str) -> bool:
        rec = self.records.get(name)
        if rec is None or rec.fingerprint != fp:
            return False
        for rel, digest in rec.outputs.items():
            p = self.folder / rel
            if not p.is_file() or file_sha256(p) != digest:
                return False
        return True

    def stage(self, name: str, options: dict[str, Any], inputs: Sequence[Path], outputs: Sequence[str],
              body: Callable[[], dict[str, Any]], *, log: Callable[[str], None] = print) -> dict[str, Any]:
        """Run `body` unless the recorded result is still valid; return the stage's result dict.

        `outputs` are file names inside the folder that `body` must have written.
        """
        fp = fingerprint(options, inputs)
        if self.is_done(name, fp):
            log(f"[{name}] up to date, skipped")
            return self.records[name].result
        self.records.pop(name, None)
        self._save()
        start = time.perf_counter()
        # a line per stage start and end: logs without a terminal (CI, nohup) get no progress bars
        log(f"[{name}] {time.strftime('%H:%M:%S')} started")
        result = body()
        missing = [o for o in outputs if not (self.folder / o).is_file()]
        if missing:
            raise RuntimeError(f"stage '{name}' did not write {missing}")
        digests = {o: file_sha256(self.folder / o) for o in outputs}
        seconds = time.perf_counter() - start
        self.records[name] = StageRecord(name, fp, digests, round(seconds, 3), result)
        self._save()
        log(f"[{name}] done in {seconds:.0f} s")
        return result

    def _save(self) -> None:
        doc = {"format": FORMAT, "stages": [vars(r) for r in self.records.values()]}
        write_text(self.folder / MANIFEST, json.dumps(doc, indent=2, sort_keys=True) + "\n")
