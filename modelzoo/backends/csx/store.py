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
import contextlib
import ctypes
import itertools
import json
import logging
import os
import re
import socket
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from modelzoo.errors import UserError

log = logging.getLogger("modelzoo")
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
        # A private directory per run and rank, named after its process and marked as MemoryX's
        # (OWNER_MARKER): the store is rebuilt from the model or a checkpoint each run, so close()
        # removes it, and remove_stale_dirs() the one of a process that could not (SIGKILL).
        # Nothing else under the user's memoryx_dir is ever touched.
        self._files: dict[str, tuple[Path, torch.Size, torch.dtype]] = {}
        self._next_file = 0
        self._lock = threading.Lock()
        self._closed = False
        self._made_parents: list[Path] = []
        self.directory = None
        try:
            _make_dirs(Path(parent), self._made_parents)
            self.directory = Path(tempfile.mkdtemp(prefix=f"{prefix}{_HOST}-pid{os.getpid()}-", dir=parent))
            _write_marker(self.directory)
        except BaseException:
            self.close()
            raise
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
        with _disk_errors(path, "read"), open(path, "rb", buffering=0) as f:
            read_exactly(f, _bytes_of(tensor), path)
            _drop_cache(f)
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        path = self._path(key)
        tensor = tensor.detach().contiguous()
        tmp = path.with_name(path.name + ".new")
        with _disk_errors(path, "write", tmp):
            with open(tmp, "wb", buffering=0) as f:
                write_all(f, _bytes_of(tensor))
                _drop_cache(f)
            os.replace(tmp, path)  # a snapshot still open on the old file keeps its bytes
        self._files[key] = (path, tensor.shape, tensor.dtype)

    def snapshot(self, key: str) -> "Snapshot":
        path, shape, dtype = self._files[key]
        with _disk_errors(path, "snapshot"):
            return Snapshot(path, shape, dtype)

    def pop(self, key: str) -> None:
        entry = self._files.pop(key, None)
        if entry:
            entry[0].unlink(missing_ok=True)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def close(self) -> None:
        """Remove the directory with its files (idempotent), and the parents it had to create
        when they are empty."""
        if self._closed:
            return
        self._closed = True
        self._files.clear()
        if self.directory is not None:
            remove_own_dir(self.directory)
        for made in reversed(self._made_parents):
            try:
                made.rmdir()
            except OSError:  # not empty (another run's or a checkpoint's files): keep it
                break

    def describe(self) -> str:
        return f"disk ({self.directory})"


@contextlib.contextmanager
def _disk_errors(path: Path, doing: str, partial: Path | None = None):
    """A failed file operation (disk full, I/O error) as the one-line error a user can act on;
    ``partial``, a file half written, goes (its space with it). Raised in MemoryX's update thread
    too, it reaches the run at its next read or wait (the next step or checkpoint), before that
    checkpoint is written: the ones on disk stay as they were."""
    try:
        yield
    except OSError as e:
        if partial is not None:
            _unlink(partial)
        raise UserError(f"runconfig.csx.memoryx_dir: cannot {doing} disk MemoryX file {path} "
                        f"({e.strerror or e}); checkpoints already written are untouched") from None


# ------------------------------------------------------------ ownership of MemoryX directories

OWNER_MARKER = ".memoryx_owner.json"
_OWNER = "modelzoo disk MemoryX"
_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
# what a DiskStore writes: tensor files, their replacements in flight, snapshot links, and the
# sparse file behind a sharded checkpoint's placeholders (sharded_checkpoint.py)
_OWN_FILE = re.compile(r"^(\d+\.bin(\.new|\.snapshot\d+)?|placeholders-\w+\.bin)$")


def _existing_ancestor(directory: Path) -> tuple[Path, list[Path]]:
    """The nearest of ``directory`` and its parents that exists, and those below it (outermost
    first)."""
    missing = []
    while not directory.exists() and directory.parent != directory:
        missing.append(directory)
        directory = directory.parent
    return directory, missing[::-1]


def _make_dirs(directory: Path, made: list[Path]) -> None:
    """mkdir -p, appending each directory it creates to ``made`` (outermost first)."""
    for d in _existing_ancestor(directory)[1]:
        try:
            d.mkdir()
        except FileExistsError:
            continue
        made.append(d)


def unwritable(directory: Path) -> str | None:
    """Why a DiskStore could not be made under ``directory`` (which may not exist yet), found
    without writing anything; None when it looks fine."""
    existing, _ = _existing_ancestor(Path(directory))
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot: field 22 of /proc/PID/stat), to tell a
    live owner from a later process that got its PID; None where /proc does not say."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    """This boot of this machine's kernel: the same in every container on it, new after a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> int | None:
    """The PID namespace this process sees PIDs in (its inode): a PID means the same process only
    within one namespace, and a container has its own."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _write_marker(directory: Path) -> None:
    marker = {"owner": _OWNER, "version": 2, "host": _HOST, "boot_id": _boot_id(), "pid_namespace": _pid_namespace(),
              "pid": os.getpid(), "started": _process_start(os.getpid())}
    tmp = directory / f"{OWNER_MARKER}.new"
    tmp.write_text(json.dumps(marker) + "\n")
    os.replace(tmp, directory / OWNER_MARKER)  # whole or absent: a half-written one is nobody's


def _read_marker(dir_fd: int) -> dict | None:
    """The MemoryX owner marker in the open directory ``dir_fd`` (never through a link), or None."""
    try:
        fd = os.open(OWNER_MARKER, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as f:
            marker = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("owner") != _OWNER or type(marker.get("pid")) is not int:
        return None
    return marker


def _alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` in this PID namespace is the process that started at ``started`` (or may be)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    except (OverflowError, ValueError):  # no such PID can exist
        return False
    now = _process_start(pid)
    return started is None or now is None or now == started


def owner_state(marker: dict) -> tuple[str, str]:
    """("gone" | "alive" | "unknown", why) for the owner of a MemoryX directory. Gone only when
    provably so: on this host, and either the machine has booted since, or in this boot and this
    PID namespace its PID is free or held by a process started at another time. A marker of an
    earlier version (no boot id or namespace), another host's or another namespace's owner
    cannot be checked from here: unknown."""
    if marker.get("host") != _HOST:
        return "unknown", f"its owner ran on host {marker.get('host')!r}"
    boot, namespace = marker.get("boot_id"), marker.get("pid_namespace")
    if not isinstance(boot, str) or type(namespace) is not int:
        return "unknown", "its owner marker is of an earlier version (no boot id or PID namespace)"
    here = _boot_id()
    if here is None or _pid_namespace() is None:
        return "unknown", "this system does not tell its boot id or PID namespace"
    if boot != here:
        return "gone", "the machine has restarted since"
    if namespace != _pid_namespace():
        return "unknown", "its owner runs in another PID namespace (another container)"
    pid, started = marker["pid"], marker.get("started")
    if _alive(pid, started if isinstance(started, str) else None):
        return "alive", f"process {pid} is running"
    return "gone", f"process {pid} has ended"


def _open_dir(name: str | Path, dir_fd: int | None = None, follow: bool = False) -> int:
    """An fd of the directory ``name``, refusing a symbolic link unless ``follow`` (memoryx_dir
    itself may be a link the user made, to a larger disk say; nothing under it is followed)."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | (0 if follow else os.O_NOFOLLOW), dir_fd=dir_fd)


def remove_own_dir(directory: Path) -> bool:
    """Delete what a DiskStore wrote in ``directory`` (its marker last), then the directory.
    Anything else is left, with the directory and its marker. True when it is gone. Nothing is
    followed through a symbolic link: not ``directory`` itself, not a link inside it (unlinked
    like any file)."""
    directory = Path(directory)
    try:
        parent_fd = _open_dir(directory.parent, follow=True)
    except OSError:
        return False
    try:
        return _remove_own(parent_fd, directory.name)
    finally:
        os.close(parent_fd)


def _remove_own(parent_fd: int, name: str) -> bool:
    try:
        fd = _open_dir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return True
    except OSError:  # a link, or unreadable: not ours to walk
        return False
    try:
        for entry in os.listdir(fd):
            if _OWN_FILE.match(entry) or entry == f"{OWNER_MARKER}.new":
                _unlink_at(entry, fd)
        if set(os.listdir(fd)) <= {OWNER_MARKER}:
            _unlink_at(OWNER_MARKER, fd)
            os.rmdir(name, dir_fd=parent_fd)
            return True
    except FileNotFoundError:
        return True
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def _unlink_at(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def remove_stale_dirs(parent: str | os.PathLike) -> list[tuple[Path, dict]]:
    """Remove the MemoryX directories under ``parent`` whose owner process is provably gone
    (killed where no handler runs: SIGKILL, power loss; see ``owner_state``). A directory without
    a MemoryX marker is not MemoryX's and is left silently, so is one whose owner is alive; one
    whose owner cannot be checked from here is left with a warning line. Entries are lstat'ed:
    a symbolic link is never entered. Returns (directory, marker) of each removed."""
    removed = []
    parent = Path(parent)
    try:
        parent_fd = _open_dir(parent, follow=True)
    except OSError:
        return removed
    try:
        for name in sorted(os.listdir(parent_fd)):
            try:
                fd = _open_dir(name, dir_fd=parent_fd)  # a link or a file: not a candidate
            except OSError:
                continue
            try:
                marker = _read_marker(fd)
            finally:
                os.close(fd)
            if marker is None:
                continue
            state, why = owner_state(marker)
            if state == "unknown":
                log.warning("left %s: a disk MemoryX directory whose owner may still run (%s); remove it by "
                            "hand once that run is over", parent / name, why)
            elif state == "gone" and _remove_own(parent_fd, name):
                removed.append((parent / name, marker))
    except OSError:
        pass
    finally:
        os.close(parent_fd)
    return removed


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
