"""Packed, length-aware batches for ``GenomeLM``, a round of the input at a time, shared out
among the processes of a run.

A *piece* is what the model reads in one go: a window of a sequence (framed [CLS] ... [SEP] for
BERT), or, for BERT's pseudo-log-likelihood, a framed window with one codon masked. The pieces of
a round (a bounded run of the input: memory holds a round, never the input) are sorted longest
first and laid into batches: rows as wide as the batch's longest piece, as many rows as
``batch_tokens`` allows; a shorter piece joins a row that still has room (first fit). A row that
holds several pieces carries the training path's packed layout (``document_ids``, and
``position_ids`` counted from 0 in each piece), so every piece attends only to itself, at its own
positions: its results are those of the piece alone. A batch whose rows hold one piece each is
a plain padded batch. On a CPU a batch is computed in forward passes of about
``CPU_PASS_TOKENS`` (its rows, fullest first, each pass as wide as its fullest row): a piece's
results depend on its row alone (up to float32 rounding: a pass narrower than its batch pads
less, which saved a tenth of the CPU time on genes; embeddings moved by at most 1.2e-7).

Under a process group (an outer ``torchrun``, or a tool's ``--num_workers_per_node``), every
process reads the same input and plans the same batches; process r computes batches r, r + K,
... of each round, and the results are gathered, so that every process yields the whole stream
in input order, the same bytes as one process (the same batches, summed in the same order).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from modelzoo.backends.base import rank_and_world

# Batches per round: the pieces sorted by length together, and shared out among the processes.
# The same for any number of processes (the batches, and so the bytes, must not depend on it):
# more than this many processes would idle.
ROUND_BATCHES = 8
# On a CPU, tokens per forward pass (padding included; whole rows, one at least): a batch is
# computed in passes this size, whose activations stay in the caches. The same rows in one
# 15,000-25,000-token pass took 1.2-1.8x the CPU time (the GPT-NeoX of bench/bench_inference.py,
# 2 layers of 128, at widths 305-2048, Intel Xeon with AMX); 1,024-4,096 measured alike. A GPU
# takes a batch whole.
CPU_PASS_TOKENS = 2048
# Passes between handing the heap's free pages back (``release_freed_memory``), and at the end of
# every round. A pass frees its buffers around results that live on, which fragments the heap:
# peak memory on the SARS-CoV-2 genomes' embed (bench/bench_inference.py) rose 6-18% at 10x the
# input without this, 0-5% with it, for about 1.5% more CPU time.
RELEASE_PASSES = 8


class Piece:
    """Tokens the model reads in one go, the sequence of the round they belong to (``owner``),
    where their results go in it (``place``: a codon index), and the position given [MASK]
    (``mask_at``, BERT's pseudo-log-likelihood; -1: none)."""

    __slots__ = ("ids", "owner", "place", "mask_at")

    def __init__(self, ids: np.ndarray, place: int = 0, mask_at: int = -1):
        self.ids, self.place, self.mask_at, self.owner = ids, place, mask_at, -1


class Packed:
    """One batch on the device: what the model reads (``batch``), and where its pieces lie in
    the flattened (rows * width) tokens: ``spans[k]`` = [start, end) of the batch's k-th piece,
    ``piece_of`` = k at each token (-1: padding), ``order[k]`` = its index in the round."""

    def __init__(self, rows: list[list[int]], pieces: Sequence[Piece], pad_id: int, mask_id: int, device):
        width = max(sum(len(pieces[i].ids) for i in row) for row in rows)
        several = any(len(row) > 1 for row in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        piece_of = np.full((len(rows), width), -1, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        self.spans, self.order = [], []
        self.masked, self.targets = [], []  # flattened positions given [MASK], and the tokens there
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                piece = pieces[i]
                n = len(piece.ids)
                ids[r, at: at + n] = piece.ids
                if piece.mask_at >= 0:
                    ids[r, at + piece.mask_at] = mask_id
                    self.masked.append(r * width + at + piece.mask_at)
                    self.targets.append(int(piece.ids[piece.mask_at]))
                piece_of[r, at: at + n] = len(self.order)
                positions[r, at: at + n] = np.arange(n)
                self.spans.append((r * width + at, r * width + at + n))
                self.order.append(i)
                at += n
        self.width = width
        self.piece_of = torch.from_numpy(piece_of.reshape(-1))
        self.input_ids = torch.as_tensor(ids, device=device)
        self.batch = {"input_ids": self.input_ids, "attention_mask": (self.input_ids != pad_id).long()}
        if several:  # each piece its own document, at positions from 0 (padding: no document)
            self.batch["document_ids"] = torch.as_tensor(piece_of, device=device)
            self.batch["position_ids"] = torch.as_tensor(positions, device=device)

    def __len__(self) -> int:
        return len(self.order)

    def follows(self) -> torch.Tensor:
        """Per flattened token: whether the token before it is of the same piece (what a causal
        model predicted it from); False for a piece's first token and for padding."""
        same = torch.zeros_like(self.piece_of, dtype=torch.bool)
        same[1:] = (self.piece_of[1:] == self.piece_of[:-1]) & (self.piece_of[1:] >= 0)
        return same

    def starts(self) -> torch.Tensor:
        return torch.tensor([s for s, _ in self.spans], dtype=torch.long)

    def per_piece(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Float64 sums per piece of flattened per-token ``values`` (tokens x ...), each token
        weighted by ``weights`` (default 1); padding adds nothing."""
        values = values.to(torch.float64, copy=True)  # weighted in place: the one buffer of tokens x ...
        if weights is not None:
            values.mul_(weights.double().view(-1, *[1] * (values.dim() - 1)))
        # padding adds into one row past the pieces, dropped: no copy of the tokens inside first
        out = values.new_zeros((len(self) + 1, *values.shape[1:]))
        return out.index_add_(0, self.piece_of.where(self.piece_of >= 0, len(self)), values)[:-1]


def plan(lengths: Sequence[int], batch_tokens: int, max_pieces: int | None = None) -> list[list[list[int]]]:
    """Batches of rows of piece indices: longest first; a batch's rows are as wide as its first
    (longest) piece and hold at most ``batch_tokens`` tokens together (padding counted; one row
    at least) and ``max_pieces`` pieces; a piece goes into the row of the batch with the least
    room that holds it (the earliest of those), else a new row while the budget allows."""
    batches: list[list[list[int]]] = []
    rows: list[list[int]] = []
    with_room: dict[int, list[int]] = {}  # room left -> the rows with that much, earliest first
    width = count = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties in input order
        n = lengths[i]
        if rows and (max_pieces is None or count < max_pieces):
            room = min((r for r in with_room if r >= n), default=None)
            if room is not None:
                row = with_room[room].pop(0)
                if not with_room[room]:
                    del with_room[room]
            elif (len(rows) + 1) * width <= batch_tokens:
                room, row = width, len(rows)
                rows.append([])
            if room is not None:
                rows[row].append(i)
                if room > n:
                    with_room.setdefault(room - n, []).append(row)
                count += 1
                continue
        if rows:
            batches.append(rows)
        rows, with_room, width, count = [[i]], {}, n, 1
    if rows:
        batches.append(rows)
    return batches


def passes(rows: list[list[int]], lengths: Sequence[int], most: int) -> Iterator[list[list[int]]]:
    """A batch's rows in forward passes of at most ``most`` tokens (one row at least), each as
    wide as its fullest row: rows sorted fullest first (ties in plan order) so that a pass's
    rows are alike and padding stays small. What a piece computes depends on its row alone."""
    fill = [sum(lengths[i] for i in row) for row in rows]
    order = sorted(range(len(rows)), key=lambda r: -fill[r])
    start = 0
    while start < len(order):
        width, end = fill[order[start]], start + 1
        while end < len(order) and (end + 1 - start) * width <= most:
            end += 1
        yield [rows[r] for r in order[start:end]]
        start = end


def rounds(encoded: Iterable[tuple[object, np.ndarray]], pieces_of: Callable[[np.ndarray], Iterable[Piece]],
           work: int, max_pieces: int | None) -> Iterator[tuple[list, list[Piece]]]:
    """The input a round at a time: (sequences as given, their pieces), a round closing once its
    pieces hold ``work`` tokens or ``max_pieces`` pieces (a sequence is never split)."""
    items, pieces, tokens = [], [], 0
    for item, ids in encoded:
        for piece in pieces_of(ids):
            piece.owner = len(items)
            pieces.append(piece)
            tokens += len(piece.ids)
        items.append(item)
        if tokens >= work or (max_pieces is not None and len(pieces) >= max_pieces):
            yield items, pieces
            items, pieces, tokens = [], [], 0
    if items:
        yield items, pieces


def results(pieces: Sequence[Piece], compute: Callable[[Packed], list], batch_tokens: int,
            max_pieces: int | None, pad_id: int, mask_id: int, device) -> list:
    """``compute``'s result for every piece of a round, in the round's order: this process
    computes its share of the batches, and the shares of the others are gathered."""
    lengths = [len(p.ids) for p in pieces]
    batches = plan(lengths, batch_tokens, max_pieces)
    rank, world = rank_and_world()
    most = CPU_PASS_TOKENS if torch.device(device).type == "cpu" else batch_tokens
    found: dict[int, object] = {}
    done = 0
    for b in range(rank, len(batches), world):
        for rows in passes(batches[b], lengths, most):
            packed = Packed(rows, pieces, pad_id, mask_id, device)
            found.update(zip(packed.order, compute(packed)))
            done += 1
            if done % RELEASE_PASSES == 0:
                release_freed_memory()
    release_freed_memory()
    if world > 1:
        found = gathered(found, world)
    return [found[i] for i in range(len(pieces))]


@functools.cache
def glibc():
    """The C library when it is glibc (malloc_trim, mallopt), else None: loaded once per process."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; without glibc,
    nothing): see ``RELEASE_PASSES``."""
    if glibc() is not None:
        glibc().malloc_trim(0)


_results_group: dict = {}  # the default group -> a gloo group for the results (None: it is gloo itself)


def gathered(mine: dict, world: int) -> dict:
    """Every process's results, merged (results are CPU arrays: they travel over gloo)."""
    import torch.distributed as dist
    default = dist.group.WORLD
    if default not in _results_group:  # made once per process group, by every process together
        _results_group.clear()
        _results_group[default] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=_results_group[default])
    merged: dict = {}
    for part in everyone:
        merged.update(part)
    return merged


def round_work(batch_tokens: int) -> int:
    """Tokens of pieces per round: ``ROUND_BATCHES`` full batches."""
    return batch_tokens * ROUND_BATCHES
