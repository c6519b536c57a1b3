"""Writing files and directories so that a reader sees all of them or nothing, and so that no
tool ever deletes what it did not write.

- ``write_file_atomically`` / ``atomic_file``: write beside the target, fsync, rename over it.
- ``output_dir``: a tool builds its whole output in a temporary directory beside the target and
  publishes it with a rename. The published directory carries ``OWNER_MARKER``, which names the
  tool and every file it wrote; ``--overwrite`` replaces a directory only when everything in it is
  listed there, and never one that holds one of the tool's inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from modelzoo.errors import UserError

OWNER_MARKER = ".written_by.json"


def fsync_dir(directory: str | Path) -> None:
    """Make a rename durable: a power cut must not undo it after the run went on."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", fsync: bool = True) -> Iterator:
    """Open a temporary file beside ``path``; on a clean exit it is flushed, fsynced and renamed
    over ``path``; on any error (or interrupt) it is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file_atomically(path: str | Path, data: str | bytes, fsync: bool = True) -> None:
    with atomic_file(path, "wb", fsync=fsync) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_error(path: str | Path, e: OSError) -> UserError:
    """The one-line error for an output that cannot be written."""
    return UserError(f"{path}: cannot write ({e.strerror or e})")


def _owned_names(directory: Path, tool: str) -> set[str] | None:
    """Names ``tool`` recorded writing into ``directory``, or None if it did not write it."""
    try:
        marker = json.loads((directory / OWNER_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("tool") != tool or not isinstance(marker.get("files"), list):
        return None
    return set(marker["files"]) | {OWNER_MARKER}


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except (ValueError, OSError):
        return False


def check_output_dir(out: str | Path, tool: str, overwrite: bool, inputs: Iterable[str | Path] = (),
                     flag: str = "--output_dir") -> None:
    """Refuse, in one line, an output directory this tool may not replace."""
    out = Path(out)
    for source in inputs:
        if _inside(Path(source), out):
            raise UserError(f"{flag} {out}: holds the input {source}; choose another output directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{flag} {out}: exists and is not a directory")
    present = {p.name for p in out.iterdir()}
    if not present:
        return
    if not overwrite:
        raise UserError(f"{flag} {out}: exists and is not empty (use --overwrite to replace an earlier output "
                        f"of this tool)")
    owned = _owned_names(out, tool)
    if owned is None:
        raise UserError(f"{flag} {out}: not written by {tool} (no {OWNER_MARKER} of it); --overwrite replaces "
                        f"only this tool's own output")
    foreign = sorted(present - owned)
    if foreign:
        raise UserError(f"{flag} {out}: holds {foreign[0]!r}, which {tool} did not write; --overwrite "
                        f"refuses to delete it")


@contextlib.contextmanager
def output_dir(out: str | Path, tool: str, overwrite: bool = False, inputs: Iterable[str | Path] = (),
               flag: str = "--output_dir") -> Iterator[Path]:
    """Yield a temporary directory to fill; on a clean exit it becomes ``out`` (an earlier output
    of the same tool is replaced), on any error it is removed and ``out`` is untouched."""
    out = Path(out)
    check_output_dir(out, tool, overwrite, inputs, flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot write ({e.strerror or e})") from None
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / OWNER_MARKER).write_text(json.dumps({"tool": tool, "files": files}, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        check_output_dir(out, tool, overwrite, inputs, flag)  # it may have changed while we worked
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{flag} {out}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Rename src to dst; an existing dst (already checked to be ours to replace) is moved aside
    first and deleted only afterwards, so a crash in between leaves one of the two whole."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
