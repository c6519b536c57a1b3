"""GenomeLM's streams: an input of any length read a round at a time, its pieces computed in
packed batches (``inference_batching``, shared out among the processes of a group), and each
round's results handed back per sequence, in input order."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from modelzoo import inference_batching as batching
from modelzoo.errors import ConfigError, DataError

DEFAULT_BATCH_WINDOWS = 8  # batch_tokens by default: this many windows of the model's full context


def encoded(lm, sequences: Iterable) -> Iterator[tuple[object, np.ndarray]]:
    """Each sequence as given, with its codon ids."""
    for k, item in enumerate(sequences):
        name, seq = (item.id, item.seq) if hasattr(item, "seq") else (f"#{k}", item)
        ids = lm.tokenizer.encode(seq, lm.reading_frame).astype(np.int64)
        if not np.isin(ids, lm.tokenizer.codon_ids).any():
            raise DataError(f"sequence {name}: no whole A/C/G/T codon to read")
        yield item, ids


def streamed(lm, sequences: Iterable, pieces_of, step, reduce, batch_size: int | None, batch_tokens: int | None,
             progress: bool, desc: str, encode=None) -> Iterator[tuple[list, object]]:
    """The results of an input of any length, a round at a time (``inference_batching``):
    ``encode(sequences)`` gives (sequence, ids) pairs (default ``encoded``), ``pieces_of(ids)``
    one sequence's pieces, ``step(packed)`` a result per piece of a packed batch, and
    ``reduce([(codons, [(piece, result), ...]) per sequence])`` a round's block. Yields
    (sequences as given, block) in input order. Bad arguments are refused here, before reading."""
    if isinstance(sequences, (str, bytes)):
        raise ConfigError("sequences: pass a list of sequences, not one string")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size {batch_size}: must be >= 1")
    if batch_tokens is not None and batch_tokens < 1:
        raise ConfigError(f"batch_tokens {batch_tokens}: must be >= 1")
    tokens = batch_tokens or DEFAULT_BATCH_WINDOWS * lm.config.max_position_embeddings
    encode = encode or (lambda items: encoded(lm, items))
    return _rounds(lm, encode, sequences, pieces_of, step, reduce, batch_size, tokens, progress, desc)


@torch.no_grad()
def _rounds(lm, encode, sequences, pieces_of, step, reduce, batch_size, tokens, progress, desc):
    lengths: list[int] = []  # codons of each sequence of the round

    def read():
        for item, ids in encode(sequences):
            lengths.append(len(ids))
            yield item, ids

    most = None if batch_size is None else batch_size * batching.ROUND_BATCHES
    total = len(sequences) if hasattr(sequences, "__len__") else None
    quiet = not progress or batching.rank_and_world()[0] > 0  # one bar for a group: process 0's
    with tqdm(total=total, desc=desc, unit=" sequences", disable=True if quiet else None) as bar:
        for items, pieces in batching.rounds(read(), pieces_of, batching.round_work(tokens), most):
            found = batching.results(pieces, step, tokens, batch_size, lm.tokenizer.pad_id,
                                     lm.tokenizer.mask_id, lm.device)
            per_sequence = [(n, []) for n in lengths[:len(items)]]
            del lengths[:len(items)]
            for piece, result in zip(pieces, found):
                per_sequence[piece.owner][1].append((piece, result))
            yield items, reduce(per_sequence)
            bar.update(len(items))
