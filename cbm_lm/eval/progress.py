"""Console progress of an evaluation: the stage, its number, elapsed time and an ETA.

Stages carry a rough cost weight; after each finished stage the ETA is the
elapsed time scaled by the remaining weight (the first estimate is rough).
"""

from __future__ import annotations

import sys
import time


def _fmt(seconds: float) -> str:
    m, s = divmod(int(max(seconds, 0)), 60)
    return f"{m}m{s:02d}s"


class Progress:
    def __init__(self, stages: dict[str, float], stream=sys.stdout):
        self.weights = dict(stages)
        self.total = sum(self.weights.values())
        self.done = 0.0
        self.t0 = time.time()
        self.stream = stream
        self.index = 0

    def start(self, stage: str, what: str) -> None:
        self.index += 1
        elapsed = time.time() - self.t0
        eta = "?" if self.done == 0 else _fmt(elapsed * (self.total - self.done) / self.done)
        print(f"[{self.index}/{len(self.weights)}] {what} (elapsed {_fmt(elapsed)}, eta {eta})",
              file=self.stream, flush=True)
        self._stage = stage

    def finish(self, summary: str = "") -> None:
        self.done += self.weights.get(self._stage, 0.0)
        if summary:
            print(f"      {summary}", file=self.stream, flush=True)
