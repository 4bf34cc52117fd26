"""`_env.keep_freed_memory`: glibc keeps freed blocks (no page-fault storm in training steps), opt-out honoured.

Run in a subprocess: mallopt changes the whole process, and the test process must stay as it was.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = ("import ctypes, json, resource\n"
         "from onnx_inher import _env\n"
         "took = _env.keep_freed_memory()\n"
         "libc = ctypes.CDLL('libc.so.6')\n"
         "libc.malloc.restype = ctypes.c_void_p\n"
         "size = 48 << 20  # over glibc's largest mmap threshold (32 MB), like a big training tensor\n"
         "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
         "for _ in range(20):\n"
         "    block = libc.malloc(size)\n"
         "    ctypes.memset(block, 1, size)\n"
         "    libc.free(ctypes.c_void_p(block))\n"
         "print(json.dumps({'took': took, 'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))\n")


def _probe(env: dict[str, str]) -> dict[str, object]:
    import json
    import os

    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    kept = _probe({"ONNX_INHER_MALLOC": ""})
    system = _probe({"ONNX_INHER_MALLOC": "system"})
    assert kept["took"] is True and system["took"] is False
    # 20 x 48 MB is ~246,000 fresh 4 KB pages when each block is mapped anew; reused, only the first one faults
    assert system["faults"] > 100_000
    assert kept["faults"] < system["faults"] / 5
