"""The schema of a `run`'s result: what `run --json` prints and `report.md` is rendered from.

It lives with the renderings, below the pipeline that fills it, so that reports never import the
orchestrator.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunResult:
    folder: str
    plan: dict[str, Any]
    evaluation: dict[str, Any]
    distill: dict[str, Any]
    bench: dict[str, Any]
    summary: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str) + "\n"
