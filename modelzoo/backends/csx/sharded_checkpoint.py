"""Checkpoints of disk MemoryX sharded over N systems, streamed to the writer one tensor at a time.

With ``--num_csx N`` every system owns a share of the stages (swarmx.py). Gathering the state
for a checkpoint would put all N shares into each rank's RAM, and a disk MemoryX exists because
one share may not fit. Instead ``ShardedCheckpoint`` gathers only a description of every
system's tensors (shape and dtype) and builds, on every system, the whole state dict: its own
tensors are lazily mapped MemoryX snapshots (store.Snapshot), the other systems' placeholders
of the right shape mapped from an empty sparse file (they read as zeros: only their owner has
the values). ``StreamedState.write_to`` on rank 0, the writer, asks each placeholder's owner for
its bytes as torch.save reaches it and writes them before asking for the next: the writer holds
one tensor of another system at a time, and each owner one of its own.

The requests travel on a process group of their own (SwarmX.checkpoint_group, with a timeout
long enough for the writer's disk): rank 0 sends the owner an int64 index and receives that
tensor's bytes; -1 ends the session. The owners serve when they next wait for the writer (the
backend's next step, or close()).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("modelzoo")
_DONE = -1


class _Remote:
    """A tensor of another system, as the gathered description names it."""

    def __init__(self, index: int, shape: torch.Size, dtype: torch.dtype):
        self.index, self.shape, self.dtype = index, shape, dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def _map(obj, fn):
    """``obj`` with every leaf replaced by ``fn(leaf)`` (dicts, lists and tuples are walked)."""
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return fn(obj)


def _leaves(obj):
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


class _RemoteSource:
    """What StreamedState reads a placeholder's bytes from: its owner, over the checkpoint group."""

    def __init__(self, session: "ShardedCheckpoint", owner: int, index: int, tensor: torch.Tensor):
        self.session, self.owner, self.index, self.tensor = session, owner, index, tensor
        self.nbytes = tensor.untyped_storage().nbytes()

    def read_into(self, buffer: memoryview) -> None:
        self.session.fetch(self.owner, self.index, buffer)


class ShardedCheckpoint:
    def __init__(self, local: dict, snapshots: list, swarm, scratch: Path):
        """``local``: this system's MemoryX state_dict(), whose tensors are ``snapshots``;
        ``scratch``: a directory of this system's own for the placeholders' sparse file."""
        self.rank, self.world, self.group = swarm.rank, swarm.world, swarm.checkpoint_group
        self.done = False
        self.streamed = [0, 0]  # tensors and bytes received from other systems (rank 0)
        self.peak_bytes = 0  # the most bytes of another system's tensors held at once (rank 0)
        self._served: list = []  # index -> this system's Snapshot
        self._pending: list = []  # the end-of-session messages in flight
        by_storage = {s.tensor.untyped_storage().data_ptr(): s for s in snapshots if s.nbytes}

        def describe(value):
            snapshot = by_storage.get(value.untyped_storage().data_ptr()) if torch.is_tensor(value) else None
            if snapshot is None:
                return value  # small values (e.g. Adam's step) travel as they are
            self._served.append(snapshot)
            return _Remote(len(self._served) - 1, value.shape, value.dtype)

        described = swarm.gather(_map(local, describe))
        self.sources: list = list(by_storage.values())
        largest = max((r.nbytes for part in described for r in _leaves(part) if isinstance(r, _Remote)), default=0)
        with _Placeholders(scratch, largest) as placeholders:
            self.parts = [local if owner == self.rank else
                          _map(part, lambda r, owner=owner: self._placeholder(placeholders, owner, r))
                          for owner, part in enumerate(described)]

    def _placeholder(self, placeholders: "_Placeholders", owner: int, remote):
        if not isinstance(remote, _Remote):
            return remote
        tensor = placeholders.tensor(remote.shape, remote.dtype)
        if remote.nbytes:
            self.sources.append(_RemoteSource(self, owner, remote.index, tensor))
        return tensor

    # ------------------------------------------------------------ the writer's side

    def fetch(self, owner: int, index: int, buffer: memoryview) -> None:
        if self.done:
            raise RuntimeError("this checkpoint's session with the other systems has ended")
        dist.send(torch.tensor([index], dtype=torch.int64), dst=owner, group=self.group)
        dist.recv(torch.frombuffer(buffer, dtype=torch.uint8), src=owner, group=self.group)
        self.streamed[0] += 1
        self.streamed[1] += len(buffer)
        self.peak_bytes = max(self.peak_bytes, len(buffer))

    def finish(self, failed: bool = False) -> None:
        """End the session (idempotent). The writer tells every other system; the others serve
        the writer's requests until it does. ``failed``: the run is ending on an exception, so
        nothing waits on another system (which may be gone)."""
        if self.done:
            return
        self.done = True
        try:
            if self.rank == 0:
                done = torch.tensor([_DONE], dtype=torch.int64)
                self._pending = [dist.isend(done, dst=r, group=self.group) for r in range(1, self.world)]
                if not failed:
                    for work in self._pending:
                        work.wait()
                    if self.streamed[0]:
                        others = self.world - 1
                        log.info("checkpoint: %d tensors, %s bytes, streamed from %d other system%s one at a time "
                                 "(at most %s bytes of them held at once)", self.streamed[0],
                                 f"{self.streamed[1]:,}", others, "s" * (others > 1), f"{self.peak_bytes:,}")
            elif not failed:
                self._serve()
        finally:
            self._served, self.sources = [], []  # the snapshots (old MemoryX file versions) go

    def _serve(self) -> None:
        request = torch.empty(1, dtype=torch.int64)
        while True:
            dist.recv(request, src=0, group=self.group)
            index = int(request)
            if index == _DONE:
                return
            snapshot = self._served[index]
            buffer = torch.empty(snapshot.nbytes, dtype=torch.uint8)
            snapshot.read_into(memoryview(buffer.numpy()))
            dist.send(buffer, dst=0, group=self.group)
            del buffer


class _Placeholders:
    """Tensors of any shape that hold no memory until written: private maps of one sparse file,
    which is unlinked once they are made (the maps stay valid)."""

    def __init__(self, directory: Path, largest: int):
        self.path = None
        if largest:
            fd, path = tempfile.mkstemp(prefix="placeholders-", suffix=".bin", dir=directory)
            os.ftruncate(fd, largest)
            os.close(fd)
            self.path = Path(path)

    def tensor(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if not shape.numel():
            return torch.empty(shape, dtype=dtype)
        return torch.from_file(str(self.path), shared=False, size=shape.numel(), dtype=dtype).view(shape)

    def __enter__(self) -> "_Placeholders":
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
