"""Gradients on their way from the wafer to MemoryX.

On a CUDA wafer a stage's gradients reach host memory on a stream of their own and are taken in
one stage later, while the next stage computes. A tied weight's uses are summed per micro-batch
(as autograd does in one backward pass), then reduced over systems (SwarmX) into MemoryX; after
the last micro-batch each gradient MemoryX owns is finalized (unscaled, masked, its norm taken).
"""

from __future__ import annotations

import time
from collections import deque

import torch

from modelzoo.backends.csx.phases import PhaseTimes


class GradientRoute:
    def __init__(self, stage_names: list[list[str]], link, swarm, memoryx, times: PhaseTimes):
        self.link, self.swarm, self.memoryx, self.times = link, swarm, memoryx, times
        self.uses: dict[str, int] = {}  # name -> stages that use it (a tied weight: several)
        for names_of_stage in stage_names:
            for name in names_of_stage:
                self.uses[name] = self.uses.get(name, 0) + 1
        self._outbox: deque = deque()  # gradients on their way to host memory (link.to_host)
        self._final = False
        self._uses_left: dict[str, int] = {}
        self._pending: dict[str, torch.Tensor] = {}

    def begin_micro_batch(self, final: bool) -> None:
        self._final = final
        self._uses_left = dict(self.uses)
        self._pending = {}

    def out(self, stage: int, grads: dict[str, torch.Tensor | None]) -> None:
        """Gradients leaving the wafer (the wafer's GradientSink)."""
        start = time.perf_counter()
        self._outbox.append(self.link.to_host(grads))
        while len(self._outbox) > self.link.in_flight:
            self._arrive(self._outbox.popleft()())
        self.times.current["gradients_out"] += time.perf_counter() - start

    def collect(self) -> None:
        """The gradients still on their way out when a micro-batch's backward pass ends."""
        start = time.perf_counter()
        while self._outbox:
            self._arrive(self._outbox.popleft()())
        self.times.current["gradients_out"] += time.perf_counter() - start

    def _arrive(self, grads: dict[str, torch.Tensor | None]) -> None:
        ready = {}
        for name, grad in grads.items():
            if grad is not None:
                grad = grad.float()
                self._pending[name] = grad if name not in self._pending else self._pending[name] + grad
            self._uses_left[name] -= 1
            if self._uses_left[name] == 0 and name in self._pending:
                ready[name] = self._pending.pop(name)
        for name, grad in self.swarm.reduce_gradients(ready).items():
            self.memoryx.add_gradient(name, grad)
        if self._final:
            for name in ready:
                if self.memoryx.owns(name):
                    self.memoryx.finalize(name)
