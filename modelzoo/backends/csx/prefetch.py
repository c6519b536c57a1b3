"""Hide weight streaming behind compute: fetch the next stages' weights in a background thread.

One worker thread runs the fetches in the order the wafer will consume them, ``depth`` stages
ahead of the stage computing (depth 0 fetches synchronously). A single worker keeps the order
of SwarmX broadcasts identical on every system.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


class Prefetcher:
    def __init__(self, fetch: Callable[[int], dict], depth: int):
        self.fetch = fetch
        self.depth = depth
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="memoryx-stream") if depth > 0 else None

    def stream(self, order: Iterable[int]) -> Iterator[dict]:
        """The fetched weights of each stage in ``order``, one at a time."""
        order = list(order)
        if self._worker is None:
            for stage in order:
                yield self.fetch(stage)
            return
        pending, submitted = deque(), 0
        try:
            for k in range(len(order)):
                while submitted < len(order) and submitted <= k + self.depth:
                    pending.append(self._worker.submit(self.fetch, order[submitted]))
                    submitted += 1
                yield pending.popleft().result()
        finally:  # an abandoned stream must not leave fetches running into the next one
            for future in pending:
                future.cancel()
            for future in pending:
                if not future.cancelled():
                    future.exception()

    def close(self, wait: bool = True) -> None:
        """Stop the worker: fetches not started are dropped; ``wait`` for the one running (without,
        a fetch stuck in a broadcast to a system that is gone does not hold up the caller)."""
        if self._worker is not None:
            self._worker.shutdown(wait=wait, cancel_futures=True)
