"""Shared fixtures. Real-model teachers come from tests/zoo.py (built once, cached)."""

from __future__ import annotations

import os

os.environ.setdefault("ONNX_INHER_QUIET", "1")
