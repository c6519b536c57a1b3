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
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import DataError
from modelzoo.files import OutputDir

FORMAT = "codon-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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
    """

    def __init__(self, out_dir, max_seq_length: int, tokenizer: CodonTokenizer,
                 windows_per_file: int = 1 << 16, command: str | None = None,
                 options: dict | None = None, overwrite: bool = False):
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
        # Built beside the target, published in one rename; overwrite replaces only a shard directory.
        self._target = OutputDir(self.out_dir, "ShardWriter", overwrite, flag="shard directory",
                                 recognise=shard_files, marker=False)
        self._tmp = self._target.path
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._files: list[dict] = []
        self._records: list[dict] = []
        self._num_tokens = 0
        self._closed = False
        self.manifest: dict | None = None  # set by close()

    def add(self, record_id: str, windows: np.ndarray) -> None:
        """Append one record's windows: uint8 array (k, max_seq_length), already [PAD]-padded."""
        windows = np.asarray(windows)
        self.add_many([record_id], [len(windows)] if windows.ndim else [0], windows)

    def add_many(self, record_ids: list[str], windows_per_record, windows: np.ndarray) -> None:
        """Append several records at once: ``windows`` holds their rows back to back, the first
        ``windows_per_record[0]`` rows being the first record's, and so on. One call per batch of
        records keeps per-record Python work out of preparing sets of many short genes."""
        windows = np.asarray(windows)
        counts = np.asarray(windows_per_record, dtype=np.int64)
        name = record_ids[0] if len(record_ids) == 1 else f"{len(record_ids)} records"
        if windows.ndim != 2 or windows.shape[1] != self.max_seq_length or windows.dtype != np.uint8:
            raise ValueError(f"record {name!r}: windows must be uint8 (k, {self.max_seq_length}), "
                             f"got {windows.dtype} {windows.shape}")
        if len(counts) != len(record_ids) or counts.sum() != len(windows) or (counts < 0).any():
            raise ValueError(f"{name}: windows_per_record {counts.tolist()[:5]}… does not cut "
                             f"{len(windows)} rows into {len(record_ids)} records")
        row_tokens = np.count_nonzero(windows != self.tokenizer.pad_id, axis=1)
        starts = np.concatenate(([0], np.cumsum(counts)))[:-1]
        # reduceat over an empty run (a record with no window) gives the next row: masked to 0
        tokens = np.add.reduceat(np.append(row_tokens, 0), starts) * (counts > 0)
        self._records.extend({"id": rid, "num_windows": int(k), "num_tokens": int(t)}
                             for rid, k, t in zip(record_ids, counts.tolist(), tokens.tolist()))
        self._num_tokens += int(tokens.sum())
        self._pending.append(windows)
        self._pending_rows += len(windows)
        while self._pending_rows >= self.windows_per_file:
            self._flush(self.windows_per_file)

    def _flush(self, rows: int) -> None:
        block = np.concatenate(self._pending) if self._pending else np.empty((0, self.max_seq_length), np.uint8)
        out, rest = block[:rows], block[rows:]
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
        name = f"tokens_{len(self._files):05d}.npy"
        np.save(self._tmp / name, np.ascontiguousarray(out), allow_pickle=False)
        self._files.append({"name": name, "shape": list(out.shape),
                            "sha256": file_sha256(self._tmp / name)})

    def close(self) -> dict:
        """Write the last file and the manifest, then move the directory into place."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        if self._pending_rows:
            self._flush(self._pending_rows)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": "uint8",
            "max_seq_length": self.max_seq_length,
            "num_windows": sum(f["shape"][0] for f in self._files),
            "num_tokens": self._num_tokens,
            "pad_id": self.tokenizer.pad_id,
            "tokenizer": {"file": self.tokenizer.json_path.name, "sha256": self.tokenizer.sha256,
                          "vocab_size": self.tokenizer.vocab_size},
            "records": self._records,
            "files": self._files,
            "created_by": self.created_by,
        }
        (self._tmp / MANIFEST).write_text(_dumps(manifest))
        self._target.publish()
        self._closed = True
        self.manifest = manifest
        return manifest

    def abort(self) -> None:
        if not self._closed:
            self._target.discard()
            self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _dumps(manifest: dict) -> str:
    """JSON with one line per record/file entry: readable, diffable, and not 5 lines a record."""
    lines = []
    for key, value in manifest.items():
        if key == "records" and value:
            entries = map(_record_json, value)
        elif isinstance(value, list) and value:
            entries = map(json.dumps, value)
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
            continue
        lines.append(f" {json.dumps(key)}: [\n  " + ",\n  ".join(entries) + "\n ]")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _record_json(record: dict) -> str:
    """json.dumps(record) for a manifest record, several times faster: a gene set has thousands."""
    return (f'{{"id": {_json_string(record["id"])}, "num_windows": {record["num_windows"]:d}, '
            f'"num_tokens": {record["num_tokens"]:d}}}')


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
