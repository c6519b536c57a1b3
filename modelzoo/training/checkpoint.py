"""Checkpoints: ``model_dir/checkpoint_{step}.mdl`` plus a ``.sha256`` seal, written atomically.

A checkpoint counts only when its seal exists and matches: a crash mid-write leaves at worst a
``*.tmp`` file (ignored) or an unsealed file (skipped with a message), never a half-read state,
and the previous checkpoints are untouched because nothing is ever overwritten in place.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path

import torch

from modelzoo.errors import CheckpointError

log = logging.getLogger("modelzoo")
_NAME = re.compile(r"^checkpoint_(\d+)\.mdl$")


def checkpoint_path(model_dir: str | Path, step: int) -> Path:
    return Path(model_dir) / f"checkpoint_{step}.mdl"


def _seal_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(model_dir: str | Path, step: int, state: dict) -> Path:
    """Serialize to memory, write to a temporary name, fsync, rename; then the seal."""
    path = checkpoint_path(model_dir, step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    try:
        _write_atomically(path, data)
        _write_atomically(_seal_path(path), hashlib.sha256(data).hexdigest().encode())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write checkpoint ({e.strerror or e}); "
                              "earlier checkpoints are untouched") from None
    return path


def list_checkpoints(model_dir: str | Path) -> list[tuple[int, Path]]:
    """Sealed-or-not checkpoint files in model_dir, oldest first."""
    found = []
    if Path(model_dir).is_dir():
        for p in Path(model_dir).iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def verify(path: Path) -> str | None:
    """None when the checkpoint's seal matches its bytes, else what is wrong."""
    seal = _seal_path(path)
    if not seal.exists():
        return "no .sha256 seal (interrupted write?)"
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != seal.read_text().strip():
        return "checksum mismatch (truncated or corrupted)"
    return None


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    problem = verify(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return torch.load(path, map_location="cpu", weights_only=False)


def newest_good_checkpoint(model_dir: str | Path) -> Path | None:
    """The newest checkpoint whose seal matches; bad ones are reported and skipped."""
    for step, path in reversed(list_checkpoints(model_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping %s: %s", path, problem)
    return None


def prune_checkpoints(model_dir: str | Path, keep: int) -> None:
    for _, path in list_checkpoints(model_dir)[:-keep]:
        path.unlink(missing_ok=True)
        _seal_path(path).unlink(missing_ok=True)


def check_model_state(path_or_name, saved: dict, expected: dict[str, torch.Size]) -> None:
    """Refuse a checkpoint of another architecture, naming the first mismatching tensors."""
    missing = [k for k in expected if k not in saved]
    if missing:
        raise CheckpointError(f"{path_or_name}: checkpoint has no tensor {missing[0]!r} "
                              f"({len(missing)} missing): it belongs to another model")
    for name, shape in expected.items():
        if tuple(saved[name].shape) != tuple(shape):
            raise CheckpointError(f"{path_or_name}: tensor {name!r} has shape {tuple(saved[name].shape)} in the "
                                  f"checkpoint but {tuple(shape)} in this model")
    extra = [k for k in saved if k not in expected]
    if extra:
        raise CheckpointError(f"{path_or_name}: checkpoint has tensor {extra[0]!r} that this model lacks")
