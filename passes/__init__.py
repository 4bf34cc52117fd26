"""Graph passes: small functions `model -> (model, changed)` with checked pre/post conditions.

A pipeline is a plain list of passes run in order by `run_passes`. A pass that finds its own
precondition or postcondition broken raises `PassError` naming itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from onnx import ModelProto

PassFn = Callable[[ModelProto], tuple[ModelProto, bool]]


def run_passes(model: ModelProto, passes: Sequence[PassFn]) -> tuple[ModelProto, bool]:
    changed_any = False
    for p in passes:
        model, changed = p(model)
        changed_any |= changed
    return model, changed_any
