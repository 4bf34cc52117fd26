"""Process-wide settings read from the environment, in one place.

Quiet mode (`ONNX_INHER_QUIET=1`, set by `--json` and by the test suite) turns off progress bars and
notices; caches live under one root (`ONNX_INHER_CACHE`, default `~/.cache/onnx-inher`). Every module
asks here instead of reading the variables itself, so the two conventions cannot drift apart.
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET_VAR = "ONNX_INHER_QUIET"
CACHE_VAR = "ONNX_INHER_CACHE"


def quiet() -> bool:
    """True when progress bars and notices should stay off."""
    return os.environ.get(QUIET_VAR) == "1"


def progress_disabled() -> bool | None:
    """tqdm's `disable`: True in quiet mode, else None (tqdm then hides itself when stderr is no terminal)."""
    return True if quiet() else None


def cache_root() -> Path:
    """Root of every onnx-inher cache (teacher outputs, latency tables, test fixtures)."""
    return Path(os.environ.get(CACHE_VAR) or Path.home() / ".cache" / "onnx-inher")
