"""Token shards: memory-mappable ``.npy`` windows plus a ``manifest.json``.

A shard directory holds ``tokens_00000.npy``, ``tokens_00001.npy``, ... each a uint8 array of shape
(n_windows, max_seq_length), right-padded with [PAD], and a manifest::

    {"format": "codon-token-shards", "format_version": 1, "dtype": "uint8",
     "max_seq_length": L, "num_windows": N, "num_tokens": T (non-pad), "pad_id": 3,
     "tokenizer": {"file": "codon_wordlevel_69vocab.json", "sha256": ..., "vocab_size": 69},
     "records": [{"id": ..., "num_windows": k, "num_tokens": t}, ...]   (in shard order),
     "files": [{"name": "tokens_00000.npy", "shape": [n, L], "sha256": ...}, ...],
     "created_by": {"command": ..., "options": {...}}}

Nothing in it depends on time or absolute paths, so the same inputs give byte-identical shards.

Packed shards (``prepare_genomes --pack_sequences``) say ``"packed": true`` after "pad_id". Their
windows hold whole records back to back, each followed by one [SEP] (``CodonTokenizer.sep_id``),
then [PAD] to the end; a record too long for one window (num_tokens + 1 > max_seq_length) has
windows of its own, cut as in unpacked shards, with no [SEP]. Each record entry adds "window" (the
row it starts in) and "offset" (its first token's position there): its num_tokens codons are
``row[offset:offset + num_tokens]`` of that row (the long ones: offset 0, then the next rows).
num_windows is 1 for a record that shares a window; num_tokens counts codons, not the [SEP], so
the manifest's num_tokens (every non-[PAD] position) is the records' sum plus one per [SEP].
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np

from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import DataError
from modelzoo.files import OutputDir

FORMAT = "codon-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RECORDS_PART = ".records.part"  # a ShardWriter's record entries until close() puts them in the manifest


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
    open ``tokens_*.npy`` file (hashed as they are written), and the manifest's record entries
    into a side file that ``close()`` copies into the manifest.

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
        self._records_path = self._tmp / RECORDS_PART
        self._records_file = open(self._records_path, "w", encoding="ascii")
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
        """Manifest entries of records whose rows are (or will be) added with ``add_rows``; a packed
        writer's also give the window each record starts in and its token offset there."""
        if (window is None) == self.packed or (offset is None) == self.packed:
            raise ValueError("window and offset are given for the records of packed windows, and only then")
        columns = [np.asarray(c, dtype=np.int64).tolist()
                   for c in ((num_windows, num_tokens, window, offset) if self.packed else (num_windows, num_tokens))]
        template = _PACKED_RECORD if self.packed else _RECORD
        text = ",\n  ".join(map(template.__mod__, zip(map(_json_string, record_ids), *columns)))
        if text:
            self._records_file.write(",\n  " + text if self.num_records else text)
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
                self._file = _NpyStream(self._tmp / name, self.windows_per_file, self.max_seq_length)
            room = self.windows_per_file - self._file.rows
            self._file.write(windows[:room])
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
        """Write the last file and the manifest, then move the directory into place (``manifest``
        reads it back, if wanted: a large set's takes longer to parse than to write)."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        if self._file is not None:
            self._files.append(self._file.finish())
            self._file = None
        self._records_file.close()
        head = {
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
        }
        tail = {"files": self._files, "created_by": self.created_by}
        with open(self._tmp / MANIFEST, "w", encoding="ascii") as out:
            out.write("{\n" + "".join(f"{line},\n" for line in map(_manifest_line, head.items())))
            if self.num_records:
                out.write(' "records": [\n  ')
                with open(self._records_path, encoding="ascii") as records:
                    shutil.copyfileobj(records, out, 1 << 20)
                out.write("\n ],\n")
            else:
                out.write(' "records": [],\n')
            out.write(",\n".join(map(_manifest_line, tail.items())) + "\n}\n")
        self._records_path.unlink()
        self._target.publish()
        self._closed = True

    def abort(self) -> None:
        if not self._closed:
            self._records_file.close()
            if self._file is not None:
                self._file.fh.close()
            self._target.discard()
            self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _NpyStream:
    """A ``.npy`` file of uint8 rows written as they come, hashed on the way: byte for byte what
    ``np.save`` writes. The header promises ``rows`` rows; a file that ends with fewer gets its
    header rewritten (and is hashed again by reading it back: only a split's last file)."""

    def __init__(self, path: Path, rows: int, length: int):
        self.path, self.planned, self.length, self.rows = path, rows, length, 0
        self.fh = open(path, "wb")
        self.digest = hashlib.sha256()
        self.header = _npy_header((rows, length))
        self._write(self.header)

    def _write(self, data) -> None:
        self.digest.update(data)
        self.fh.write(data)

    def write(self, rows: np.ndarray) -> None:
        self._write(np.ascontiguousarray(rows))
        self.rows += len(rows)

    def finish(self) -> dict:
        if self.rows == self.planned:
            self.fh.close()
            sha = self.digest.hexdigest()
        else:
            header = _npy_header((self.rows, self.length))
            if len(header) == len(self.header):
                self.fh.seek(0)
                self.fh.write(header)
                self.fh.close()
            else:  # never with numpy's 64-byte header alignment, but do not depend on it
                self.fh.close()
                body = self.path.read_bytes()[len(self.header):]
                self.path.write_bytes(header + body)
            sha = file_sha256(self.path)
        return {"name": self.path.name, "shape": [self.rows, self.length], "sha256": sha}


def _npy_header(shape: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _manifest_line(item) -> str:
    """One top-level manifest key: lists one entry a line (readable, diffable, not 5 lines an entry)."""
    key, value = item
    if isinstance(value, list) and value:
        return f" {json.dumps(key)}: [\n  " + ",\n  ".join(map(json.dumps, value)) + "\n ]"
    return f" {json.dumps(key)}: {json.dumps(value)}"


# A manifest record, as json.dumps writes it, several times faster: a gene set has millions.
_RECORD = '{"id": %s, "num_windows": %d, "num_tokens": %d}'
_PACKED_RECORD = '{"id": %s, "num_windows": %d, "num_tokens": %d, "window": %d, "offset": %d}'
_json_string = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str (ensure_ascii)


def shard_files(directory: Path, command: str | None = None) -> set[str] | None:
    """The files a ShardWriter wrote into ``directory`` (its manifest lists them), or None when
    it is not a shard directory (of ``command``'s making, when given)."""
    try:
        m = json.loads((Path(directory) / MANIFEST).read_text())
        if m["format"] != FORMAT or (command is not None and m["created_by"]["command"] != command):
            return None
        return {MANIFEST} | {str(f["name"]) for f in m["files"]}
    except (OSError, ValueError, KeyError, TypeError):
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
        if m["format"] != FORMAT or m["format_version"] != FORMAT_VERSION:
            raise DataError(f"{path}: format {m['format']!r} v{m['format_version']}, "
                            f"this code reads {FORMAT!r} v{FORMAT_VERSION}")
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
        return [r["id"] for r in self.manifest["records"]]

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
