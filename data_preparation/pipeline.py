"""The reading half of prepare_genomes: input files -> tokenised, filtered chunks of records, in
input order, on as many processes as asked for, in memory that does not grow with the input.

The main process reads each file in chunks (``read_record_chunks``: it decompresses and cuts FASTA
text into blocks of whole records; GenBank is parsed there, by Biopython); ``tokenise`` turns a
chunk into a ``Chunk`` (parse, tokenise, filter), in worker processes when there are several
chunks and workers. Chunks come back in input order (``tokenise_all``), at most two per worker in
flight, so what a chunk holds is all that is held, and the output cannot depend on the number of
workers. ``SeenIds`` finds repeated record ids in 8 bytes an id.
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
import queue
import sys
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from modelzoo.data.sequences import FastaBlock, RecordBatch, parse_fasta_block, read_record_chunks
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import UserError

CHUNK_BYTES = 1 << 24  # decompressed FASTA per chunk: a worker's unit of work
_TOKENIZER: CodonTokenizer | None = None  # one per process, made on first use (inherited on fork)


def tokenizer() -> CodonTokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = CodonTokenizer()
    return _TOKENIZER


@dataclass(frozen=True)
class Limits:
    """How preparation reads records and which it keeps (prepare_genomes' --min_codons,
    --max_n_fraction and --reading_frame)."""
    min_codons: int
    max_n_fraction: float
    reading_frame: str = "as_read"

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
    codons: np.ndarray  # uint8 codon ids of the kept records, back to back (their number in transit)
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
    slot = item if isinstance(item, InSlot) else None
    if slot is not None:  # in a worker: the block is in shared memory
        item = FastaBlock(_SLOTS.maps[slot.slot][:slot.length], slot.end)
    batch = parse_fasta_block(item.data, item.end) if isinstance(item, FastaBlock) else item
    tok = tokenizer()
    ids, starts, counts = tok.encode_flat(batch.seqs, limits.reading_frame)
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
    if slot is not None:  # the codons go back the same way (fewer bytes than the block)
        _SLOTS.maps[slot.slot][:len(codons)] = np.ascontiguousarray(codons).data
        codons = len(codons)
    return Chunk(file, batch.ids, id_hashes(batch.ids), kept, lengths, codons, skipped)


def unk_counts(ids: np.ndarray, starts: np.ndarray, counts: np.ndarray, unk_id: int) -> np.ndarray:
    """[UNK] codons of each sequence ``ids[starts[i]:starts[i] + counts[i]]``: [UNK]s are rare,
    so find where they are and count them per sequence (a running sum over every codon costs 10x
    more). An [UNK] between sequences (a completed partial codon) counts for none."""
    where = np.flatnonzero(ids == unk_id)
    owner = np.searchsorted(starts, where, side="right") - 1
    inside = where < (starts + counts)[owner]
    return np.bincount(owner[inside], minlength=len(counts))


def tokenise_all(tasks: Iterable, workers: int) -> Iterator[Chunk]:
    """``map(tokenise, tasks)``, on ``workers`` processes when there are two tasks or more: chunks
    in task order, at most 2 x workers tasks in flight (the reader never runs ahead of the writer
    by more). Close the iterator (``contextlib.closing``) to stop the workers early.

    With fork, FASTA blocks go to the workers, and codons come back, through anonymous shared
    memory made before the fork (``SharedSlots``): a pipe would copy each block four times on the
    way, a quarter of the tokenising's own cost."""
    tasks = iter(tasks)
    head = list(itertools.islice(tasks, 2))
    if workers <= 1 or len(head) < 2:
        yield from map(tokenise, itertools.chain(head, tasks))
        return
    global _SLOTS
    context = _context()
    slots = SharedSlots(2 * workers, 2 * CHUNK_BYTES) if context.get_start_method() == "fork" else None
    _SLOTS = slots  # inherited by the workers the pool forks now
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        pending: deque = deque()
        for task in itertools.chain(head, tasks):
            slot, task = slots.put(task) if slots else (None, task)
            pending.append((slot, pool.submit(tokenise, task)))
            if len(pending) >= 2 * workers:
                yield _received(slots, *pending.popleft())
        while pending:
            yield _received(slots, *pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _SLOTS = None
        if slots:
            slots.close()


def _received(slots: SharedSlots | None, slot: int | None, future) -> Chunk:
    try:
        chunk = future.result()
    except BrokenProcessPool:
        raise UserError("a prepare_genomes worker process died (killed, or out of memory? fewer "
                        "--num_workers need less)") from None
    if slot is not None:
        chunk.codons = slots.take(slot, chunk.codons)
    return chunk


@dataclass(frozen=True)
class InSlot:
    """A FastaBlock whose data lies in shared slot ``slot`` (its first ``length`` bytes)."""
    slot: int
    length: int
    end: int


class SharedSlots:
    """Anonymous shared memory (MAP_SHARED, made before the workers fork, so they map the same
    pages): a task's FASTA block goes out in a slot and its codons come back in the same one. A
    slot is the task's until the main process has taken its codons back."""

    def __init__(self, count: int, size: int):
        self.size = size
        self.maps = [mmap.mmap(-1, size) for _ in range(count)]  # pages are only used once written
        self.free = list(range(count))

    def put(self, task: tuple) -> tuple[int | None, tuple]:
        file, item, limits = task
        if not isinstance(item, FastaBlock) or len(item.data) > self.size or not self.free:
            return None, task  # GenBank records, or a block too large: through the pipe
        slot = self.free.pop()
        self.maps[slot][:len(item.data)] = item.data
        return slot, (file, InSlot(slot, len(item.data), item.end), limits)

    def take(self, slot: int, length: int) -> np.ndarray:
        codons = np.frombuffer(self.maps[slot], dtype=np.uint8, count=length).copy()
        self.free.append(slot)
        return codons

    def close(self) -> None:
        for m in self.maps:
            m.close()


_SLOTS: SharedSlots | None = None  # set in the main process just before the pool forks


def read_ahead(items: Iterable, depth: int = 2) -> Iterator:
    """``items``, produced by a thread of their own up to ``depth`` ahead: with workers, the main
    process's reading (mostly inflating, which releases the GIL) runs beside its writing. An
    exception in the thread is raised here; closing this iterator stops the thread."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as exc:  # noqa: B036 - handed to the consumer, raised there
            put(_Raised(exc))

    thread = threading.Thread(target=produce, name="prepare_genomes-reader", daemon=True)
    thread.start()
    try:
        while (item := results.get()) is not end:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass(frozen=True)
class _Raised:
    exc: BaseException


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


MAX_RUN = 1 << 24  # ids a run of SeenIds grows to: a merge then never holds more than ~2 x 160 MB


def _merged(big: tuple[np.ndarray, np.ndarray], small: tuple[np.ndarray, np.ndarray]):
    """Two sorted (hashes, inputs) runs as one, small inserted into big (no sort: ~2 x their size)."""
    at = np.searchsorted(big[0], small[0]) + np.arange(len(small[0]))
    into = np.ones(len(big[0]) + len(small[0]), dtype=bool)
    into[at] = False
    out = []
    for b, s in zip(big, small):
        merged = np.empty(len(into), dtype=b.dtype)
        merged[at] = s
        merged[into] = b
        out.append(merged)
    return tuple(out)


class SeenIds:
    """The ids seen so far, as 64-bit hashes (``id_hashes``) with the input each came from: 10
    bytes an id (about 1 GB at GenSLM's 110 million genes) instead of a set of strings (about 100),
    in sorted runs merged as they grow up to MAX_RUN ids (binary search per batch, each id merged
    O(log n) times).
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
            while (len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0])
                   and len(self._runs[-2][0]) + len(self._runs[-1][0]) <= MAX_RUN):
                small, big = self._runs.pop(), self._runs.pop()
                self._runs.append(_merged(big, small))
        out = []
        for pos in repeats.tolist():  # rare: a Python loop is fine
            key = int(hashes[pos])
            self._times[key] = self._times.get(key, 1) + 1
            was = int(earlier[inverse[pos]])
            out.append((pos, file if was < 0 else was, self._times[key]))
        return out
