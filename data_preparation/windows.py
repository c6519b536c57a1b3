"""The writing half of prepare_genomes: kept records, in input order -> train/val/test splits ->
windows -> shards, a bounded group of records at a time.

Split: kept records are taken in consecutive groups of GROUP_RECORDS records (a group also ends
once it holds GROUP_CODONS codons); each group's records are dealt to the splits by a seeded
permutation, the split sizes rounded so the proportions hold over all records read so far. A
set that fits in one group is split exactly as it was before groups (one permutation of all
records): the same seed gives the same split.

Windows: unpacked, each record gets windows of its own, the last padded with [PAD] (``windows_of``).
Packed (``Packer``), records fill windows back to back, each followed by one [SEP], then [PAD]:
a record that fits a window (codons + 1 <= max_seq_length) is never split across two, and a
window with no room left for the next record is closed. A longer record closes the open window
and gets windows of its own, cut as unpacked ones: no [SEP], the last padded with [PAD], or
dropped when shorter than min_codons; the record after it opens a new window.
"""

from __future__ import annotations

import numpy as np

from modelzoo.data.shards import ShardWriter

GROUP_RECORDS = 1 << 16  # kept records the split is drawn over at a time...
GROUP_CODONS = 1 << 26  # ...or fewer, once they hold this many codons
PIECE_CODONS = 1 << 24  # window positions (bytes) cut per allocation


class Groups:
    """Kept records in input order, handed out in complete groups (the unit of the split)."""

    def __init__(self):
        self._ids: list[str] = []
        self._lengths: list[np.ndarray] = []
        self._codons: list[np.ndarray] = []
        self.records = 0  # held now
        self.codons = 0

    def add(self, ids: list[str], lengths: np.ndarray, codons: np.ndarray):
        """Take records (ids, codons of each, their codons back to back); yield each group they
        complete as (ids, starts, lengths, codons)."""
        while len(ids):
            reach = np.searchsorted(np.cumsum(lengths) + self.codons, GROUP_CODONS)  # first to reach it
            take = min(len(ids), GROUP_RECORDS - self.records, int(reach) + 1)
            used = int(lengths[:take].sum())
            self._ids += ids[:take]
            self._lengths.append(lengths[:take])
            self._codons.append(codons[:used])
            self.records += take
            self.codons += used
            ids, lengths, codons = ids[take:], lengths[take:], codons[used:]
            if self.records >= GROUP_RECORDS or self.codons >= GROUP_CODONS:
                yield self.flush()

    def flush(self):
        """The records held, as a group (possibly empty), and hold none."""
        lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int64)
        codons = np.concatenate(self._codons) if self._codons else np.empty(0, np.uint8)
        group = (self._ids, np.cumsum(lengths) - lengths, lengths, codons)
        self.__init__()
        return group


class SplitDealer:
    """Deal each group's records to the splits: a seeded permutation, the first round(f x n) of it
    to the first split and so on, rounded over every record dealt so far."""

    def __init__(self, fracs, seed: int):
        self.rng = np.random.default_rng(seed)
        self.cumulative = np.cumsum(fracs)
        self.dealt = 0

    def deal(self, n: int) -> list[np.ndarray]:
        """Each split's members among the next n records (indices 0..n-1, ascending)."""
        order = self.rng.permutation(n)
        total = self.dealt + n
        cuts = [min(n, max(0, round(c * total) - round(c * self.dealt))) for c in self.cumulative[:-1]]
        bounds = [0] + cuts + [n]
        self.dealt = total
        return [np.sort(order[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def window_counts(lengths: np.ndarray, max_seq_length: int, min_codons: int) -> np.ndarray:
    """Windows of each record cut alone: ceil(n / L), less a trailing one shorter than min_codons."""
    counts = -(-lengths // max_seq_length)
    tail = lengths - (counts - 1) * max_seq_length
    return counts - ((counts > 1) & (tail < min_codons))


def windows_of_flat(codons: np.ndarray, starts: np.ndarray, lengths: np.ndarray, max_seq_length: int,
                    min_codons: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each record ``codons[starts[i]:starts[i] + lengths[i]]`` cut into non-overlapping
    [PAD]-padded rows, back to back in one array; and the windows and tokens of each record."""
    counts = window_counts(lengths, max_seq_length, min_codons)
    used = np.minimum(lengths, counts * max_seq_length)
    out = np.full((int(counts.sum()), max_seq_length), pad_id, dtype=np.uint8)
    flat = out.reshape(-1)
    firsts = (np.cumsum(counts) - counts) * max_seq_length
    for dest, src, n in zip(firsts.tolist(), starts.tolist(), used.tolist()):
        flat[dest:dest + n] = codons[src:src + n]
    return out, counts, used


def windows_of(ids: np.ndarray, max_seq_length: int, min_codons: int, pad_id: int) -> np.ndarray:
    """Cut codon ids into non-overlapping [PAD]-padded rows; drop a short trailing window."""
    return windows_of_flat(ids, np.zeros(1, np.int64), np.array([len(ids)]), max_seq_length,
                           min_codons, pad_id)[0]


class SplitOutput:
    """One split's shard directory, fed members of successive groups in input order."""

    def __init__(self, writer: ShardWriter, min_codons: int, pack: bool):
        self.writer = writer
        self.length, self.min_codons = writer.max_seq_length, min_codons
        self.pad_id = writer.tokenizer.pad_id
        self.packer = Packer(writer, min_codons) if pack else None

    def add(self, ids: list[str], starts: np.ndarray, lengths: np.ndarray, codons: np.ndarray,
            members: np.ndarray) -> None:
        # cut into pieces of about PIECE_CODONS positions: the windows of a piece are one allocation
        size = lengths[members] + 1 if self.packer else window_counts(lengths[members], self.length,
                                                                      self.min_codons) * self.length
        piece = np.cumsum(size) // PIECE_CODONS
        for part in np.split(members, np.flatnonzero(np.diff(piece)) + 1) if len(members) else ():
            part_ids = [ids[i] for i in part.tolist()]
            if self.packer is not None:
                self.packer.add(part_ids, starts[part], lengths[part], codons)
            else:
                rows, counts, used = windows_of_flat(codons, starts[part], lengths[part], self.length,
                                                     self.min_codons, self.pad_id)
                self.writer.add_many(part_ids, counts, rows, used)

    def close(self) -> None:
        if self.packer is not None:
            self.packer.close()


class Packer:
    """Records into packed windows (the module docstring says how), the open window carried from
    one ``add`` to the next: the windows do not depend on how the records are handed in."""

    def __init__(self, writer: ShardWriter, min_codons: int):
        self.writer, self.min_codons = writer, min_codons
        self.length = writer.max_seq_length
        self.pad_id, self.sep_id = writer.tokenizer.pad_id, writer.tokenizer.sep_id
        self.open = np.full(self.length, self.pad_id, dtype=np.uint8)  # the window being filled
        self.fill = 0  # its tokens ([SEP]s included); 0: no window is open

    def add(self, ids: list[str], starts: np.ndarray, lengths: np.ndarray, codons: np.ndarray) -> None:
        if not len(lengths):
            return
        L, carried = self.length, self.fill
        counts = window_counts(lengths, L, self.min_codons)
        short = lengths < L  # fits with its [SEP]
        used = np.where(short, lengths, np.minimum(lengths, counts * L))
        # Each record takes n + 1 positions, a long one a whole window (L: nothing shares it); the
        # open window enters first, as an entry of its fill. A window starting at entry a holds the
        # entries up to nxt[a], so following nxt from 0 gives every window's first entry: a
        # Python step per window, not per record.
        size = np.concatenate(([carried] if carried else [], np.where(short, lengths + 1, L))).astype(np.int64)
        begin = np.cumsum(size) - size
        nxt = np.searchsorted(begin + size, begin + L, side="right").tolist()
        firsts, a = [], 0
        while a < len(nxt):
            firsts.append(a)
            a = nxt[a]
        window = np.searchsorted(firsts, np.arange(len(size)), side="right") - 1
        offsets = begin - begin[firsts][window]
        extra = np.zeros(len(firsts), dtype=np.int64)  # rows past the first of a long record's window
        extra[window[len(size) - len(lengths):][~short]] = counts[~short] - 1
        first_row = np.arange(len(firsts)) + np.cumsum(extra) - extra
        rows = first_row[window][len(size) - len(lengths):]
        offsets = offsets[len(size) - len(lengths):]
        fill = 0 if not short[-1] else int(begin[-1] + size[-1] - begin[firsts[-1]])
        total = int(first_row[-1] + extra[-1] + 1)

        block = np.full((total, L), self.pad_id, dtype=np.uint8)
        if carried:
            block[0] = self.open
        flat = block.reshape(-1)
        dest = rows * L + offsets
        for d, s, n in zip(dest.tolist(), starts.tolist(), used.tolist()):
            flat[d:d + n] = codons[s:s + n]
        flat[(dest + lengths)[short]] = self.sep_id
        closed = total - (1 if fill else 0)
        placed = int(used.sum() + short.sum())
        self.writer.add_records(ids, np.where(short, 1, counts), used, window=self.writer.num_windows + rows,
                                offset=offsets)
        self.writer.add_rows(block[:closed], carried + placed - fill)
        if fill:
            self.open = block[closed].copy()
        self.fill = fill

    def close(self) -> None:
        if self.fill:
            self.writer.add_rows(self.open[None], self.fill)
            self.fill = 0
