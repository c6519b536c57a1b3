"""SwarmX: the fabric between MemoryX and N CSX systems, on torch.distributed (gloo on CPU).

MemoryX is sharded by stage: stage s lives on system ``s % N`` (a weight used by several stages,
e.g. a tied embedding, lives with its first stage), so MemoryX capacity grows with N. Weights
are broadcast from their owner to every system as they stream in; gradients are reduced (summed)
onto their owner on the way back. Loss weights are normalised over the global batch
(``backends.base.loss_weights``), so the sum over systems is the gradient of the whole batch.

Weight streaming runs in the prefetch thread on a process group of its own, everything else in
the main thread on the default group: each group then sees the same sequence of collectives on
every rank, whatever the two threads interleave.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from modelzoo.backends.base import rank_and_world

# How long the other systems wait for the checkpoint writer (rank 0): writing a large MemoryX
# state outlasts the ordinary collective timeout.
CHECKPOINT_WAIT = datetime.timedelta(hours=2)


class SwarmX:
    def __init__(self, stage_names: list[list[str]]):
        self.rank, self.world = rank_and_world()
        self.owner: dict[str, int] = {}
        for s, names in enumerate(stage_names):
            for name in names:
                self.owner.setdefault(name, s % self.world)
        self.order = list(self.owner)
        self._stream_group = dist.new_group(backend="gloo") if self.world > 1 else None
        # a sharded disk MemoryX checkpoint streams to its writer here (sharded_checkpoint.py),
        # at the pace of the writer's disk
        self.checkpoint_group = dist.new_group(backend="gloo", timeout=CHECKPOINT_WAIT) if self.world > 1 else None

    def owns(self, name: str) -> bool:
        return self.owner[name] == self.rank

    def _by_owner(self, names: list[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for name in names:
            groups.setdefault(self.owner[name], []).append(name)
        return groups

    def broadcast_weights(self, names: list[str], local, shapes: dict[str, torch.Size],
                          dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """name -> weight on every system; ``local(name)`` gives it on its owner. One flat
        broadcast per owner and stage."""
        if self.world == 1:
            return {name: local(name) for name in names}
        out = {}
        for owner, group in self._by_owner(names).items():
            if owner == self.rank:
                flat = torch.cat([local(n).reshape(-1) for n in group])
            else:
                flat = torch.empty(sum(shapes[n].numel() for n in group), dtype=dtype)
            dist.broadcast(flat, src=owner, group=self._stream_group)
            out.update(_split(flat, group, shapes))
        return out

    def reduce_gradients(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum each gradient over all systems onto its owner; returns the ones this system owns."""
        if self.world == 1:
            return grads
        mine = {}
        for owner, group in self._by_owner(list(grads)).items():
            flat = torch.cat([grads[n].reshape(-1) for n in group])
            dist.reduce(flat, dst=owner)
            if owner == self.rank:
                mine.update(_split(flat, group, {n: grads[n].shape for n in group}))
        return mine

    def global_norms(self, local: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per-tensor gradient norms of every parameter, in model order, on every system.

        Each entry has exactly one non-zero contribution (its owner's), so the all-reduced
        values are bit-identical to the owner's norms."""
        if self.world == 1:
            return [local[n] for n in self.order if n in local]
        # row 0: norms, row 1: which parameters have a gradient at all (as the resident backend,
        # parameters without one are left out of the global norm)
        table = torch.zeros(2, len(self.order), dtype=torch.float32)
        for i, name in enumerate(self.order):
            if name in local:
                table[0, i], table[1, i] = local[name], 1.0
        dist.all_reduce(table)
        return [table[0, i] for i in range(len(self.order)) if table[1, i] > 0]

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        total = torch.tensor(value, dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)

    def gather(self, local: dict) -> list[dict]:
        """Every system's ``local``, on every system (small values, or a RAM MemoryX's state: a
        disk MemoryX checkpoint streams its tensors instead, see sharded_checkpoint.py)."""
        if self.world == 1:
            return [local]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, local)
        return gathered


def _split(flat: torch.Tensor, names: list[str], shapes) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in names:
        n = shapes[name].numel()
        out[name] = flat[offset:offset + n].view(shapes[name])
        offset += n
    return out
