"""Fully sharded data parallel on the resident backends (``runconfig.sharding: fsdp``), with
PyTorch's FSDP2 (``fully_shard``): each rank holds 1/N of every parameter, gradient and
optimizer state tensor (a DTensor sharded on dim 0); a stage's parameters are all-gathered just
before it runs and freed after, its gradients reduce-scattered as its backward ends.

- One FSDP unit per stage of ``model.stages()``, then the root (the model, or the activation
  checkpointing wrapper around it). A stage sharing a parameter with another stage (a tied
  embedding and LM head) is left to the root, whose parameters stay gathered through the step.
- Gradients are SUMMED over ranks, as the DDP comm hook does: ``loss_weights`` already weights
  every rank's loss by its share of the global batch (FSDP's default would average).
- Mixed precision: the gathered parameters are in the compute dtype, gradients reduced in fp32,
  master weights and optimizer state fp32 (``MixedPrecisionPolicy``); autocast runs as with DDP.
- Checkpoints keep the one format every backend reads: ``gather`` all-gathers one tensor at a
  time and only the writer keeps a CPU copy; loading gives each rank its chunk of the full
  tensor (``shard_of``), so a run moves between DDP, FSDP, CSX and any number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from modelzoo.models.base import StagedModel


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(tensor, DTensor)


def shared_stages(model: StagedModel) -> set[int]:
    """Indices of the stages that share a parameter with another stage (tied weights)."""
    owners: dict[int, set[int]] = {}
    for i, stage in enumerate(model.stages()):
        for p in stage.parameters():
            owners.setdefault(id(p), set()).add(i)
    return {i for stages in owners.values() if len(stages) > 1 for i in stages}


def shard(model: StagedModel, root: nn.Module, device: torch.device, compute_dtype: torch.dtype | None) -> None:
    """FSDP units: every stage not sharing a parameter, then ``root`` (``model`` or a wrapper of
    it, whatever the training forward calls). Parameters move to ``device`` as they are sharded.
    ``compute_dtype``: mixed precision's (None: fp32 throughout)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype \
        else MixedPrecisionPolicy()
    tied = shared_stages(model)
    for i, stage in enumerate(model.stages()):
        if i not in tied and any(True for _ in stage.parameters()):
            fully_shard(stage, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum, not a mean: see the module docstring
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of ``full`` as the DTensor ``like`` holds it (FSDP shards dim 0 with
    ``torch.chunk``; a rank past the last chunk holds none), on ``like``'s device."""
    (placement,) = like.placements
    mesh = like.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    part = chunks[rank] if rank < len(chunks) else full.narrow(placement.dim, 0, 0)
    return part.to(like.to_local().device)


def sharded_like(value, like: torch.Tensor):
    """A checkpoint's full tensor as a DTensor sharded as ``like`` (0-d and non-tensors as they are)."""
    if not (torch.is_tensor(value) and value.ndim):
        return value
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(shard_of(value, like), like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride())


@torch.no_grad()
def load_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a checkpoint's full tensor (or a DTensor already sharded alike) into ``target``."""
    if not is_sharded(target):
        target.copy_(value)
    elif is_sharded(value):
        target.to_local().copy_(value.to_local())
    else:
        target.to_local().copy_(shard_of(value, target))


@torch.no_grad()
def gather(value, keep: bool):
    """The full tensor of a DTensor (every rank must call it: an all-gather), on the CPU where
    ``keep`` (the checkpoint writer), else None; anything else as it is."""
    if not is_sharded(value):
        return value.detach().cpu() if torch.is_tensor(value) and keep else value
    full = value.detach().full_tensor()
    if hasattr(full, "wait"):  # an AsyncCollectiveTensor: the all-gather may still be running
        full = full.wait()
    return full.cpu() if keep else None


def quiesce() -> None:
    """Before the process group goes: a barrier, during which this thread does not hold the GIL.

    Gloo's worker threads drop a finished collective's tensors after the caller has moved on;
    FSDP's all-gather buffers were made in Python, so letting go of them takes the GIL. A worker
    still waiting for it when the interpreter exits is killed inside C++ and aborts the process
    ("terminate called without an active exception", about one run in ten on 2 CPU ranks)."""
    dist.barrier()


def gather_mask(mask: torch.Tensor, like: torch.Tensor, keep: bool):
    """A sparsity mask of ``like``'s local chunk, whole (bool travels as uint8: gloo has no bool)."""
    from torch.distributed.tensor import DTensor
    sharded = DTensor.from_local(mask.to(torch.uint8), like.device_mesh, like.placements, shape=like.shape,
                                 stride=like.stride())
    full = gather(sharded, keep)
    return full.bool() if full is not None else None


def total_norm_over_ranks(norms: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The global gradient norm from the norms of this rank's shards: sqrt of the all-reduced
    sum of squares (an inf or NaN anywhere is one everywhere, so every rank decides alike)."""
    squares = torch.stack([n.float().square() for n in norms]).sum() if norms \
        else torch.zeros((), device=device)
    dist.all_reduce(squares)
    return squares.sqrt()
