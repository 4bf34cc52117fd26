"""Errors that carry their own exit code, so the CLI can map them without guessing.

Exit codes are part of the contract: 0 success, 1 a requested check failed, 2 bad input or usage.
"""

from __future__ import annotations


class OnnxInherError(Exception):
    """Base class: the message is written for a person (what, where, what to do)."""

    exit_code = 2


class InputError(OnnxInherError):
    """The user's file, options or environment are wrong; nothing was written."""

    exit_code = 2


class CheckFailed(OnnxInherError):
    """A requested check (e.g. a verification bound) did not hold."""

    exit_code = 1


class PassError(OnnxInherError):
    """A pass broke one of its own pre/post conditions: a bug in onnx-inher, named by pass."""

    exit_code = 1

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"pass '{pass_name}': {message}")
        self.pass_name = pass_name
