"""The reading half of prepare_genomes: input files -> tokenised, filtered chunks of records, in
input order, on as many processes as asked for, in memory that does not grow with the input.

The main process reads each file in chunks (``read_record_chunks``: it decompresses and cuts FASTA
text into blocks of whole records; GenBank is parsed there, by Biopython); ``tokenise`` turns a
chunk into a ``Chunk`` (parse, tokenise, filter), in worker processes when there are several
chunks and workers. Chunks come back in input order (``ordered_map``), at most two per worker in
flight, so what a chunk holds is all that is held, and the output cannot depend on the number of
workers. ``SeenIds`` finds repeated record ids in 8 bytes an id.
"""

from __future__ import annotations

import itertools
import multiprocessing
import sys
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from modelzoo.data.sequences import FastaBlock, RecordBatch, parse_fasta_block, read_record_chunks
from modelzoo.data.tokenizer import CodonTokenizer

CHUNK_BYTES = 1 << 24  # decompressed FASTA per chunk: a worker's unit of work
_TOKENIZER: CodonTokenizer | None = None  # one per process, made on first use (inherited on fork)


def tokenizer() -> CodonTokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = CodonTokenizer()
    return _TOKENIZER


@dataclass(frozen=True)
class Limits:
    """Which records preparation keeps (prepare_genomes' --min_codons and --max_n_fraction)."""
    min_codons: int
    max_n_fraction: float

    def reasons(self, counts: np.ndarray, unknown: np.ndarray) -> dict[str, np.ndarray]:
        """Why each record is skipped: reason -> mask (a record is counted under its first reason)."""
        return {
            "empty (no whole codon)": counts == 0,
            f"too short (< {self.min_codons} codons)": (counts > 0) & (counts < self.min_codons),
            f"too many [UNK] codons (> {self.max_n_fraction:g})":
                (counts >= self.min_codons) & (unknown / np.maximum(counts, 1) > self.max_n_fraction),
        }


@dataclass
class Chunk:
    """Consecutive records of one input file, tokenised and filtered."""
    file: int  # index of the input file
    ids: list[str]  # every record read, kept or not, in input order ("" for a header without id)
    hashes: np.ndarray  # uint64 hash of each id (``id_hashes``)
    kept: np.ndarray  # indices into ids of the records kept
    lengths: np.ndarray  # int64 codons of each kept record
    codons: np.ndarray  # uint8 codon ids of the kept records, back to back
    skipped: dict[str, int]  # reason -> records


def chunks_of(inputs: list[str], features: str | None) -> Iterator[tuple[int, FastaBlock | RecordBatch]]:
    """(input index, chunk) of every input in order (``read_record_chunks``)."""
    for index, path in enumerate(inputs):
        for item in read_record_chunks(path, features=features, block_bytes=CHUNK_BYTES):
            yield index, item


def tokenise(task: tuple[int, FastaBlock | RecordBatch, Limits]) -> Chunk:
    """A chunk's records parsed, tokenised and filtered, in vectorised passes (per-record Python
    work would cost more than the tokenising itself on sets of many short genes)."""
    file, item, limits = task
    batch = parse_fasta_block(item.data, item.end) if isinstance(item, FastaBlock) else item
    tok = tokenizer()
    ids, starts, counts = tok.encode_flat(batch.seqs)
    unknown = unk_counts(ids, starts, counts, tok.unk_id)
    rejected = np.zeros(len(counts), dtype=bool)
    skipped = {}
    for reason, mask in limits.reasons(counts, unknown).items():
        if mask.any():
            skipped[reason] = int(mask.sum())
            rejected |= mask
    kept = np.flatnonzero(~rejected)
    lengths, firsts = counts[kept], starts[kept]
    if len(kept) and np.array_equal(firsts[1:], (firsts + lengths)[:-1]):  # usual: nothing between them
        codons = ids[firsts[0]:firsts[-1] + lengths[-1]]
    else:
        codons = np.concatenate([ids[a:a + n] for a, n in zip(firsts.tolist(), lengths.tolist())] or
                                [np.empty(0, np.uint8)])
    return Chunk(file, batch.ids, id_hashes(batch.ids), kept, lengths, codons, skipped)


def unk_counts(ids: np.ndarray, starts: np.ndarray, counts: np.ndarray, unk_id: int) -> np.ndarray:
    """[UNK] codons of each sequence ``ids[starts[i]:starts[i] + counts[i]]``: [UNK]s are rare,
    so find where they are and count them per sequence (a running sum over every codon costs 10x
    more). An [UNK] between sequences (a completed partial codon) counts for none."""
    where = np.flatnonzero(ids == unk_id)
    owner = np.searchsorted(starts, where, side="right") - 1
    inside = where < (starts + counts)[owner]
    return np.bincount(owner[inside], minlength=len(counts))


def ordered_map(fn: Callable, tasks: Iterable, workers: int) -> Iterator:
    """``map(fn, tasks)``, on ``workers`` processes when there are two tasks or more: results in
    task order, at most 2 x workers tasks in flight (the reader never runs ahead of the writer by
    more). Close the iterator (``contextlib.closing``) to stop the workers early."""
    tasks = iter(tasks)
    head = list(itertools.islice(tasks, 2))
    if workers <= 1 or len(head) < 2:
        yield from map(fn, itertools.chain(head, tasks))
        return
    with _context().Pool(workers) as pool:
        pending: deque = deque()
        for task in itertools.chain(head, tasks):
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _context():
    """fork where it is safe (no torch threads in this process: the CLI) as it costs nothing,
    else forkserver (e.g. preparing on first use inside a training run)."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and "torch" not in sys.modules:
        tokenizer()  # made once here, inherited by every worker
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


# ---------------------------------------------------------------- repeated record ids

_BASE = np.uint64(0x100000001B3)  # the 64-bit FNV prime, as the base of a polynomial hash
_POWERS = np.ones(1, dtype=np.uint64)


def id_hashes(ids: list[str]) -> np.ndarray:
    """A 64-bit hash of each id (a polynomial over its bytes, modulo 2^64), vectorised: the same
    for the same id in any process, run or batch. Distinct ids share a hash with probability
    about 2^-64 a pair (ids built to collide aside: this is no cryptographic hash)."""
    global _POWERS
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    text = "\n".join(ids) + "\n"  # each id and one separator (no id is then empty)
    try:
        flat = text.encode("latin-1")  # ids read from files are latin-1: one byte a character
    except UnicodeEncodeError:
        encoded = [f"{i}\n".encode("utf-8", "surrogatepass") for i in ids]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(ids))
        flat = b"".join(encoded)
    if not ids:
        return np.empty(0, dtype=np.uint64)
    longest = int(lengths.max())
    if len(_POWERS) < longest:
        powers = np.ones(longest, dtype=np.uint64)
        powers[1:] = np.cumprod(np.full(longest - 1, _BASE, dtype=np.uint64))  # wraps mod 2^64
        _POWERS = powers
    ends = np.cumsum(lengths)
    power = np.repeat(ends, lengths) - 1 - np.arange(len(flat))  # distance to the id's end
    terms = np.frombuffer(flat, dtype=np.uint8).astype(np.uint64) * _POWERS[power]
    return np.add.reduceat(terms, ends - lengths)


class SeenIds:
    """The ids seen so far, as 64-bit hashes (``id_hashes``) with the input each came from: 10
    bytes an id (about 1 GB at GenSLM's 110 million genes) instead of a set of strings (about 100),
    in sorted runs merged as they grow (binary search per batch, each id merged O(log n) times).
    Two distinct ids sharing a hash would be reported as a repeat: odds about n^2 / 2^65, 3e-4
    at 110 million ids."""

    def __init__(self, num_files: int):
        self._file_dtype = np.uint16 if num_files < (1 << 16) else np.uint32
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, input of each)
        self._times: dict[int, int] = {}  # hash -> times seen, of repeated ids only

    def __len__(self) -> int:
        return sum(len(h) for h, _ in self._runs)

    def add(self, hashes: np.ndarray, file: int) -> list[tuple[int, int, int]]:
        """Note ``hashes`` (of ids in input ``file``, in order); return (position, input the id
        was first seen in, how many times it has now been seen) of each repeat, in order."""
        unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        earlier = np.full(len(unique), -1, dtype=np.int64)
        for run, files in self._runs:
            at = np.minimum(np.searchsorted(run, unique), len(run) - 1)
            hit = run[at] == unique
            earlier[hit] = files[at[hit]]
        repeats = np.flatnonzero((first[inverse] != np.arange(len(hashes))) | (earlier[inverse] >= 0))
        fresh = earlier < 0
        if fresh.any():
            self._runs.append((unique[fresh], np.full(int(fresh.sum()), file, dtype=self._file_dtype)))
            while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
                (h1, f1), (h2, f2) = self._runs.pop(), self._runs.pop()
                h, f = np.concatenate([h2, h1]), np.concatenate([f2, f1])
                order = np.argsort(h, kind="stable")  # two sorted runs: a merge
                self._runs.append((h[order], f[order]))
        out = []
        for pos in repeats.tolist():  # rare: a Python loop is fine
            key = int(hashes[pos])
            self._times[key] = self._times.get(key, 1) + 1
            was = int(earlier[inverse[pos]])
            out.append((pos, file if was < 0 else was, self._times[key]))
        return out
