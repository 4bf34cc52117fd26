"""What a measurement ran on: CPU model, cores, onnxruntime and Python versions, provider.

Every latency figure is stored with this record, so a number can be traced to the machine that made it
(and a latency cache is keyed by it).
"""

from __future__ import annotations

import os
import platform
from typing import Any


def machine_info(provider: str) -> dict[str, Any]:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__, "python": platform.python_version(),
            "provider": provider, "platform": platform.platform()}
