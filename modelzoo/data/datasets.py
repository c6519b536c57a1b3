"""Datasets over token shards, a resumable distributed batch sampler, and the training dataloader.

Labels are shifted here, once: ``labels[t]`` is the token the model must predict at position t,
so models and losses never shift (plain cross-entropy with ``ignore_index=-100``).

Objectives: causal LM (GPT-2, GPT-J, GPT-NeoX), masked LM and labelled windows (BERT); ``dataset_for``
picks one from the model config. Another objective is a class taking ``(shardset, **kwargs)``
with ``__len__``/``__getitem__`` returning a dict of tensors, passed as ``dataset_cls`` to
``build_dataloader``; random draws come from a generator seeded by (seed, epoch, index), the
epoch set through ``set_epoch``, so that a resumed run sees the same ones.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from modelzoo.data.shards import ShardSet
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import ConfigError, DataError

IGNORE_INDEX = -100
PAD_ID = CodonTokenizer().pad_id


def nonpad_tokens(batch: dict) -> int:
    """Positions of a batch that hold a real token, not [PAD]: what packing buys shows here."""
    return int((batch["input_ids"] != PAD_ID).sum())


def shard_settings(fields: dict) -> dict:
    """The input-section settings the shards were prepared with, from their manifest's fields."""
    created = fields.get("created_by")
    options = created.get("options") if isinstance(created, dict) else None
    frame = options.get("reading_frame", "as_read") if isinstance(options, dict) else "as_read"
    return {"max_seq_length": fields.get("max_seq_length"), "reading_frame": frame,
            "pack_sequences": bool(fields.get("packed", False))}


def shard_mismatches(fields: dict, data_dir, **given) -> dict[str, str]:
    """{input-section key: what is wrong} for each setting in ``given`` (max_seq_length,
    reading_frame, pack_sequences; None: not given) that the shards' manifest fields contradict."""
    theirs = shard_settings(fields)
    wrong = {}
    for key, ours in given.items():
        if ours is not None and ours != theirs[key]:
            wrong[key] = _MISMATCH[key](ours, theirs[key], data_dir)
    return wrong


_MISMATCH = {
    "max_seq_length": lambda ours, theirs, d: (
        f"{ours} does not match the shards in {d}: prepare shards with --max_seq_length {ours} into another "
        f"directory, or set it to the shards' max_seq_length {theirs}"),
    "reading_frame": lambda ours, theirs, d: (
        f"reading_frame is {ours} but the shards in {d} were prepared with reading_frame {theirs} (prepare_genomes "
        f"--reading_frame): set it to {theirs}, or prepare {ours} shards into another directory"),
    "pack_sequences": lambda ours, theirs, d: (
        f"true but the shards in {d} are not packed: set it to false, or prepare packed shards "
        f"(prepare_genomes --pack_sequences) into another directory" if ours else
        f"false but the shards in {d} are packed (prepare_genomes --pack_sequences): set it to true"),
}


def check_shards(shardset: ShardSet, **given) -> None:
    """An input section's settings must be those its shards were prepared with. A run's params
    are checked at validation already (modelzoo.config, naming the file); this guards direct use."""
    wrong = shard_mismatches(shardset.manifest, shardset.data_dir, **given)
    if wrong:
        raise ConfigError("; ".join(f"{key}: {message}" for key, message in wrong.items()))


def document_layout(input_ids: torch.Tensor, sep_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A window's (document_ids, position_ids): records end at [SEP] (which closes its record's
    document), so ids count the [SEP]s before each token: 0, 0, 0, 1, 1, ...; [PAD] is in no
    document (-1). Positions restart at 0 at each record's first token ([PAD]: 0)."""
    sep, pad = input_ids == sep_id, input_ids == pad_id
    documents = torch.cumsum(sep, 0) - sep.long()
    index = torch.arange(len(input_ids))
    first = torch.ones_like(sep)
    first[1:] = sep[:-1]  # a record starts at the window's start and after every [SEP]
    positions = index - torch.cummax(torch.where(first, index, 0), 0).values
    return documents.masked_fill(pad, -1), positions.masked_fill(pad, 0)


class CausalLMDataset(Dataset):
    """Window i -> {input_ids, labels (next token; -100 on [PAD], [UNK] and the last), attention_mask}.

    An [UNK] (a codon with N or another ambiguity code) is read as input but never a target: the
    loss, like ``GenomeLM.log_likelihood``, scores real codons only, so their perplexities compare.

    Packed windows (``pack_sequences``: records back to back, each closed by [SEP]) get the
    targets of unpacked training: [SEP] is never a target and predicts nothing, so a record's
    last codon has no target, as before [PAD]. With ``document_attention`` (default: when
    packed) items also carry ``document_ids`` and ``position_ids`` (``document_layout``), and
    the models attend within each record only, at positions counted from its start.
    """

    def __init__(self, shardset: ShardSet, pack_sequences: bool = False, document_attention: bool | None = None):
        check_shards(shardset, pack_sequences=pack_sequences)
        tok = CodonTokenizer()
        self.shardset = shardset
        self.pad_id, self.unk_id, self.sep_id = shardset.pad_id, tok.unk_id, tok.sep_id
        self.document_attention = pack_sequences if document_attention is None else document_attention

    def __len__(self) -> int:
        return len(self.shardset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(np.asarray(self.shardset[i], dtype=np.int64))
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:-1] = input_ids[1:]
        not_target = (labels == self.pad_id) | (labels == self.unk_id) | (labels == self.sep_id)
        labels[not_target | (input_ids == self.sep_id)] = IGNORE_INDEX
        item = {"input_ids": input_ids, "labels": labels, "attention_mask": (input_ids != self.pad_id).long()}
        if self.document_attention:
            item["document_ids"], item["position_ids"] = document_layout(input_ids, self.sep_id, self.pad_id)
        return item


class ResumableBatchSampler:
    """Batches of indices for ONE epoch per ``iter()``; remembers where it is.

    The global batch (``batch_size`` indices) is cut from a permutation seeded by
    ``seed + epoch``; rank r then takes its contiguous slice of ``batch_size // world_size``, so
    N ranks together see exactly what one rank would. The last incomplete batch is dropped, or
    with ``pad_last`` (evaluation: every window counts) completed with ``FILLER`` indices, which
    the loader turns into rows without labels, so every batch keeps its shape.
    """

    FILLER = -1

    def __init__(self, num_items: int, batch_size: int, shuffle: bool, seed: int,
                 rank: int = 0, world_size: int = 1, pad_last: bool = False):
        if batch_size < 1 or world_size < 1:
            raise ConfigError(f"batch_size ({batch_size}) and world size ({world_size}) must be >= 1")
        if batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the number of "
                              f"systems/ranks {world_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if num_items < batch_size and not pad_last:
            raise ConfigError(f"batch_size {batch_size} is larger than the dataset "
                              f"({num_items} windows): no full batch")
        self.num_items, self.batch_size = num_items, batch_size
        self.shuffle, self.seed, self.pad_last = shuffle, seed, pad_last
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.epoch = 0
        self.batches_done = 0

    def __len__(self) -> int:
        return -(-self.num_items // self.batch_size) if self.pad_last else self.num_items // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            order = np.arange(self.num_items)
        else:
            order = np.random.default_rng(self.seed + epoch).permutation(self.num_items)
        filler = len(self) * self.batch_size - self.num_items
        return np.concatenate([order, np.full(filler, self.FILLER)]) if filler > 0 else order

    def __iter__(self) -> Iterator[list[int]]:
        self._roll_over()
        order = self._order(self.epoch)
        lo = self.rank * self.local_batch_size
        for b in range(self.batches_done, len(self)):
            start = b * self.batch_size + lo
            # Count before yielding: a consumer that stops here has received batch b.
            self.batches_done = b + 1
            yield order[start: start + self.local_batch_size].tolist()
        self._roll_over()

    def _roll_over(self) -> None:
        if self.batches_done >= len(self):
            self.epoch += 1
            self.batches_done = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
        self._roll_over()


class GenomeDataLoader:
    """Endless iterator of batches across epochs, resumable at the batch the caller got to.

    ``state_dict()`` counts batches handed to the caller, not those workers prefetched, so a
    checkpoint taken after step k resumes at batch k+1. Keep one live iterator at a time, and call
    ``load_state_dict`` before ``iter()``.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableBatchSampler, max_seq_length: int,
                 num_workers: int = 0):
        self.dataset = _WithFiller(dataset) if sampler.pad_last else dataset
        self.sampler = sampler
        self.max_seq_length = max_seq_length
        self.num_workers = num_workers
        self._epoch, self._consumed = sampler.epoch, sampler.batches_done

    @property
    def batch_size(self) -> int:
        """Global batch size (all ranks)."""
        return self.sampler.batch_size

    @property
    def local_batch_size(self) -> int:
        """Rows in each batch this loader yields (this rank's slice)."""
        return self.sampler.local_batch_size

    @property
    def tokens_per_batch(self) -> int:
        """Token slots (incl. padding) in each batch this loader yields."""
        return self.local_batch_size * self.max_seq_length

    @property
    def num_batches_per_epoch(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            # A fresh DataLoader per epoch: its workers start from the sampler's resume point.
            self.sampler.load_state_dict({"epoch": self._epoch, "batches_done": self._consumed})
            self._epoch, self._consumed = self.sampler.epoch, self.sampler.batches_done
            if hasattr(self.dataset, "set_epoch"):  # per-epoch random draws (MLM masks) follow the sampler
                self.dataset.set_epoch(self._epoch)
            # Without its own generator a DataLoader draws its workers' base seed from the global
            # torch RNG each time it starts: a resumed run (which starts one mid-epoch) would
            # then shift every later dropout mask and no longer match the uninterrupted run.
            seeds = torch.Generator().manual_seed(self.sampler.seed + self._epoch)
            loader = DataLoader(self.dataset, batch_sampler=self.sampler,
                                num_workers=self.num_workers, generator=seeds)
            for batch in loader:
                self._consumed += 1
                yield batch
            self._epoch, self._consumed = self._epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches_done": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._consumed = int(state["epoch"]), int(state["batches_done"])


class _WithFiller(Dataset):
    """``dataset`` whose index ``FILLER`` is a row that counts for nothing: the first item with
    every label ignored (a real row, so shapes and dtypes match)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # set_epoch, record_of, ... of the wrapped dataset
        return getattr(self.dataset, name)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i != ResumableBatchSampler.FILLER:
            return self.dataset[i]
        item = dict(self.dataset[0])
        item["labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
        return item


def build_dataloader(data_dir, batch_size: int, shuffle: bool, shuffle_seed: int,
                     num_workers: int = 0, rank: int = 0, world_size: int = 1,
                     max_seq_length: int | None = None, dataset_cls=CausalLMDataset,
                     dataset_kwargs: dict | None = None, verify: bool = True,
                     pad_last: bool = False, reading_frame: str | None = None) -> GenomeDataLoader:
    """Open a shard directory and return this rank's endless, resumable batch iterator
    (``pad_last``: the last partial batch too, for evaluation; ``reading_frame``: the one the
    shards must have been prepared with)."""
    shards = ShardSet(data_dir, verify=verify)
    check_shards(shards, max_seq_length=max_seq_length, reading_frame=reading_frame)
    dataset = dataset_cls(shards, **(dataset_kwargs or {}))
    if len(dataset) < batch_size and not pad_last:
        raise ConfigError(f"batch_size {batch_size} is larger than the {len(dataset)} windows "
                          f"in {data_dir}: not one full batch")
    sampler = ResumableBatchSampler(len(dataset), batch_size, shuffle, shuffle_seed,
                                    rank=rank, world_size=world_size, pad_last=pad_last)
    return GenomeDataLoader(dataset, sampler, shards.max_seq_length, num_workers=num_workers)


# ---------------------------------------------------------------- BERT: framing, masking, labels

def frame_body(length: int) -> int:
    """Codons in one framed piece of a ``length``-token window: [CLS] and [SEP] take two."""
    return length - 2


def frame(codons: np.ndarray, cls_id: int, sep_id: int, length: int | None = None, pad_id: int = PAD_ID) -> np.ndarray:
    """One piece of a record framed as BERT reads it, [CLS] codons [SEP], then [PAD] up to
    ``length`` (None: no padding). Training's windows (``FramedWindows``) and inference's
    (``modelzoo.inference``) are both framed here, so a model reads at inference what it learned on."""
    out = np.full(len(codons) + 2 if length is None else length, pad_id, dtype=np.int64)
    out[0], out[1:1 + len(codons)], out[1 + len(codons)] = cls_id, codons, sep_id
    return out


class FramedWindows:
    """Each record's codons re-cut into pieces of max_seq_length - 2, each framed [CLS] ... [SEP].

    Shard rows hold max_seq_length codons; BERT needs two of those slots for [CLS] and [SEP].
    Rather than drop codons, a record's codons are read as one stream (from its first row, or in
    packed shards from the row and offset its record table gives) and cut again, so one shard
    directory serves GPT and BERT alike. Unpacked: a window per framed piece, padded with [PAD].
    ``packed`` (the shards are packed): framed pieces back to back, as many whole ones as fit,
    then [PAD] -- a record that fits one window is never split, a longer one's full pieces fill
    windows of their own. ``pieces_of(i)`` says which pieces window i holds and where.
    """

    def __init__(self, shardset: ShardSet, tokenizer: CodonTokenizer | None = None, packed: bool = False):
        tok = tokenizer or CodonTokenizer()
        check_shards(shardset, pack_sequences=packed)
        self.shardset = shardset
        self.length = shardset.max_seq_length
        if self.length < 3:
            raise ConfigError(f"{shardset.data_dir}: max_seq_length {self.length} leaves no room for codons "
                              "between [CLS] and [SEP]")
        self.cls_id, self.sep_id, self.pad_id = tok.cls_id, tok.sep_id, shardset.pad_id
        self.pieces = _pieces(shardset.records, frame_body(self.length), packed)  # record, row, offset, start, end
        firsts = _packed_firsts(self.pieces[:, 4] - self.pieces[:, 3] + 2, self.length) if packed else \
            np.arange(len(self.pieces), dtype=np.int64)
        self.firsts = np.append(firsts, len(self.pieces))  # window i: pieces firsts[i]:firsts[i+1]

    def __len__(self) -> int:
        return len(self.firsts) - 1

    def record_of(self, i: int) -> int:
        """The record of window i (its first piece's, in packed windows)."""
        return int(self.pieces[self.firsts[i], 0])

    def pieces_of(self, i: int) -> list[tuple[int, int, int]]:
        """(piece index, its [CLS]'s position in window i, framed length) of every piece window i holds."""
        out, at = [], 0
        for j in range(int(self.firsts[i]), int(self.firsts[i + 1])):
            size = int(self.pieces[j, 4] - self.pieces[j, 3]) + 2
            out.append((j, at, size))
            at += size
        return out

    def frame(self, j: int) -> np.ndarray:
        """Piece j alone as an unpacked window: [CLS] codons [SEP] [PAD]..."""
        _, row, offset, start, end = (int(x) for x in self.pieces[j])
        first, last = (offset + start) // self.length, (offset + end - 1) // self.length  # rows it spans
        stream = np.concatenate([self.shardset[row + k] for k in range(first, last + 1)])
        codons = stream[offset + start - first * self.length: offset + end - first * self.length]
        return frame(codons, self.cls_id, self.sep_id, self.length, self.pad_id)

    def __getitem__(self, i: int) -> np.ndarray:
        pieces = self.pieces_of(i)
        if len(pieces) == 1:
            return self.frame(pieces[0][0])
        out = np.full(self.length, self.pad_id, dtype=np.int64)
        for j, at, size in pieces:
            out[at: at + size] = self.frame(j)[:size]
        return out


def _pieces(records, body: int, packed: bool) -> np.ndarray:
    """(record, row, offset, start, end) of every framed piece, in record order: a record of n
    codons is cut at 0, body, 2 body, ... (none when n is 0), read from the row its stream starts
    in (packed: at its offset there). Computed from the record table's columns, not per record."""
    n = np.asarray(records.num_tokens, dtype=np.int64)
    count = -(-n // body)
    record = np.repeat(np.arange(len(n), dtype=np.int64), count)
    start = (np.arange(len(record), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)) * body
    rows, offsets = records.start_rows(), records.offsets() if packed else np.zeros(len(n), np.int64)
    return np.stack([record, rows[record], offsets[record], start, np.minimum(n[record], start + body)], axis=1)


def _packed_firsts(sizes: np.ndarray, length: int) -> np.ndarray:
    """First piece of each packed window: pieces (framed sizes, each <= length) go into the open
    window while they fit, else open the next. A window starting at piece a holds those ending by
    a's start + length, so following that from piece 0 is a Python step per window, not per piece."""
    ends = np.cumsum(sizes)
    nxt = np.searchsorted(ends, ends - sizes + length, side="right").tolist()
    firsts, a = [], 0
    while a < len(nxt):
        firsts.append(a)
        a = nxt[a]
    return np.array(firsts, dtype=np.int64)


class MaskedLMDataset(Dataset):
    """BERT masked-codon batches: {input_ids, labels, attention_mask} over framed windows.

    Each codon is selected with probability ``mlm_probability`` (never [CLS], [SEP], [PAD] or
    [UNK], which is no codon to predict; at least one per framed piece that has a codon); a
    selected codon becomes [MASK] 80% of the time, a random codon 10%, and stays 10%. ``labels``
    holds the original codon at selected positions and -100 elsewhere. The draws come from a
    generator seeded by (seed, epoch, piece), so a resumed run sees exactly the masks the
    uninterrupted run would have, and a record's masks are the same packed or not.

    ``pack_sequences``: framed pieces packed into windows (``FramedWindows``); with
    ``document_attention`` (default: when packed) items also carry ``document_ids`` and
    ``position_ids``, so each [CLS] r [SEP] attends only to itself, at positions from 0.
    """

    def __init__(self, shardset: ShardSet, mlm_probability: float = 0.15, seed: int = 0,
                 tokenizer: CodonTokenizer | None = None, pack_sequences: bool = False,
                 document_attention: bool | None = None):
        tok = tokenizer or CodonTokenizer()
        self.windows = FramedWindows(shardset, tok, packed=pack_sequences)
        self.mlm_probability = mlm_probability
        self.seed = seed & 0xFFFF_FFFF_FFFF_FFFF  # numpy seeds must be non-negative
        self.epoch = 0
        self.mask_id, self.codon_ids = tok.mask_id, tok.codon_ids.astype(np.int64)
        self.never_masked = np.array([tok.cls_id, tok.sep_id, shardset.pad_id, tok.unk_id])
        self.document_attention = pack_sequences if document_attention is None else document_attention

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.windows)

    def _mask(self, ids: np.ndarray, piece: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, chosen) of one framed piece (as an unpacked window)."""
        rng = np.random.default_rng([self.seed, self.epoch, piece])
        candidates = ~np.isin(ids, self.never_masked)
        chosen = candidates & (rng.random(len(ids)) < self.mlm_probability)
        if not chosen.any() and candidates.any():
            chosen[rng.choice(np.flatnonzero(candidates))] = True
        action = rng.random(len(ids))
        inputs = ids.copy()
        inputs[chosen & (action < 0.8)] = self.mask_id
        swap = chosen & (action >= 0.8) & (action < 0.9)
        inputs[swap] = rng.choice(self.codon_ids, size=int(swap.sum()))
        return inputs, chosen

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        inputs, chosen = ids.copy(), np.zeros(len(ids), dtype=bool)
        for j, at, size in self.windows.pieces_of(i):
            frame = np.full(len(ids), self.windows.pad_id, dtype=ids.dtype)  # the piece as an unpacked window
            frame[:size] = ids[at: at + size]
            piece_inputs, piece_chosen = self._mask(frame, j)
            inputs[at: at + size], chosen[at: at + size] = piece_inputs[:size], piece_chosen[:size]
        item = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(np.where(chosen, ids, IGNORE_INDEX)),
                "attention_mask": torch.from_numpy((ids != self.windows.pad_id).astype(np.int64))}
        if self.document_attention:
            ids = torch.from_numpy(ids)
            item["document_ids"], item["position_ids"] = document_layout(ids, self.windows.sep_id, self.windows.pad_id)
        return item


def read_label_table(path, label_column: str, id_column: str | None = None) -> tuple[dict[str, str], list[str]]:
    """A TSV with a header -> ({record id: class}, sorted class names). Rows with an empty class
    are left out (those records count as unlabelled)."""
    import csv
    import difflib

    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except OSError as e:
        raise DataError(f"{path}: cannot read labels file ({e.strerror or e})") from None
    if not rows:
        raise DataError(f"{path}: empty labels file (need a header row)")
    header = rows[0]
    for key, column in (("label_column", label_column), ("id_column", id_column or header[0])):
        if column not in header:
            close = difflib.get_close_matches(column, header, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; columns: {', '.join(header)}"
            raise DataError(f"{path}: no column {column!r} ({key}){hint}")
    id_at, label_at = header.index(id_column or header[0]), header.index(label_column)
    table: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {line} has {len(row)} fields, the header has {len(header)}")
        record, label = row[id_at], row[label_at].strip()
        if record in table and table[record] != label:
            raise DataError(f"{path}: line {line}: record {record!r} appears twice with different classes")
        if label:
            table[record] = label
    return table, sorted(set(table.values()))


class SequenceClassificationDataset(Dataset):
    """Framed windows labelled with their record's class (from a TSV keyed by record id):
    {input_ids, attention_mask, labels (one class index per window)}."""

    def __init__(self, shardset: ShardSet, labels_file, label_column: str, id_column: str | None = None,
                 num_labels: int | None = None):
        self.windows = FramedWindows(shardset)
        table, names = read_label_table(labels_file, label_column, id_column)
        if num_labels is not None and len(names) != num_labels:
            raise ConfigError(f"model.num_labels is {num_labels} but column {label_column!r} of {labels_file} "
                              f"has {len(names)} classes ({', '.join(names[:8])})")
        self.label_names = names
        index = {name: k for k, name in enumerate(names)}
        self.record_labels = np.empty(len(shardset.records), dtype=np.int64)
        unlabelled, first = 0, None
        for r, record in enumerate(shardset.records.ids()):
            label = table.get(record)
            if label is None:
                unlabelled, first = unlabelled + 1, record if first is None else first
            else:
                self.record_labels[r] = index[label]
        if unlabelled:
            raise DataError(f"{labels_file}: no {label_column} for record {first!r} of "
                            f"{shardset.data_dir} ({unlabelled} records unlabelled)")

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        return {"input_ids": torch.from_numpy(ids),
                "attention_mask": torch.from_numpy((ids != self.windows.pad_id).astype(np.int64)),
                "labels": torch.tensor(self.record_labels[self.windows.record_of(i)])}


def dataset_for(model, section, seed: int) -> tuple[type, dict]:
    """The dataset class and its arguments for a model config and an input section, by the
    model's objective: causal LM, masked LM, or labelled windows for a classifier."""
    from modelzoo.models import CAUSAL_LM, MASKED_LM, objective_of
    objective = objective_of(model)
    if objective == CAUSAL_LM:
        return CausalLMDataset, {"pack_sequences": section.pack_sequences,
                                 "document_attention": section.document_attention}
    if objective == MASKED_LM:
        return MaskedLMDataset, {"mlm_probability": section.mlm_probability, "seed": seed,
                                 "pack_sequences": section.pack_sequences,
                                 "document_attention": section.document_attention}
    return SequenceClassificationDataset, {"labels_file": section.labels_file, "label_column": section.label_column,
                                           "id_column": section.id_column, "num_labels": model.num_labels}
