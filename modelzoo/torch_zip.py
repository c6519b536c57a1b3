"""Bound what reading a ``torch.save`` file may allocate, before torch reads it.

A torch.save file is a zip archive whose entries (``data.pkl``, one record per storage) torch
writes uncompressed, so together they expand to no more than the file itself. A zip entry may
nevertheless be deflate-compressed, and torch's reader inflates it into a buffer of the size the
archive declares: a few hundred kilobytes of ``data.pkl`` can claim a gigabyte (a zip bomb).
Every loader calls ``check_expansion`` first, which reads only the archive's directory.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from modelzoo.errors import CheckpointError

# What the entries may expand to beyond the file's own size: room for a legitimately compressed
# small pickle, far below what a bomb needs to hurt.
SLACK_BYTES = 1 << 20


def check_expansion(path: str | Path, error=CheckpointError) -> None:
    """Refuse (``error``, one line) a zip whose entries declare more bytes than the file holds
    plus ``SLACK_BYTES``. Files that are not zips (torch's legacy format) are left to torch."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return  # torch reports the unreadable file in its own words
    declared = sum(entry.file_size for entry in entries)
    if declared <= size + SLACK_BYTES:
        return
    biggest = max(entries, key=lambda entry: entry.file_size)
    ratio = biggest.file_size / max(biggest.compress_size, 1)
    raise error(f"{path}: its zip entries would expand to {declared:,} bytes from a {size:,}-byte file "
                f"({Path(biggest.filename).name} compressed {ratio:,.0f}x); refused as a zip bomb "
                f"(torch.save never compresses)")
