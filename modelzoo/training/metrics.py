"""Run logging: console + run.log, TensorBoard scalars under train/ and eval/."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("modelzoo")


class _EarlyRecords(logging.Handler):
    """What rank 0 logged before model_dir existed (a run creates it only once its inputs and
    starting checkpoint have been read): run.log gets these first, e.g. which checkpoint a
    fine-tuning run loaded."""

    LIMIT = 1000  # a process that never gets a model_dir (a tool) must not grow without bound

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)


def setup_logging(model_dir: Path | None, rank: int = 0) -> None:
    """Console on rank 0 (others only warn), plus model_dir/run.log appended across resumes."""
    early = [r for h in log.handlers if isinstance(h, _EarlyRecords) for r in h.records]
    close_logging()
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.addHandler(console)
    if model_dir is not None and rank == 0:
        file = logging.FileHandler(model_dir / "run.log")
        file.setFormatter(fmt)
        for record in early:
            file.handle(record)
        log.addHandler(file)
    elif rank == 0:
        log.addHandler(_EarlyRecords())


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
