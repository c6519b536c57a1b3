"""Where MemoryX keeps its tensors: host RAM, or one file per tensor on disk.

Both stores answer ``get(key)`` with a tensor and take ``put(key, tensor)`` after a change, so
MemoryX runs one code path. In RAM ``get`` returns the stored tensor itself (in-place updates
persist, ``put`` is a dict assignment). On disk every ``get`` reads the file into a fresh tensor
and every ``put`` writes it back with explicit I/O (``readinto``/``write``, not mmap): pages never
pile up in the process's resident set, so capacity is bounded by the disk, not by RAM. After each
transfer the file's pages are dropped from the page cache too (``posix_fadvise(DONTNEED)``): a
MemoryX larger than RAM is read cyclically, which a cache cannot serve, and the RAM belongs to
other processes.

``put`` writes a new file and renames it over the old one, so ``snapshot(key)`` can hand out a
lazily paged, read-only view (a private mmap plus an open file) of a tensor as it is now, which
later updates never change: checkpoints stream from such snapshots without loading the state.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch

_CHUNK = 1 << 30  # a single read()/write() moves at most ~2 GiB on Linux; loop in 1 GiB chunks


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a writable buffer (any dtype, including bfloat16)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class RamStore:
    resident = True

    def __init__(self):
        self._tensors: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self._tensors[key] = tensor

    def pop(self, key: str) -> None:
        self._tensors.pop(key, None)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def close(self) -> None:
        self._tensors.clear()

    def describe(self) -> str:
        return "RAM"


class DiskStore:
    resident = False

    def __init__(self, parent: str | os.PathLike, prefix: str = "memoryx-"):
        # A private directory per run and rank: the store is rebuilt from the model or a checkpoint
        # each run, and never touches other files under the user's memoryx_dir.
        Path(parent).mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._files: dict[str, tuple[Path, torch.Size, torch.dtype]] = {}
        self._next_file = 0
        self._lock = threading.Lock()
        atexit.register(self.close)  # the files are a working copy: checkpoints hold the state

    def _path(self, key: str) -> Path:
        with self._lock:  # MemoryX's update reads and writes in background threads
            if key in self._files:
                return self._files[key][0]
            self._next_file += 1
            return self.directory / f"{self._next_file:06d}.bin"

    def get(self, key: str) -> torch.Tensor:
        path, shape, dtype = self._files[key]
        tensor = torch.empty(shape, dtype=dtype)
        with open(path, "rb", buffering=0) as f:
            read_exactly(f, _bytes_of(tensor), path)
            _drop_cache(f)
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        path = self._path(key)
        tensor = tensor.detach().contiguous()
        tmp = path.with_name(path.name + ".new")
        with open(tmp, "wb", buffering=0) as f:
            write_all(f, _bytes_of(tensor))
            _drop_cache(f)
        os.replace(tmp, path)  # a snapshot still open on the old file keeps its bytes
        self._files[key] = (path, tensor.shape, tensor.dtype)

    def snapshot(self, key: str) -> "Snapshot":
        path, shape, dtype = self._files[key]
        return Snapshot(path, shape, dtype)

    def pop(self, key: str) -> None:
        entry = self._files.pop(key, None)
        if entry:
            entry[0].unlink(missing_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self._files.clear()

    def describe(self) -> str:
        return f"disk ({self.directory})"


class Snapshot:
    """A stored tensor as it was when taken: a hard link to its current file (which ``put`` then
    replaces rather than rewrites) that lives as long as this object. ``tensor`` maps it lazily
    (copy-on-write: nothing is read until touched); ``read_into`` reads it with explicit I/O."""

    _taken = itertools.count()

    def __init__(self, path: Path, shape: torch.Size, dtype: torch.dtype):
        self.path = path.with_name(f"{path.name}.snapshot{next(self._taken)}")
        os.link(path, self.path)
        weakref.finalize(self, _unlink, self.path)
        self.nbytes = shape.numel() * dtype.itemsize
        if shape.numel():
            self.tensor = torch.from_file(str(self.path), shared=False, size=shape.numel(), dtype=dtype).view(shape)
        else:
            self.tensor = torch.empty(shape, dtype=dtype)

    def read_into(self, buffer: memoryview) -> None:
        """The tensor's bytes into buffer, without touching the mapping."""
        with open(self.path, "rb", buffering=0) as f:
            read_exactly(f, buffer, self.path)
            _drop_cache(f)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def read_exactly(f, buffer: memoryview, path) -> None:
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:done + _CHUNK])
        if not n:
            raise OSError(f"{path}: MemoryX file is shorter than its tensor (truncated?)")
        done += n


def write_all(f, buffer: memoryview) -> None:
    done = 0
    while done < len(buffer):
        done += f.write(buffer[done:done + _CHUNK])


def _drop_cache(f) -> None:
    """Ask the kernel to drop the file's cached pages (dirty ones after their writeback starts)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


_libc = ctypes.CDLL(None, use_errno=True) if os.name == "posix" else None
_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim file-backed pages now; anonymous memory is left as it is
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def release_pages(tensor: torch.Tensor) -> None:
    """Let go of the resident pages of a tensor mapped from a file (e.g. a checkpoint loaded with
    ``mmap=True``) once its bytes have been copied: without this every tensor touched while
    loading a state larger than RAM would stay in the process's resident set until the whole
    state is dropped. Harmless on ordinary memory (MADV_PAGEOUT never discards data)."""
    if _libc is None or not tensor.numel():
        return
    start = tensor.data_ptr() // _PAGE * _PAGE
    end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)
