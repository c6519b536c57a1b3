"""Writing files and directories so that a reader sees all of them or nothing, and so that no
tool ever deletes what it did not write.

- ``write_file_atomically`` / ``atomic_file``: write beside the target, fsync, rename over it.
- ``output_file``: the same for a tool's ``--output`` file, refused in one line (``UserError``)
  when it cannot be written, is one of the tool's inputs, or exists and is not the tool's own.
  Beside it goes a hidden marker (``.NAME`` + ``OWNER_MARKER``) naming the tool and the size and
  sha256 of what it wrote: ``--overwrite`` replaces a file only when that marker names the tool
  and the file still holds those bytes (a user's file of the same name, or the tool's output
  edited since, is never replaced; a marker left by a deleted output does not make a new file
  there the tool's).
- ``output_dir`` / ``OutputDir``: a tool builds its whole output in a temporary directory beside
  the target and publishes it with a rename. The published directory carries ``OWNER_MARKER``,
  which names the tool and every file it wrote; ``--overwrite`` replaces a directory only when
  everything in it is listed there, and never one that holds one of the tool's inputs.

The same rule for both: without ``--overwrite`` nothing that exists is replaced; with it, only
the tool's own earlier output, never an input (symbolic links and relative paths resolved) and
never a symbolic link (the output would replace the link, not what it points to).
- ``NpyRows``: an ``.npy`` file written a block of rows at a time (its length unknown up front).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from modelzoo.errors import UserError

OWNER_MARKER = ".written_by.json"

# Recognises an output written before outputs carried OWNER_MARKER: the paths (relative, posix)
# the tool wrote into the directory, or None when it is not such an output.
Recogniser = Callable[[Path], "set[str] | None"]


def fsync_dir(directory: str | Path) -> None:
    """Make a rename durable: a power cut must not undo it after the run went on."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", fsync: bool = True, tmp: Path | None = None,
                before_replace: Callable[[Path], None] | None = None) -> Iterator:
    """Open a temporary file beside ``path`` (``tmp``, default a hidden per-process name); on a
    clean exit it is flushed, fsynced, handed to ``before_replace`` (which may still refuse) and
    renamed over ``path``; on any error (or interrupt) it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = tmp or _tmp_file(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file_atomically(path: str | Path, data: str | bytes, fsync: bool = True) -> None:
    with atomic_file(path, "wb", fsync=fsync) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_error(path: str | Path, e: OSError, flag: str | None = None) -> UserError:
    """The one-line error for an output that cannot be written."""
    return UserError(f"{flag + ' ' if flag else ''}{path}: cannot write ({e.strerror or e})")


def _ours(e: OSError, *places: Path) -> bool:
    """Whether an OSError came from writing our output (a write has no file name; a failed open,
    rename or mkdir names its path) rather than from, say, reading an input."""
    return e.filename is None or any(_inside(Path(e.filename), place) for place in places)


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except (ValueError, OSError):
        return False


def check_path(path: str | Path, flag: str) -> Path:
    """A path the OS can take (no NUL byte), as a Path."""
    if "\0" in str(path):
        raise UserError(f"{flag} {str(path)!r}: holds a NUL byte, which no file name can")
    return Path(path)


def check_inputs(out: Path, inputs: Iterable[str | Path], flag: str) -> None:
    """Refuse an output that is, or holds, one of the tool's inputs: replacing it would lose it."""
    for source in inputs:
        if source is not None and _inside(Path(source), out):
            raise UserError(f"{flag} {out}: {'is' if Path(source).resolve() == out.resolve() else 'holds'} "
                            f"the input {source}; choose another output")


def _no_link(out: Path, flag: str) -> None:
    if out.is_symlink():
        raise UserError(f"{flag} {out}: is a symbolic link; give the path it points to "
                        f"({os.path.realpath(out)}) or another name")


# ---------------------------------------------------------------------- output files

def file_marker(path: Path) -> Path:
    """Where the owner marker of the output file ``path`` goes: beside it, hidden."""
    return path.with_name(f".{path.name}{OWNER_MARKER}")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_file_marker(path: Path) -> dict | None:
    """The owner marker of output file ``path``: a dict with tool, file, size and sha256, else None."""
    try:
        marker = json.loads(file_marker(path).read_text())
    except (OSError, ValueError):
        return None
    keys = {"tool": str, "file": str, "size": int, "sha256": str}
    if not isinstance(marker, dict) or not all(isinstance(marker.get(k), t) for k, t in keys.items()):
        return None
    return marker


def _file_is_tools(path: Path, tool: str) -> bool:
    """Whether ``path`` is a regular file that ``tool`` wrote and nobody changed since."""
    marker = _read_file_marker(path)
    if marker is None or marker["tool"] != tool or marker["file"] != path.name:
        return False
    try:
        if not path.is_file() or path.stat().st_size != marker["size"]:
            return False
        return _sha256(path) == marker["sha256"]
    except OSError:
        return False


def check_output_file(path: str | Path, tool: str, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                      flag: str = "--output") -> None:
    """Refuse, in one line, an output file that cannot be written, is one of the inputs, or
    exists and may not be replaced: without ``overwrite`` nothing is, with it only a file
    ``tool`` wrote (its marker, unchanged bytes)."""
    path = check_path(path, flag)
    check_inputs(path, inputs, flag)
    _no_link(path, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise UserError(f"{flag} {path}: cannot write ({path.parent} {what})")
    if path.exists():
        if not overwrite:
            raise UserError(f"{flag} {path}: exists (use --overwrite to replace an earlier output of this tool)")
        if not _file_is_tools(path, tool):
            raise UserError(f"{flag} {path}: not written by {tool} (no {file_marker(path).name} of it, or changed "
                            f"since); --overwrite replaces only this tool's own output")
    marker = file_marker(path)
    if os.path.lexists(marker) and (marker.is_symlink() or _read_file_marker(path) is None):
        raise UserError(f"{flag} {path}: {marker.name} beside it is not an owner marker; refusing to replace it")


@contextlib.contextmanager
def output_file(path: str | Path, tool: str, overwrite: bool = False, mode: str = "w",
                inputs: Iterable[str | Path] = (), flag: str = "--output") -> Iterator:
    """``atomic_file`` for a tool's output: checked (``check_output_file``), and its temporary
    file opened, before the body runs (so a bad output is refused before any work), checked again
    before it replaces anything, and marked as the tool's; every failure to write it is one line
    (``UserError``). On any error nothing is left behind."""
    path = Path(path)
    check = dict(tool=tool, overwrite=overwrite, inputs=list(inputs), flag=flag)
    check_output_file(path, **check)

    def mark(tmp: Path) -> None:
        check_output_file(path, **check)  # it may have changed while we worked
        record = {"tool": tool, "file": path.name, "size": tmp.stat().st_size, "sha256": _sha256(tmp)}
        write_file_atomically(file_marker(path), json.dumps(record) + "\n")

    try:
        with atomic_file(path, mode, before_replace=mark) as f:
            yield f
    except OSError as e:
        if not _ours(e, _tmp_file(path), path, file_marker(path)):
            raise
        raise write_error(path, e, flag) from None


# ---------------------------------------------------------------------- output directories

def _present(directory: Path) -> set[str]:
    """Every file, link and directory under ``directory``, as posix paths relative to it."""
    found = set()
    for root, dirs, files in os.walk(directory):
        base = Path(root).relative_to(directory)
        found.update((base / name).as_posix() for name in dirs + files)
    return found


def _owned(directory: Path, tool: str, recognise: Recogniser | None) -> set[str] | None:
    """The paths ``tool`` wrote into ``directory`` (with the directories holding them), or None
    when it did not write it."""
    try:
        marker = json.loads((directory / OWNER_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and marker.get("tool") == tool and isinstance(marker.get("files"), list):
        files = set(map(str, marker["files"])) | {OWNER_MARKER}
    elif marker is None and recognise is not None:
        files = recognise(directory)
    else:
        files = None
    if files is None:
        return None
    return files | {parent.as_posix() for f in files for parent in Path(f).parents if parent != Path(".")}


def foreign_files(directory: str | Path, tool: str, recognise: Recogniser | None = None) -> list[str]:
    """The paths under ``directory`` that ``tool`` did not write (all of them when it has no
    OWNER_MARKER of that tool and ``recognise`` does not know it), sorted."""
    directory = Path(directory)
    present = _present(directory)
    owned = _owned(directory, tool, recognise)
    return sorted(present if owned is None else present - owned)


def check_output_dir(out: str | Path, tool: str, overwrite: bool, inputs: Iterable[str | Path] = (),
                     flag: str = "--output_dir", recognise: Recogniser | None = None) -> None:
    """Refuse, in one line, an output directory this tool may not replace: one holding an input,
    a non-empty one without ``overwrite``, and, even with it, one holding anything the tool did
    not write. ``recognise`` knows the tool's outputs from before they carried OWNER_MARKER."""
    out = check_path(out, flag)
    check_inputs(out, inputs, flag)
    _no_link(out, flag)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"{flag} {out}: exists and is not empty (use --overwrite to replace an earlier output "
                        f"of this tool)")
    owned = _owned(out, tool, recognise)
    if owned is None:
        raise UserError(f"{flag} {out}: not written by {tool} (no {OWNER_MARKER} of it); --overwrite replaces "
                        f"only this tool's own output")
    foreign = sorted(_present(out) - owned)
    if foreign:
        raise UserError(f"{flag} {out}: holds {foreign[0]!r}, which {tool} did not write; --overwrite "
                        f"refuses to delete it")


class OutputDir:
    """A directory a tool fills in ``path`` (a temporary directory beside ``out``) and then
    ``publish``es as ``out`` in one rename, or ``discard``s. Refused in one line (``UserError``)
    at construction, before any work: see ``check_output_dir``; an unwritable place too.

    marker: write OWNER_MARKER listing every file (else ``recognise`` alone must tell the tool's
    own outputs, e.g. a shard directory by its manifest).
    """

    def __init__(self, out: str | Path, tool: str, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                 flag: str = "--output_dir", recognise: Recogniser | None = None, marker: bool = True):
        self.out, self.tool, self.flag = Path(out), tool, flag
        self._check = dict(tool=tool, overwrite=overwrite, inputs=list(inputs), flag=flag, recognise=recognise)
        self._marker = marker
        check_output_dir(self.out, **self._check)
        parent = self.out.absolute().parent
        self._made = [p for p in [parent, *parent.parents] if not p.exists()]  # removed again on discard
        above = parent.parents[len(self._made) - 1] if self._made else parent
        if not above.is_dir():
            raise UserError(f"{flag} {self.out}: cannot write ({above} is not a directory)")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=parent))
        except OSError as e:
            self._remove_made()
            raise write_error(self.out, e, flag) from None

    def publish(self) -> None:
        try:
            if self._marker:
                record = {"tool": self.tool, "files": sorted(_present(self.path))}
                (self.path / OWNER_MARKER).write_text(json.dumps(record, indent=1) + "\n")
            self.path.chmod(0o755)  # mkdtemp makes it owner-only
            check_output_dir(self.out, **self._check)  # it may have changed while we worked
            replace_dir(self.path, self.out)
        except OSError as e:
            self.discard()
            raise write_error(self.out, e, self.flag) from None
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_made()

    def _remove_made(self) -> None:
        for made in self._made:  # deepest first; stops at one that now holds something
            try:
                made.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def output_dir(out: str | Path, tool: str, overwrite: bool = False, inputs: Iterable[str | Path] = (),
               flag: str = "--output_dir", recognise: Recogniser | None = None) -> Iterator[Path]:
    """Yield a temporary directory to fill; on a clean exit it becomes ``out`` (an earlier output
    of the same tool is replaced), on any error it is removed and ``out`` is untouched. Entered
    first thing, it refuses a bad ``out`` before any work (see ``OutputDir``)."""
    target = OutputDir(out, tool, overwrite, inputs, flag, recognise)
    try:
        yield target.path
    except OSError as e:
        target.discard()
        if not _ours(e, target.path):
            raise
        raise write_error(target.out, e, flag) from None
    except BaseException:
        target.discard()
        raise
    target.publish()


def replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (already checked to be ours to replace) is moved aside
    first and deleted only afterwards, so a crash in between leaves one of the two whole."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(old / dst.name, dst)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- arrays

class NpyRows:
    """An ``.npy`` file of rows appended a block at a time, for outputs too large to hold: the
    header first says no rows and is rewritten in place at ``close`` (numpy leaves room for the
    row count to grow), so the file is byte for byte what ``np.save`` of all rows gives."""

    def __init__(self, path: str | Path, row_shape: tuple[int, ...], dtype=np.float32):
        self.path, self.row_shape, self.dtype = Path(path), tuple(row_shape), np.dtype(dtype)
        self.rows = 0
        self._file = open(self.path, "wb")
        self._header()
        self._data_start = self._file.tell()

    def _header(self) -> None:
        np.lib.format.write_array_header_1_0(self._file, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (self.rows, *self.row_shape)})

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {block.shape[1:]}, expected {self.row_shape}")
        self._file.write(block.tobytes())
        self.rows += len(block)

    def close(self) -> None:
        end = self._file.tell()
        self._file.seek(0)
        self._header()
        if self._file.tell() != self._data_start:  # cannot happen below 10**21 rows
            raise RuntimeError(f"{self.path}: the .npy header changed length")
        self._file.seek(end)
        self._file.close()

    def __enter__(self) -> "NpyRows":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
