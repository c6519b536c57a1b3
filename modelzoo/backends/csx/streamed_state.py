"""Checkpoints of a disk MemoryX larger than RAM, written tensor by tensor.

``CSXBackend.state_dict()`` with disk MemoryX returns a ``StreamedState``: an ordinary state dict
whose tensors are lazily mapped MemoryX snapshots (so anything that reads it sees real tensors),
plus ``write_to(file)``, which ``training.checkpoint.save_checkpoint`` calls instead of buffering
``torch.save`` in memory. It writes torch.save's own zip format, so ``torch.load`` and every
backend read the file as any other checkpoint; each tensor's bytes are read from its MemoryX file
with explicit I/O just before they are written, so at most one tensor is in RAM at a time.
"""

from __future__ import annotations

import pickle

import torch
from torch import serialization

from modelzoo.backends.csx.store import Snapshot


class StreamedState(dict):
    def __init__(self, state: dict, snapshots: list[Snapshot], after_write=None):
        """``snapshots``: the sources of the tensors to stream (anything with ``tensor``, ``nbytes``
        and ``read_into``: also sharded_checkpoint's tensors of other systems); ``after_write(failed)``
        is called once write_to has ended."""
        super().__init__(state)
        self._sources = {s.tensor.untyped_storage().data_ptr(): s for s in snapshots if s.nbytes}
        self._after_write = after_write

    def write_to(self, file) -> None:
        """Serialise like ``torch.save(dict(self), file)``, streaming snapshot tensors from disk."""
        try:
            with serialization._open_zipfile_writer(file) as writer:
                serialization._save(dict(self), _StreamingRecords(writer, self._sources), pickle,
                                    serialization.DEFAULT_PROTOCOL, False)
        except BaseException:
            if self._after_write is not None:
                self._after_write(failed=True)
            raise
        if self._after_write is not None:
            self._after_write(failed=False)


class _StreamingRecords:
    """The zip writer torch.save writes records to, with snapshot storages read from their files."""

    def __init__(self, writer, sources: dict[int, Snapshot]):
        self.writer = writer
        self.sources = sources

    def write_record(self, name, data, nbytes):
        source = self.sources.get(data.data_ptr()) if isinstance(data, torch.UntypedStorage) else None
        if source is None:
            return self.writer.write_record(name, data, nbytes)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        source.read_into(memoryview(buffer.numpy()))
        self.writer.write_record(name, buffer.untyped_storage(), nbytes)

    def __getattr__(self, name):  # anything else torch.save asks of its writer
        return getattr(self.writer, name)
