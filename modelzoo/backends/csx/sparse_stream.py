"""Sparse weight streaming: a masked weight travels from MemoryX to the wafer as its kept values
(in the compute dtype) plus a 1-bit occupancy map of where they go, and the wafer expands it to
the dense tensor its stage computes with. At density d a bf16 weight costs 2d + 1/8 bytes per
entry instead of 2 (fp32: 4d + 1/8 instead of 4): the map beats 32-bit indices above d = 1/32.

The masks are those of ``training.sparsity``; this module only moves bytes and counts them, and
``plan_lines`` adds dense vs sparse streaming to the ``--compile_only`` plan. Gradients stream
out dense: RigL ranks regrowth by the dense gradient, and MemoryX masks them on arrival.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from modelzoo.backends.csx.plan import Plan, size_text
from modelzoo.backends.csx.wafer import Wafer
from modelzoo.models.base import StagedModel
from modelzoo.training.sparsity import Sparsifier, kept


@dataclass
class Compressed:
    values: torch.Tensor  # the kept entries, row-major order
    occupancy: np.ndarray  # packed bits, one per entry of the dense tensor
    shape: torch.Size

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.occupancy.nbytes


def compress(dense: torch.Tensor, mask: torch.Tensor) -> Compressed:
    flat = mask.reshape(-1)
    return Compressed(dense.reshape(-1)[flat], np.packbits(flat.numpy()), dense.shape)


def expand(payload: Compressed) -> torch.Tensor:
    n = math.prod(payload.shape)
    where = torch.from_numpy(np.unpackbits(payload.occupancy, count=n).view(np.bool_))
    dense = torch.zeros(n, dtype=payload.values.dtype)
    dense[where] = payload.values
    return dense.view(payload.shape)


def sparse_bytes(numel: int, density: float, element_size: int) -> int:
    return kept(density, numel) * element_size + math.ceil(numel / 8)


class SparseStream:
    """Wraps MemoryX's weight read so masked weights cross to the wafer compressed; counts the
    bytes that crossed (read from the main thread between steps, written by the prefetch thread)."""

    def __init__(self, sparsity: Sparsifier):
        self.sparsity = sparsity
        self.bytes_in = 0

    def wrap(self, read: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
        def streamed(name: str) -> torch.Tensor:
            dense = read(name)
            mask = self.sparsity.masks.get(name)
            if mask is None:
                self.bytes_in += dense.numel() * dense.element_size()
                return dense
            payload = compress(dense, mask)
            self.bytes_in += payload.nbytes
            return expand(payload)
        return streamed


def sum_over_systems(counts: torch.Tensor) -> torch.Tensor:
    """Each system holds the masks of the weights it owns: realised densities need all of them."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return counts


@dataclass
class StreamedBytes:
    """Weight bytes per stage (one crossing) and per step per system, dense vs sparse."""
    dense_stages: list[int]
    sparse_stages: list[int]
    dense_step: int
    sparse_step: int


def streamed_bytes(plan: Plan, model: StagedModel, sparsity: Sparsifier, training: bool) -> StreamedBytes:
    """At the target densities (gmp reaches them at end_step)."""
    size = torch.empty(0, dtype=plan.compute_dtype).element_size()
    names = {id(p): n for n, p in model.named_parameters()}
    dense, sparse = [], []
    for stage in model.stages():
        d = s = 0
        for p in stage.parameters():
            group = sparsity.group_of.get(names[id(p)])
            d += p.numel() * size
            s += sparse_bytes(p.numel(), group.density, size) if group else p.numel() * size
        dense.append(d)
        sparse.append(s)
    order = Wafer.train_order(len(dense)) if training else range(len(dense))
    return StreamedBytes(dense, sparse, plan.micro_batches * sum(dense[i] for i in order),
                         plan.micro_batches * sum(sparse[i] for i in order))


def plan_lines(plan: Plan, model: StagedModel, sparsity: Sparsifier, training: bool) -> str:
    """The --compile_only plan's sparse part: dense vs sparse weight bytes per stage and step."""
    b = streamed_bytes(plan, model, sparsity, training)
    dtype = str(plan.compute_dtype).removeprefix("torch.")
    lines = [f"sparse streaming ({sparsity.describe()}): a masked weight streams as its kept {dtype} values "
             f"+ a 1-bit occupancy map",
             f"  {'stage':<24}{'dense weights':>15}{'sparse weights':>16}"]
    for cost, d, s in zip(plan.stages, b.dense_stages, b.sparse_stages):
        lines.append(f"  {cost.label:<24}{size_text(d):>15}{size_text(s):>16}")
    lines.append(f"weights streamed per step per system: dense {size_text(b.dense_step)}, sparse {size_text(b.sparse_step)} "
                 f"({b.sparse_step / max(b.dense_step, 1):.2f}x); gradients out stay dense")
    return "\n".join(lines)
