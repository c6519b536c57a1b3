"""Token shards: memory-mappable ``.npy`` windows, a per-record table beside them, and a small
``manifest.json``.

A shard directory holds ``tokens_00000.npy``, ``tokens_00001.npy``, ... each a uint8 array of shape
(n_windows, max_seq_length), right-padded with [PAD]; ``records.npy``, an int64 array with a row
per record (in shard order) and the columns the manifest names; ``record_ids.bin``, the records'
ids as UTF-8 bytes back to back (the table's "id_end" column says where each ends); and a
manifest::

    {"format": "codon-token-shards", "format_version": 2, "dtype": "uint8",
     "max_seq_length": L, "num_windows": N, "num_tokens": T (non-pad), "pad_id": 3,
     "tokenizer": {"file": "codon_wordlevel_69vocab.json", "sha256": ..., "vocab_size": 69},
     "num_records": R,
     "records": {"columns": ["id_end", "num_windows", "num_tokens"],
                 "table": {"name": "records.npy", "shape": [R, 3], "sha256": ...},
                 "ids": {"name": "record_ids.bin", "bytes": B, "sha256": ...}},
     "files": [{"name": "tokens_00000.npy", "shape": [n, L], "sha256": ...}, ...],
     "created_by": {"command": ..., "options": {...}}}

The manifest stays a few kilobytes however many records there are (GenSLM's 110 million genes
would make gigabytes of JSON, parsed at every start): readers map the table and the ids
(``ShardSet.records``, a ``RecordTable``) and touch only the rows they use. Nothing depends on
time or absolute paths, so the same inputs give byte-identical shards. Format version 1 held the
records in the manifest as a list of {"id", "num_windows", "num_tokens"[, "window", "offset"]};
such shards are still read (the list becomes the same table, in memory).

Packed shards (``prepare_genomes --pack_sequences``) say ``"packed": true`` after "pad_id". Their
windows hold whole records back to back, each followed by one [SEP] (``CodonTokenizer.sep_id``),
then [PAD] to the end; a record too long for one window (num_tokens + 1 > max_seq_length) has
windows of its own, cut as in unpacked shards, with no [SEP]. The table adds the columns "window"
(the row a record starts in) and "offset" (its first token's position there): its num_tokens codons
are ``row[offset:offset + num_tokens]`` of that row (the long ones: offset 0, then the next rows).
num_windows is 1 for a record that shares a window; num_tokens counts codons, not the [SEP], so
the manifest's num_tokens (every non-[PAD] position) is the records' sum plus one per [SEP].
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import DataError
from modelzoo.files import OutputDir

FORMAT = "codon-token-shards"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the records listed in the manifest itself
MANIFEST = "manifest.json"
RECORD_TABLE = "records.npy"
RECORD_IDS = "record_ids.bin"
COLUMNS = ("id_end", "num_windows", "num_tokens")
PACKED_COLUMNS = COLUMNS + ("window", "offset")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Collect windows record by record; ``close()`` publishes the directory in one rename.

    Use as a context manager: on an exception the temporary directory is deleted and ``out_dir``
    is left untouched, so a reader never sees a half-written shard set.

    Memory stays bounded however many windows and records are added: rows go straight into the
    open ``tokens_*.npy`` file (hashed as they are written), records into ``records.npy`` and
    ``record_ids.bin``.

    packed: the windows hold several records each (``data_preparation.prepare_genomes
    --pack_sequences``); records are then added apart from the rows (``add_rows`` and
    ``add_records``, with the window each starts in and its offset there), and the manifest says
    ``"packed": true``.
    """

    def __init__(self, out_dir, max_seq_length: int, tokenizer: CodonTokenizer,
                 windows_per_file: int = 1 << 16, command: str | None = None,
                 options: dict | None = None, overwrite: bool = False, packed: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise DataError(f"{self.out_dir}: already exists (refusing to overwrite)")
        if max_seq_length < 1 or windows_per_file < 1:
            raise ValueError("max_seq_length and windows_per_file must be positive")
        self.max_seq_length = max_seq_length
        self.tokenizer = tokenizer
        self.windows_per_file = windows_per_file
        self.created_by = {"command": command, "options": options or {}}
        self.overwrite = overwrite
        self.packed = packed
        # Built beside the target, published in one rename; overwrite replaces only a shard directory.
        self._target = OutputDir(self.out_dir, "ShardWriter", overwrite, flag="shard directory",
                                 recognise=shard_files, marker=False)
        self._tmp = self._target.path
        self._file: _NpyStream | None = None
        self._files: list[dict] = []
        self._columns = PACKED_COLUMNS if packed else COLUMNS
        self._table = _NpyStream(self._tmp / RECORD_TABLE, 0, (len(self._columns),), np.int64)
        self._ids = _HashedFile(self._tmp / RECORD_IDS)
        self.num_records = 0
        self.num_windows = 0
        self.num_tokens = 0
        self._closed = False
        self._manifest: dict | None = None

    @property
    def manifest(self) -> dict | None:
        """The published manifest (read back from disk on first use), None before ``close()``."""
        if self._manifest is None and self._closed and (self.out_dir / MANIFEST).is_file():
            self._manifest = json.loads((self.out_dir / MANIFEST).read_text())
        return self._manifest

    def add(self, record_id: str, windows: np.ndarray) -> None:
        """Append one record's windows: uint8 array (k, max_seq_length), already [PAD]-padded."""
        windows = np.asarray(windows)
        self.add_many([record_id], [len(windows)] if windows.ndim else [0], windows)

    def add_many(self, record_ids: list[str], windows_per_record, windows: np.ndarray,
                 tokens_per_record=None) -> None:
        """Append several records at once: ``windows`` holds their rows back to back, the first
        ``windows_per_record[0]`` rows being the first record's, and so on. One call per batch of
        records keeps per-record Python work out of preparing sets of many short genes.
        tokens_per_record: each record's non-[PAD] tokens when the caller knows them (else counted)."""
        if self.packed:
            raise ValueError("a packed ShardWriter takes add_rows and add_records")
        windows = self._checked_rows(windows, record_ids)
        counts = np.asarray(windows_per_record, dtype=np.int64)
        name = record_ids[0] if len(record_ids) == 1 else f"{len(record_ids)} records"
        if len(counts) != len(record_ids) or counts.sum() != len(windows) or (counts < 0).any():
            raise ValueError(f"{name}: windows_per_record {counts.tolist()[:5]}… does not cut "
                             f"{len(windows)} rows into {len(record_ids)} records")
        if tokens_per_record is None:
            row_tokens = np.count_nonzero(windows != self.tokenizer.pad_id, axis=1)
            starts = np.concatenate(([0], np.cumsum(counts)))[:-1]
            # reduceat over an empty run (a record with no window) gives the next row: masked to 0
            tokens = np.add.reduceat(np.append(row_tokens, 0), starts) * (counts > 0)
        else:
            tokens = np.asarray(tokens_per_record, dtype=np.int64)
        self.add_records(record_ids, counts, tokens)
        self.add_rows(windows, int(tokens.sum()))

    def add_records(self, record_ids: list[str], num_windows, num_tokens, window=None, offset=None) -> None:
        """Table rows of records whose rows are (or will be) added with ``add_rows``; a packed
        writer's also give the window each record starts in and its token offset there."""
        if (window is None) == self.packed or (offset is None) == self.packed:
            raise ValueError("window and offset are given for the records of packed windows, and only then")
        if not len(record_ids):
            return
        encoded, lengths = _utf8(record_ids)
        id_end = self._ids.size + np.cumsum(lengths)
        self._ids.write(encoded)
        columns = (id_end, num_windows, num_tokens) + ((window, offset) if self.packed else ())
        self._table.write_rows(np.column_stack([np.asarray(c, dtype=np.int64).reshape(-1) for c in columns]))
        self.num_records += len(record_ids)

    def add_rows(self, windows: np.ndarray, num_tokens: int | None = None) -> None:
        """Append rows (uint8 (k, max_seq_length)); num_tokens: their non-[PAD] tokens, if known."""
        windows = self._checked_rows(windows, ["rows"])
        if num_tokens is None:
            num_tokens = int(np.count_nonzero(windows != self.tokenizer.pad_id))
        self.num_tokens += int(num_tokens)
        self.num_windows += len(windows)
        while len(windows):
            if self._file is None:
                name = f"tokens_{len(self._files):05d}.npy"
                self._file = _NpyStream(self._tmp / name, self.windows_per_file, (self.max_seq_length,))
            room = self.windows_per_file - self._file.rows
            self._file.write_rows(windows[:room])
            windows = windows[room:]
            if self._file.rows == self.windows_per_file:
                self._files.append(self._file.finish())
                self._file = None

    def _checked_rows(self, windows, record_ids) -> np.ndarray:
        windows = np.asarray(windows)
        if windows.ndim != 2 or windows.shape[1] != self.max_seq_length or windows.dtype != np.uint8:
            name = record_ids[0] if len(record_ids) == 1 else f"{len(record_ids)} records"
            raise ValueError(f"record {name!r}: windows must be uint8 (k, {self.max_seq_length}), "
                             f"got {windows.dtype} {windows.shape}")
        return windows

    def close(self) -> None:
        """Write the last file, the record table and the manifest, then move the directory into place."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        if self._file is not None:
            self._files.append(self._file.finish())
            self._file = None
        table = self._table.finish()
        ids = {"name": RECORD_IDS, "bytes": self._ids.size, "sha256": self._ids.finish()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": "uint8",
            "max_seq_length": self.max_seq_length,
            "num_windows": self.num_windows,
            "num_tokens": self.num_tokens,
            "pad_id": self.tokenizer.pad_id,
            **({"packed": True} if self.packed else {}),
            "tokenizer": {"file": self.tokenizer.json_path.name, "sha256": self.tokenizer.sha256,
                          "vocab_size": self.tokenizer.vocab_size},
            "num_records": self.num_records,
            "records": {"columns": list(self._columns), "table": table, "ids": ids},
            "files": self._files, "created_by": self.created_by,
        }
        with open(self._tmp / MANIFEST, "w", encoding="ascii") as out:
            out.write("{\n" + ",\n".join(map(_manifest_line, manifest.items())) + "\n}\n")
        self._target.publish()
        self._closed = True

    def abort(self) -> None:
        if not self._closed:
            for stream in (self._file, self._table, self._ids):
                if stream is not None:
                    stream.fh.close()
            self._target.discard()
            self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _HashedFile:
    """A file written as it comes, hashed on the way."""

    def __init__(self, path: Path):
        self.path, self.size = path, 0
        self.fh = open(path, "wb")
        self.digest = hashlib.sha256()

    def write(self, data) -> None:
        self.digest.update(data)
        self.fh.write(data)
        self.size += len(memoryview(data).cast("B"))

    def finish(self) -> str:
        self.fh.close()
        return self.digest.hexdigest()


class _NpyStream(_HashedFile):
    """A ``.npy`` file of rows (``row_shape``, ``dtype``) written as they come, hashed on the way:
    byte for byte what ``np.save`` writes. The header promises ``rows`` rows; a file that ends
    with another number gets its header rewritten (and is hashed again by reading it back: a
    split's last token file, and the record table, whose length is not known ahead)."""

    def __init__(self, path: Path, rows: int, row_shape: tuple[int, ...], dtype=np.uint8):
        super().__init__(path)
        self.planned, self.row_shape, self.dtype, self.rows = rows, tuple(row_shape), np.dtype(dtype), 0
        self.header = _npy_header((rows, *self.row_shape), self.dtype)
        self.write(self.header)

    def write_rows(self, rows: np.ndarray) -> None:
        self.write(np.ascontiguousarray(rows, dtype=self.dtype))
        self.rows += len(rows)

    def finish(self) -> dict:
        shape = [self.rows, *self.row_shape]
        if self.rows == self.planned:
            return {"name": self.path.name, "shape": shape, "sha256": super().finish()}
        self.fh.close()
        header = _npy_header(tuple(shape), self.dtype)
        if len(header) == len(self.header):
            with open(self.path, "r+b") as fh:
                fh.write(header)
        else:  # never with numpy's 64-byte header alignment, but do not depend on it
            body = self.path.read_bytes()[len(self.header):]
            self.path.write_bytes(header + body)
        return {"name": self.path.name, "shape": shape, "sha256": file_sha256(self.path)}


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _manifest_line(item) -> str:
    """One top-level manifest key: lists one entry a line (readable, diffable, not 5 lines an entry)."""
    key, value = item
    if isinstance(value, list) and value:
        return f" {json.dumps(key)}: [\n  " + ",\n  ".join(map(json.dumps, value)) + "\n ]"
    return f" {json.dumps(key)}: {json.dumps(value)}"


def _utf8(ids: list[str]) -> tuple[bytes, np.ndarray]:
    """The ids' UTF-8 bytes back to back, and each one's length in bytes (ids are usually ASCII:
    one encode for all of them)."""
    text = "".join(ids)
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) == len(text):
        return encoded, np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    parts = [i.encode("utf-8", "surrogatepass") for i in ids]
    return b"".join(parts), np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))


def shard_files(directory: Path, command: str | None = None) -> set[str] | None:
    """The files a ShardWriter wrote into ``directory`` (its manifest lists them), or None when
    it is not a shard directory (of ``command``'s making, when given)."""
    try:
        m = json.loads((Path(directory) / MANIFEST).read_text())
        if m["format"] != FORMAT or (command is not None and m["created_by"]["command"] != command):
            return None
        records = m["records"]  # a list in format version 1: no side files
        side = {str(records[k]["name"]) for k in ("table", "ids")} if isinstance(records, dict) else set()
        return {MANIFEST} | side | {str(f["name"]) for f in m["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# A manifest up to this size is parsed whole (format version 2's are a few kilobytes: its records lie in a
# side table); a larger one (version 1 listed a gene set's millions of records in it) only at its
# head and tail, where ShardWriter put every top-level key but the records.
PARSE_WHOLE_BYTES = 1 << 20


def manifest_fields(data_dir) -> dict | None:
    """The top-level fields of the shards' manifest in ``data_dir`` (max_seq_length, packed,
    created_by, ...; the records may be absent), or None where there is no readable manifest:
    what a params check needs, without parsing the records."""
    path = Path(data_dir) / MANIFEST
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            fields = _head_and_tail(f, size) if size > PARSE_WHOLE_BYTES else None
            if fields is None:
                f.seek(0)
                fields = json.loads(f.read())
    except (OSError, ValueError):  # ValueError: invalid JSON or UTF-8, or a NUL byte in the path
        return None
    return fields if isinstance(fields, dict) else None


def _head_and_tail(f, size: int) -> dict | None:
    """ShardWriter's layout: one top-level key a line, then "records", then "files" and
    "created_by"; None for a manifest laid out otherwise."""
    head = []
    for line in f:
        if line.startswith(b' "records": '):
            break
        head.append(line)
    else:
        return None
    records, tail, start = f.tell() - 1, b"", size  # from the newline that ends the "records" line
    while b'\n "files": ' not in tail and start > records:  # read back from the end until "files"
        start = max(records, start - (1 << 16))
        f.seek(start)
        tail = f.read(size - start)
    if b'\n "files": ' not in tail:
        return None
    text = b"".join(head[1:]) + tail[tail.rindex(b'\n "files": ') + 1:]
    try:
        return json.loads(b"{" + text)
    except ValueError:
        return None


class ShardSet:
    """Read-only view over a shard directory; rows are memory-mapped, never loaded in bulk.

    The arrays are opened lazily in each process, so a ShardSet can be sent to DataLoader workers.
    """

    def __init__(self, data_dir, verify: bool = True, tokenizer: CodonTokenizer | None = None):
        self.data_dir = Path(data_dir)
        self.manifest = self._read_manifest()
        m = self.manifest
        self.max_seq_length = int(m["max_seq_length"])
        self.pad_id = int(m["pad_id"])
        expected = (tokenizer or CodonTokenizer()).sha256
        if m["tokenizer"].get("sha256") != expected:
            raise DataError(f"{self.data_dir}: shards were made with another tokenizer "
                            f"(sha256 {str(m['tokenizer'].get('sha256'))[:12]}…, expected {expected[:12]}…)")
        self._paths = [self.data_dir / f["name"] for f in m["files"]]
        rows = []
        for f, path in zip(m["files"], self._paths):
            rows.append(self._check_file(f, path, verify))
        if sum(rows) != m["num_windows"]:
            raise DataError(f"{self.data_dir}/{MANIFEST}: num_windows {m['num_windows']} "
                            f"but the files hold {sum(rows)} rows")
        self._offsets = np.cumsum([0] + rows)
        self._arrays: list[np.ndarray] | None = None
        records = m.pop("records")  # the manifest keeps the top-level fields only
        packed = bool(m.get("packed", False))
        if isinstance(records, list):  # format version 1
            self.records = RecordTable.from_entries(records, packed, self.data_dir / MANIFEST)
        else:
            self.records = RecordTable.open(self.data_dir, records, m.get("num_records"), packed, verify)

    def _read_manifest(self) -> dict:
        path = self.data_dir / MANIFEST
        if not self.data_dir.is_dir():
            raise DataError(f"{self.data_dir}: shard directory not found")
        if not path.is_file():
            raise DataError(f"{self.data_dir}: no {MANIFEST} (not a shard directory? "
                            f"make one with python -m data_preparation.prepare_genomes)")
        try:
            m = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: invalid JSON ({exc})") from None
        required = ("format", "format_version", "max_seq_length", "num_windows", "pad_id",
                    "tokenizer", "records", "files")
        missing = [k for k in required if not isinstance(m, dict) or k not in m]
        if missing:
            raise DataError(f"{path}: not a shard manifest, missing {', '.join(missing)}")
        if m["format"] != FORMAT or m["format_version"] not in READABLE_VERSIONS:
            raise DataError(f"{path}: format {m['format']!r} v{m['format_version']}, this code reads {FORMAT!r} "
                            f"v{' and v'.join(map(str, READABLE_VERSIONS))} (prepare the shards again with "
                            f"python -m data_preparation.prepare_genomes)")
        if isinstance(m["records"], list) != (m["format_version"] == 1):
            raise DataError(f"{path}: format v{m['format_version']} with records as a "
                            f"{type(m['records']).__name__}, not a shard manifest this code wrote")
        return m

    def _check_file(self, entry: dict, path: Path, verify: bool) -> int:
        if not path.is_file():
            raise DataError(f"{path}: listed in {MANIFEST} but missing")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy file ({exc})") from None
        want = (int(entry["shape"][0]), self.max_seq_length)
        if arr.dtype != np.uint8 or arr.shape != want or list(want) != entry["shape"]:
            raise DataError(f"{path}: {arr.dtype} {arr.shape}, manifest says uint8 "
                            f"{tuple(entry['shape'])} with max_seq_length {self.max_seq_length}")
        if verify and file_sha256(path) != entry["sha256"]:
            raise DataError(f"{path}: sha256 checksum mismatch (file changed or corrupt)")
        return want[0]

    @property
    def record_ids(self) -> list[str]:
        """Every record's id, in shard order (a list: for sets small enough to hold one; else
        ``records.ids()`` streams them)."""
        return list(self.records.ids())

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows in {self.data_dir}")
        if self._arrays is None:
            self._arrays = [np.load(p, mmap_mode="r") for p in self._paths]
        f = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self._arrays[f][i - self._offsets[f]]

    def __getstate__(self) -> dict:
        # Memory maps do not pickle as maps; each worker process reopens its own.
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state


class RecordTable:
    """Each record of a shard set, in shard order: its id, its windows and tokens (packed shards:
    the window it starts in and its offset there). The columns are views of one int64 table
    mapped from ``records.npy``, the ids are read from ``record_ids.bin`` when asked for: opening
    a set of any size reads no row of either. Maps are reopened in each process (DataLoader
    workers), never pickled. Shards of format version 1 give the same table, built in memory
    from their manifest's list."""

    def __init__(self, columns: tuple[str, ...], count: int, table=None, ids=None, paths=None):
        self.columns, self.count = columns, count
        self._table, self._ids = table, ids  # arrays, or None until mapped from paths
        self._paths = paths  # (table, ids) files, or None when the arrays live in memory

    @classmethod
    def open(cls, data_dir: Path, records, count, packed: bool, verify: bool) -> "RecordTable":
        columns = PACKED_COLUMNS if packed else COLUMNS
        where = Path(data_dir) / MANIFEST
        try:
            entries = (records["table"], records["ids"])
            names = [Path(str(e["name"])).name for e in entries]
            shape, size, given = [int(x) for x in entries[0]["shape"]], int(entries[1]["bytes"]), records["columns"]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: records must give columns, table (name, shape, sha256) and ids "
                            f"(name, bytes, sha256)") from None
        if tuple(given) != columns or shape != [count, len(columns)]:
            raise DataError(f"{where}: records {given} of shape {shape}; a {'packed ' if packed else ''}"
                            f"shard set of {count} records has {list(columns)} of shape {[count, len(columns)]}")
        paths = tuple(Path(data_dir) / n for n in names)
        for entry, path in zip(entries, paths):
            if not path.is_file():
                raise DataError(f"{path}: listed in {MANIFEST} but missing")
            if verify and file_sha256(path) != entry.get("sha256"):
                raise DataError(f"{path}: sha256 checksum mismatch (file changed or corrupt)")
        table = cls(columns, count, paths=paths)
        mapped, ids = table._arrays()
        if mapped.dtype != np.int64 or list(mapped.shape) != shape or len(ids) != size:
            raise DataError(f"{paths[0]}: {mapped.dtype} {list(mapped.shape)} and {len(ids)} id bytes, manifest "
                            f"says int64 {shape} and {size} bytes")
        if count and int(mapped[-1, 0]) != size:
            raise DataError(f"{paths[0]}: the last id ends at byte {int(mapped[-1, 0])} of {size}")
        return table

    @classmethod
    def from_entries(cls, entries: list, packed: bool, where: Path) -> "RecordTable":
        """The table of a version 1 manifest's record list."""
        columns = PACKED_COLUMNS if packed else COLUMNS
        try:
            ids = [str(e["id"]) for e in entries]
            rows = [[int(e[c]) for c in columns[1:]] for e in entries]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: a record entry lacks or mistypes {exc}") from None
        encoded, lengths = _utf8(ids)
        table = np.empty((len(entries), len(columns)), dtype=np.int64)
        table[:, 0] = np.cumsum(lengths)
        table[:, 1:] = np.asarray(rows, dtype=np.int64).reshape(len(entries), len(columns) - 1)
        return cls(columns, len(entries), table, np.frombuffer(encoded, dtype=np.uint8))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._table is None:
            table, ids = self._paths
            try:
                self._table = np.load(table, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise DataError(f"{table}: not a readable .npy file ({exc})") from None
            self._ids = (np.memmap(ids, dtype=np.uint8, mode="r") if ids.stat().st_size
                         else np.empty(0, dtype=np.uint8))  # an empty file cannot be mapped
        return self._table, self._ids

    def __len__(self) -> int:
        return self.count

    def column(self, name: str) -> np.ndarray | None:
        """One int64 column (a view of the mapped table), None where these shards have none."""
        return self._arrays()[0][:, self.columns.index(name)] if name in self.columns else None

    @property
    def num_windows(self) -> np.ndarray:
        return self.column("num_windows")

    @property
    def num_tokens(self) -> np.ndarray:
        return self.column("num_tokens")

    def start_rows(self) -> np.ndarray:
        """The row each record starts in (packed: its "window"; else after the records before it)."""
        if "window" in self.columns:
            return np.asarray(self.column("window"))
        counts = np.asarray(self.num_windows)
        return np.cumsum(counts) - counts

    def offsets(self) -> np.ndarray:
        """Each record's first token's position in its start row (0 unless packed)."""
        offset = self.column("offset")
        return np.zeros(self.count, dtype=np.int64) if offset is None else np.asarray(offset)

    def id(self, i: int) -> str:
        return next(self.ids(i, i + 1))

    def ids(self, start: int = 0, stop: int | None = None, block: int = 1 << 16) -> Iterator[str]:
        """The ids of records start..stop-1, decoded a block at a time."""
        table, data = self._arrays()
        stop = self.count if stop is None else min(stop, self.count)
        for lo in range(start, stop, block):
            hi = min(stop, lo + block)
            ends = table[lo:hi, 0]
            first = int(table[lo - 1, 0]) if lo else 0
            raw = bytes(data[first:int(ends[-1])])
            bounds = (np.concatenate(([first], ends)) - first).tolist()
            text = raw.decode("ascii") if raw.isascii() else None
            source, decode = (text, str) if text is not None else (raw, lambda b: b.decode("utf-8", "surrogatepass"))
            yield from (decode(source[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))

    def entries(self) -> Iterator[dict]:
        """Each record as format version 1 listed it ({"id", "num_windows", "num_tokens"[, "window",
        "offset"]}): for tools and tests that read a few, not for a gene set's millions."""
        table = self._arrays()[0]
        for i, rid in enumerate(self.ids()):
            yield {"id": rid, **{c: int(table[i, k]) for k, c in enumerate(self.columns) if k}}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._paths is not None:  # maps do not pickle as maps; each process maps its own
            state["_table"] = state["_ids"] = None
        return state
