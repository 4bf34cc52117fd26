"""Peak host memory of one ONNX Runtime session, measured in a fresh process.

Run as a script (`python memprobe.py MODEL FEED.npz CONFIG.json`): it imports only numpy and
onnxruntime, so it also works where onnx-inher is not installed. In a process of its own, with the
kernel's high-water mark (VmHWM) reset after the imports, the peak belongs to this one session:
creating it (reading the file, optimising the graph, placing weights) and running it once at the
given inputs. Prints one JSON line.
"""

from __future__ import annotations

import json
import resource
import sys


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            line = next((ln for ln in f if ln.startswith(field + ":")), None)
        return int(line.split()[1]) if line else None
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak() -> bool:
    """Linux: restart the high-water mark (VmHWM) from the current RSS, so that transient peaks of
    the imports do not hide the session's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kib) * (1 if sys.platform == "darwin" else 1024)


def _rss_bytes() -> int:
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else _peak_bytes()


def main(model: str, feed_path: str, config_path: str) -> None:
    import numpy as np
    import onnxruntime as ort

    with open(config_path) as f:
        config = json.load(f)
    with np.load(feed_path, allow_pickle=False) as data:
        feed = {k: data[k] for k in data.files}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if config["threads"]:
        opts.intra_op_num_threads = config["threads"]
    opts.inter_op_num_threads = 1
    for key, value in config["session_config"].items():
        opts.add_session_config_entry(key, value)
    providers = [tuple(p) if isinstance(p, list) else p for p in config["providers"]]
    exact = _reset_peak()
    before = _rss_bytes() if exact else _peak_bytes()
    session = ort.InferenceSession(model, opts, providers=providers)
    session.run(None, feed)
    print(json.dumps({"peak_bytes": _peak_bytes() - before, "before_bytes": before, "hwm_reset": exact}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
