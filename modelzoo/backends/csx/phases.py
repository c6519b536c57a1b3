"""Where a CSX step's time goes, phase by phase, summed over steps.

Phases: compute on the wafer, waiting for weights that the prefetch did not hide, writing
gradients into MemoryX, waiting for the optimizer (the global norm, and the next forward waiting
for an update still running), and, overlapped with the rest, reading weights out of MemoryX (the
prefetch thread) and the optimizer update (MemoryX's thread; counted in the step during which
it finished).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

log = logging.getLogger("modelzoo")
PHASES = ("compute", "weights_wait", "gradients_out", "optimizer", "weights_read", "optimizer_update")


class PhaseTimes:
    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)  # over all steps
        self.steps = 0
        self.current = dict.fromkeys(PHASES, 0.0)  # of the step running
        self._start = self._read_before = self._update_before = 0.0

    def begin_step(self, update_seconds: float) -> None:
        """``update_seconds``: MemoryX's update time so far (its thread keeps the total)."""
        self._start = time.perf_counter()
        self.current = dict.fromkeys(PHASES, 0.0)
        self._read_before, self._update_before = self.seconds["weights_read"], update_seconds

    def read_weights(self, seconds: float) -> None:
        """Weights read out of MemoryX (the prefetch thread), overlapped with the rest."""
        self.seconds["weights_read"] += seconds

    def timed(self, stream: Iterator, order: list[int], ready: Callable, updated_at: Callable[[int], float]):
        """The weight stream of stages ``order`` (each item made ``ready``), counting the time
        the wafer waits for it: as optimizer while the update of the stage's weights (started by
        the previous step; ``updated_at(stage)`` says when it finished) was still running, as
        weights_wait after."""
        for stage in order:
            start = time.perf_counter()
            try:
                weights = ready(next(stream))
            finally:
                waited = time.perf_counter() - start
                stalled = min(max(updated_at(stage) - start, 0.0), waited)
                self.current["optimizer"] += stalled
                self.current["weights_wait"] += waited - stalled
            yield weights

    def end_step(self, optimizer_start: float, update_seconds: float) -> None:
        now = time.perf_counter()
        phases = self.current
        stalled = phases["optimizer"]  # so far: the wafer waiting for weights the update had not written
        phases["compute"] = optimizer_start - self._start - phases["weights_wait"] - phases["gradients_out"] - stalled
        phases["optimizer"] = stalled + now - optimizer_start
        phases["weights_read"] = self.seconds["weights_read"] - self._read_before
        phases["optimizer_update"] = update_seconds - self._update_before
        for k in ("compute", "weights_wait", "gradients_out", "optimizer", "optimizer_update"):
            self.seconds[k] += phases[k]
        self.steps += 1
        # a line per step where steps take long enough for it to matter (large models)
        log.log(logging.INFO if now - self._start >= 10 else logging.DEBUG,
                "CSX step %.1f s: %s", now - self._start, describe_phases(phases))


def describe_phases(phases: dict[str, float]) -> str:
    return (f"compute {phases['compute']:.1f} s, waiting for weights {phases['weights_wait']:.1f} s, "
            f"gradients to MemoryX {phases['gradients_out']:.1f} s, optimizer {phases['optimizer']:.1f} s "
            f"(weights read from MemoryX {phases['weights_read']:.1f} s, optimizer update "
            f"{phases['optimizer_update']:.1f} s, overlapped with compute)")
