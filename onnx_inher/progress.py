"""Plain progress lines for long loops when stderr is no terminal (CI logs, nohup, captured notebooks).

tqdm hides itself without a terminal, which left a user's `run` log silent for minutes while calibration
fitted 31 layers. `Heartbeat` prints `what: 12/31 layer, 4.2 s/layer, 1.3 min left` at most every
`every` seconds, and nothing in quiet mode or when a terminal shows tqdm's bar instead.
"""

from __future__ import annotations

import sys
import time

from onnx_inher import _env

EVERY = 30.0


class Heartbeat:
    def __init__(self, what: str, total: int, unit: str, every: float = EVERY) -> None:
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.on = not _env.quiet() and not sys.stderr.isatty()
        self.began = self.last = time.perf_counter()

    def tick(self, done: int) -> None:
        """Report `done` of `total` if `every` seconds passed since the last line (and always at the end)."""
        now = time.perf_counter()
        if not self.on or (now - self.last < self.every and done < self.total):
            return
        self.last = now
        rate = (now - self.began) / max(done, 1)
        left = rate * (self.total - done)
        print(f"{self.what}: {done}/{self.total} {self.unit}, {rate:.1f} s/{self.unit}, {left / 60:.1f} min left",
              file=sys.stderr, flush=True)
