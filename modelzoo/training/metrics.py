"""Run logging: console + run.log (run.rank{R}.log for the other ranks), TensorBoard scalars under
train/ and eval/."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("modelzoo")


class _EarlyRecords(logging.Handler):
    """What a rank logged before model_dir existed (a run creates it only once its inputs and
    starting checkpoint have been read): its log file gets these first, e.g. which checkpoint a
    fine-tuning run loaded."""

    LIMIT = 1000  # a process that never gets a model_dir (a tool) must not grow without bound

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)


class _RankConsole(logging.Handler):
    """The console of a rank other than 0: warnings and errors only (rank 0 prints the run's
    progress once). Not a StreamHandler on purpose: tqdm's logging_redirect_tqdm, which the
    trainer wraps its progress bar in, swaps every StreamHandler on stdout/stderr for one of its
    own that prints at any level, which printed every INFO line of every rank."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging's own policy for a failing handler
            self.handleError(record)


def rank_log(model_dir: Path, rank: int) -> Path:
    """Where a rank's log goes: model_dir/run.log for rank 0, model_dir/run.rank{R}.log for the others."""
    return Path(model_dir) / ("run.log" if rank == 0 else f"run.rank{rank}.log")


def setup_logging(model_dir: Path | None, rank: int = 0) -> None:
    """Rank 0: console plus model_dir/run.log, appended across resumes. Another rank: its own
    model_dir/run.rank{R}.log at the same level, and only warnings on the console. Without a
    model_dir (not made yet), records wait for ``attach_run_log``."""
    early = [r for h in log.handlers if isinstance(h, _EarlyRecords) for r in h.records]
    close_logging()
    log.setLevel(logging.INFO)
    log.propagate = False
    console = logging.StreamHandler(sys.stdout) if rank == 0 else _RankConsole()
    console.setFormatter(_FORMAT)
    log.addHandler(console)
    if model_dir is not None:
        log.addHandler(_run_log(model_dir, rank, early))
    else:
        log.addHandler(_EarlyRecords())


def attach_run_log(model_dir: Path, rank: int = 0) -> None:
    """The rank's log file joins the logging ``setup_logging(None, rank)`` set up, once model_dir
    exists, starting with what was logged before."""
    waiting = [h for h in log.handlers if isinstance(h, _EarlyRecords)]
    file = _run_log(model_dir, rank, [r for h in waiting for r in h.records])
    for handler in waiting:
        log.removeHandler(handler)
    log.addHandler(file)


_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")


def _run_log(model_dir: Path, rank: int, early: list[logging.LogRecord]) -> logging.FileHandler:
    if rank != 0:  # rank 0 creates model_dir once the run's inputs are read; this rank may be first
        Path(model_dir).mkdir(parents=True, exist_ok=True)
    file = logging.FileHandler(rank_log(model_dir, rank))
    file.setFormatter(_FORMAT)
    for record in early:
        file.handle(record)
    return file


def close_logging() -> None:
    """Close and detach the run's handlers (run.log stays closed between runs in one process)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


class ScalarWriters:
    """One TensorBoard SummaryWriter per phase, created lazily (rank 0 only)."""

    def __init__(self, model_dir: Path | None):
        self.model_dir = model_dir
        self.writers = {}

    def write(self, phase: str, step: int, scalars: dict[str, float]) -> None:
        if self.model_dir is None:
            return
        if phase not in self.writers:
            from torch.utils.tensorboard import SummaryWriter
            self.writers[phase] = SummaryWriter(str(self.model_dir / phase))
        for tag, value in scalars.items():
            self.writers[phase].add_scalar(tag, value, step)
        self.writers[phase].flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
