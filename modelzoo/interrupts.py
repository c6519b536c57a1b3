"""SIGTERM and SIGINT as an exception, so that a run's ``finally`` blocks and ``close()`` calls run.

Schedulers and torchrun stop a job with SIGTERM, whose default action ends the process on the
spot: threads, disk MemoryX files and process groups are left behind. Inside ``signals_raise()``
the first SIGTERM or SIGINT raises ``Interrupted`` in the main thread instead; later ones, while
that unwinds, are recorded and otherwise ignored so that cleanup is not cut short (SIGKILL still
ends everything). One that lands in a finalizer, which would swallow the exception, is raised
by the training loop's next ``raise_if_interrupted()``. ``Interrupted`` is a KeyboardInterrupt:
``except Exception`` does not swallow it, and a forked DataLoader worker that inherits the
handler exits quietly on it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import weakref
from typing import Iterator

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


@contextlib.contextmanager
def signals_raise() -> Iterator[list[int]]:
    """Yield the list of signals received (in order); the previous handlers return on exit.
    Outside the main thread (where Python cannot handle signals) it changes nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    raised = []

    def handler(signum, frame):
        received.append(signum)
        if not raised and not _in_finalizer(frame):  # lost there: raise_if_interrupted() raises it
            raised.append(signum)
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in HANDLED}
    _active.append(received)
    try:
        yield received
    finally:
        _active.remove(received)
        for s, h in previous.items():
            signal.signal(s, h)


_active: list[list[int]] = []
_FINALIZERS = {weakref.finalize.__call__.__code__}


def _in_finalizer(frame) -> bool:
    """Whether the signal interrupted a finalizer or ``__del__``, which would only print the
    exception and carry on."""
    while frame is not None:
        if frame.f_code in _FINALIZERS or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def raise_if_interrupted() -> None:
    """Raise ``Interrupted`` again if a signal came and the run is still going: the handler's
    exception is lost when the signal lands in code that swallows exceptions (a finalizer, a
    ``__del__``). A loop calls this once per iteration."""
    for received in _active:
        if received:
            raise Interrupted(received[0])
