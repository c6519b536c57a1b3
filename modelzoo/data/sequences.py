"""Read genome records from FASTA or GenBank files, plain or gzipped, and validate them.

The format is sniffed from the content, not the file name: gzip by its magic bytes, then FASTA
if the first non-blank text starts with '>' and GenBank if it starts with 'LOCUS'. Anything wrong
with a file raises one-line ``DataError`` naming the file and the record.
"""

from __future__ import annotations

import gzip
import io
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from Bio import SeqIO
from Bio.Seq import UndefinedSequenceError

try:  # ISA-L's inflate is 2-3x zlib's, and inflating is much of preparing a gzipped genome set
    from isal import isal_zlib as _inflate
except ImportError:  # a platform without isal wheels: the standard library does the same, slower
    _inflate = zlib

from modelzoo.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_SNIFF_BYTES = 4096
_FASTA_BLOCK = 1 << 26  # bytes of decompressed FASTA read at a time (whole records are cut from it)
_WHITESPACE = b" \t\n\r\v\f"


@dataclass(frozen=True)
class Record:
    id: str
    seq: str | bytes  # bytes only from read_records(..., raw=True)


@dataclass(frozen=True)
class RecordBatch:
    """Consecutive records as parallel lists; each seq is bytes that may hold line breaks."""
    ids: list[str]
    seqs: list[bytes]


def _open_binary(path: Path) -> io.BufferedIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == _GZIP_MAGIC else open(path, "rb")


def _open_text(path: Path) -> io.TextIOBase:
    # latin-1 never fails to decode, so odd bytes become odd letters ([UNK] codons) instead of
    # a UnicodeDecodeError; newline=None turns Windows CRLF into '\n'.
    return io.TextIOWrapper(_open_binary(path), encoding="latin-1", newline=None)


def _sniff_format(path: Path, head: str) -> str:
    if "\x00" in head:
        raise DataError(f"{path}: binary file, not FASTA or GenBank")
    text = head.lstrip()
    if not text:
        raise DataError(f"{path}: empty file, no records")
    if text.startswith(">"):
        return "fasta"
    if text.startswith("LOCUS"):
        return "genbank"
    if text.startswith("<"):
        raise DataError(f"{path}: looks like HTML/XML (a download error page?), not FASTA or GenBank")
    first_line = text.splitlines()[0][:40]
    raise DataError(f"{path}: not FASTA ('>') or GenBank ('LOCUS'); first line is {first_line!r}")


def _cds_id(record, feature) -> str:
    q = feature.qualifiers
    parts = [record.id]
    name = (q.get("locus_tag") or q.get("gene") or [None])[0]
    if name:
        parts.append(name)
    if q.get("protein_id"):
        parts.append(q["protein_id"][0])
    if len(parts) == 1:  # no qualifiers at all: the location is the only name left
        parts.append(f"{feature.type}_{int(feature.location.start) + 1}-{int(feature.location.end)}")
    return "|".join(parts)


def _genbank_records(path: Path, handle, features: str | None) -> Iterator[Record]:
    for number, rec in enumerate(SeqIO.parse(handle, "genbank"), start=1):
        where = f"{path}: record #{number} ({rec.id!r})"
        if not rec.id:
            raise DataError(f"{path}: record #{number} has an empty id")
        if features is None:
            try:
                seq = str(rec.seq)
            except UndefinedSequenceError:  # e.g. a CONTIG record: reported as empty downstream
                seq = ""
            yield Record(rec.id, seq)
            continue
        for feature in rec.features:
            if feature.type == features:
                try:
                    seq = str(feature.extract(rec.seq))
                except UndefinedSequenceError:
                    raise DataError(f"{where} has no sequence to extract {features} from") from None
                yield Record(_cds_id(rec, feature), seq)


def _decompressed_chunks(path: Path, block: int | None = None) -> Iterator[bytes]:
    """The file's bytes, gunzipped when it is gzip (every member of a multi-member file), in
    chunks of at most ``block`` (default _FASTA_BLOCK). The inflater checks each member's CRC and
    length itself; calling it directly on large reads saves GzipFile's small-buffer copies (a
    third of the time here)."""
    block = block or _FASTA_BLOCK
    with open(path, "rb") as fh:
        if fh.read(2) != _GZIP_MAGIC:
            fh.seek(0)
            yield from iter(lambda: fh.read(block), b"")
            return
        fh.seek(0)
        member = _inflate.decompressobj(16 + zlib.MAX_WBITS)
        pending = fh.read(block)
        while pending:
            out = member.decompress(pending, block)
            if out:
                yield out
            pending = member.unconsumed_tail
            if member.eof:
                pending = (member.unused_data + pending).lstrip(b"\x00")  # gzip allows zero padding
                if not pending:
                    pending = fh.read(block).lstrip(b"\x00")
                member = _inflate.decompressobj(16 + zlib.MAX_WBITS) if pending else None
            elif not pending:
                pending = fh.read(block)
        if member is not None and not member.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")


def _fasta_blocks(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, int]]:
    """Decompressed FASTA text in large blocks: (data, end) where data[:end] holds whole records,
    the first starting at data[0] with its '>'. Line endings become '\n' as in Python's universal
    newlines; a CR LF pair cut by a read boundary is held back for the next read. Slicing is
    avoided where possible: copies of whole genomes are most of the cost here. One chunk is read
    ahead, so a file of one chunk is one block."""
    chunks = iter(chunks)
    carry, started = b"", False
    block = next(chunks, b"")
    while True:
        following = next(chunks, b"") if block else b""
        data, held = carry + block, b""
        if following and data.endswith(b"\r"):
            data, held = data[:-1], b"\r"
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not started:
            data = data.lstrip()
            if not data.startswith(b">"):
                raise ValueError("text before the first '>' record header")
            started = True
        if not following:
            yield data, len(data)  # the last record (possibly with an empty sequence)
            return
        cut = data.rfind(b"\n>")
        block = following
        if cut < 0:
            carry = data + held
            continue
        yield data, cut + 1
        carry = data[cut + 1:] + held


def _fasta_batches(path: Path, chunks: Iterator[bytes]) -> Iterator[RecordBatch]:
    """FASTA records as Biopython's parser reads them (id = first word of the header line,
    sequence = the following lines), a decompressed block's worth at a time."""
    number = 0
    for data, end in _fasta_blocks(chunks):
        batch = parse_fasta_block(data, end)
        if "" in batch.ids:
            raise DataError(f"{path}: record #{number + batch.ids.index('') + 1} has an empty id")
        number += len(batch.ids)
        yield batch


def parse_fasta_block(data: bytes, end: int) -> RecordBatch:
    """The records of ``data[:end]`` (whole FASTA records, the first starting at data[0] with its
    '>'), cut with bytes operations instead of a Python loop over lines: about 10x faster on
    genomes. A header with no id gives the id "" (the caller reports it with the record's number)."""
    ids, seqs = [], []
    start = 0
    while start < end:
        header_end = data.find(b"\n", start, end)
        if header_end < 0:
            header_end = end
        # the next record starts at a '>' opening a line; '>' is rare, so find it directly
        # (searching b"\n>" would stop at every line break)
        next_start = data.find(b">", header_end, end)
        while next_start > 0 and data[next_start - 1] != 10:  # 10 = '\n'
            next_start = data.find(b">", next_start + 1, end)
        if next_start < 0:
            next_start = end
        words = data[start + 1:header_end].decode("latin-1").split(None, 1)
        ids.append(words[0] if words else "")
        seqs.append(data[header_end + 1:next_start])
        start = next_start
    return RecordBatch(ids, seqs)


@dataclass(frozen=True)
class FastaBlock:
    """Decompressed FASTA text whose ``data[:end]`` holds whole records (``parse_fasta_block``):
    what ``read_record_chunks`` hands out, so the parsing can happen in another process."""
    data: bytes
    end: int


def _genbank_batches(path: Path, features: str | None, block: int | None = None) -> Iterator[RecordBatch]:
    block = block or _FASTA_BLOCK
    with _open_text(path) as handle:
        batch = RecordBatch([], [])
        size = 0
        for rec in _genbank_records(path, handle, features):
            batch.ids.append(rec.id)
            batch.seqs.append(rec.seq.encode("latin-1", errors="replace"))
            size += len(rec.seq)
            if size >= block:
                yield batch
                batch, size = RecordBatch([], []), 0
        if batch.ids:
            yield batch


def read_record_batches(path, features: str | None = None, allow_empty: bool = False,
                        rename_duplicates: bool = False) -> Iterator[RecordBatch]:
    """The records of a FASTA/GenBank file, plain or gzipped, as ``RecordBatch``es of consecutive
    records (up to ~64 MB of sequence each): the fast path for tokenising whole files, with no
    Python object per record. Arguments and checks as ``read_records``."""
    path = Path(path)
    fmt = _file_format(path, features)
    return _checked_batches(path, fmt, features, allow_empty, rename_duplicates)


def read_record_chunks(path, features: str | None = None,
                       block_bytes: int | None = None) -> Iterator[FastaBlock | RecordBatch]:
    """The records of a file in large chunks, none checked: a FASTA file as ``FastaBlock``s of
    about ``block_bytes`` decompressed bytes (parse each with ``parse_fasta_block``; the expensive
    part, so it can run in worker processes), a GenBank file as ``RecordBatch``es (parsed here,
    by Biopython). Empty records are included; repeated ids are left to the caller."""
    path = Path(path)
    fmt = _file_format(path, features)
    return _chunks(path, fmt, features, block_bytes or _FASTA_BLOCK)


def _chunks(path: Path, fmt: str, features, block_bytes: int) -> Iterator[FastaBlock | RecordBatch]:
    with _guard(path, fmt):
        if fmt == "genbank":
            yield from _genbank_batches(path, features, block_bytes)
            return
        for data, end in _fasta_blocks(_decompressed_chunks(path, block_bytes)):
            yield FastaBlock(data, end)


def _file_format(path: Path, features: str | None) -> str:
    """'fasta' or 'genbank', sniffed from the content; a one-line DataError for anything else."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    with _guard(path, "?"), _open_text(path) as handle:
        fmt = _sniff_format(path, handle.read(_SNIFF_BYTES))
    if features is not None and fmt != "genbank":
        raise DataError(f"{path}: features={features!r} needs a GenBank file, this is FASTA")
    return fmt


def read_records(path, features: str | None = None, allow_empty: bool = False,
                 rename_duplicates: bool = False, raw: bool = False) -> Iterator[Record]:
    """Yield ``Record``s from a FASTA/GenBank file, plain or gzipped.

    The file is opened and its format checked right away (so a bad path fails at the call);
    records are then parsed lazily as the iterator is consumed.

    features: a GenBank feature type (e.g. "CDS") to yield each such feature's spliced sequence
        (``feature.extract`` handles joins) instead of whole records; ids become
        "record|locus_tag-or-gene|protein_id".
    allow_empty: yield records with no sequence instead of raising (the prepare CLI counts them).
    rename_duplicates: a repeated id gets a suffix "#2", "#3"... instead of raising (real files
        have them, e.g. NCBI CDS FASTA lists alternative start sites under one locus tag).
    raw: ``Record.seq`` is bytes that may still hold whitespace (line breaks).
    """
    return _records_of(read_record_batches(path, features, allow_empty, rename_duplicates), raw)


def _records_of(batches: Iterator[RecordBatch], raw: bool) -> Iterator[Record]:
    for batch in batches:
        for rec_id, seq in zip(batch.ids, batch.seqs):
            yield Record(rec_id, seq if raw else seq.translate(None, _WHITESPACE).decode("latin-1"))


def _checked_batches(path: Path, fmt: str, features, allow_empty: bool,
                     rename_duplicates: bool) -> Iterator[RecordBatch]:
    seen: dict[str, int] = {}  # id -> how many records have had it
    with _guard(path, fmt):
        batches = _fasta_batches(path, _decompressed_chunks(path)) if fmt == "fasta" else \
            _genbank_batches(path, features)
        for batch in batches:
            fresh = dict.fromkeys(batch.ids, 1)
            if len(fresh) == len(batch.ids) and seen.keys().isdisjoint(fresh):
                seen.update(fresh)  # the usual case: no repeated id, no per-record work
            else:
                batch = RecordBatch(_renamed(path, batch.ids, seen, rename_duplicates), batch.seqs)
            if not allow_empty:
                for rec_id, seq in zip(batch.ids, batch.seqs):
                    if not seq or seq.isspace():  # isspace: no copy of a genome
                        raise DataError(f"{path}: record {rec_id!r} has no sequence")
            yield batch


def _renamed(path: Path, ids: list[str], seen: dict[str, int], rename: bool) -> list[str]:
    """ids with the second, third... use of an id suffixed "#2", "#3"..., or a DataError."""
    out = []
    for rec_id in ids:
        seen[rec_id] = seen.get(rec_id, 0) + 1
        if seen[rec_id] > 1:
            if not rename:
                raise DataError(f"{path}: duplicate record id {rec_id!r} "
                                f"(rename_duplicates / --rename_duplicate_ids adds #2, #3...)")
            rec_id = f"{rec_id}#{seen[rec_id]}"
        out.append(rec_id)
    return out


@contextmanager
def _guard(path: Path, fmt: str):
    """Turn decompression and Biopython parse errors into a one-line DataError."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error, _inflate.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip ({exc})") from None
    except OSError as exc:  # permission denied, an I/O error...
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # Biopython reports malformed records as ValueError
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path}: cannot parse as {fmt}: {msg}") from None
