"""Datasets over token shards, a resumable distributed batch sampler, and the training dataloader.

Labels are shifted here, once: ``labels[t]`` is the token the model must predict at position t,
so models and losses never shift (plain cross-entropy with ``ignore_index=-100``).

To add another objective (e.g. BERT masked-LM), write a class taking ``(shardset, **kwargs)`` with
``__len__``/``__getitem__`` returning a dict of tensors, and pass it as ``dataset_cls`` to
``build_dataloader``. Random masking should draw from a generator seeded by (seed, epoch, index)
so that a resumed run sees the same masks.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from modelzoo.data.shards import ShardSet
from modelzoo.errors import ConfigError

IGNORE_INDEX = -100


class CausalLMDataset(Dataset):
    """Window i -> {input_ids, labels (next token, -100 on pad / last), attention_mask}."""

    def __init__(self, shardset: ShardSet):
        self.shardset = shardset
        self.pad_id = shardset.pad_id

    def __len__(self) -> int:
        return len(self.shardset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(np.asarray(self.shardset[i], dtype=np.int64))
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:-1] = input_ids[1:]
        labels[labels == self.pad_id] = IGNORE_INDEX
        attention_mask = (input_ids != self.pad_id).long()
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class ResumableBatchSampler:
    """Batches of indices for ONE epoch per ``iter()``; remembers where it is.

    The global batch (``batch_size`` indices) is cut from a permutation seeded by
    ``seed + epoch``; rank r then takes its contiguous slice of ``batch_size // world_size``, so
    N ranks together see exactly what one rank would. The last incomplete batch is dropped.
    """

    def __init__(self, num_items: int, batch_size: int, shuffle: bool, seed: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1:
            raise ConfigError(f"batch_size ({batch_size}) and world size ({world_size}) must be >= 1")
        if batch_size % world_size:
            raise ConfigError(f"batch_size {batch_size} is not divisible by the number of "
                              f"systems/ranks {world_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        if num_items < batch_size:
            raise ConfigError(f"batch_size {batch_size} is larger than the dataset "
                              f"({num_items} windows): no full batch")
        self.num_items, self.batch_size = num_items, batch_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = batch_size // world_size
        self.epoch = 0
        self.batches_done = 0

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_items)

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
        self.dataset = dataset
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
            loader = DataLoader(self.dataset, batch_sampler=self.sampler,
                                num_workers=self.num_workers)
            for batch in loader:
                self._consumed += 1
                yield batch
            self._epoch, self._consumed = self._epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches_done": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._consumed = int(state["epoch"]), int(state["batches_done"])


def build_dataloader(data_dir, batch_size: int, shuffle: bool, shuffle_seed: int,
                     num_workers: int = 0, rank: int = 0, world_size: int = 1,
                     max_seq_length: int | None = None, dataset_cls=CausalLMDataset,
                     dataset_kwargs: dict | None = None, verify: bool = True) -> GenomeDataLoader:
    """Open a shard directory and return this rank's endless, resumable batch iterator."""
    shards = ShardSet(data_dir, verify=verify)
    if max_seq_length is not None and max_seq_length != shards.max_seq_length:
        raise ConfigError(f"max_seq_length {max_seq_length} in the params does not match the "
                          f"shards in {data_dir} (max_seq_length {shards.max_seq_length})")
    dataset = dataset_cls(shards, **(dataset_kwargs or {}))
    if len(dataset) < batch_size:
        raise ConfigError(f"batch_size {batch_size} is larger than the {len(dataset)} windows "
                          f"in {data_dir}: not one full batch")
    sampler = ResumableBatchSampler(len(dataset), batch_size, shuffle, shuffle_seed,
                                    rank=rank, world_size=world_size)
    return GenomeDataLoader(dataset, sampler, shards.max_seq_length, num_workers=num_workers)
