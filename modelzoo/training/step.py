"""One optimizer step, shared by every backend: unscale -> mask -> global norm -> finite check ->
clip -> step -> re-mask.

Backends differ only in where the tensors live and when they are complete, so the step comes
in three parts they call at their own pace:

1. ``finish_gradients``: once gradients are complete (summed over micro-batches and ranks),
   undo the fp16 loss scale, zero the gradients of pruned weights (sparsity) and return each
   gradient's norm. The resident backends call it once for all their gradients; MemoryX per
   tensor as its gradient arrives from the wafer.
2. ``decide``: the global norm from every gradient's norm (``global_norm`` combines them over
   ranks: FSDP's shards, CSX systems' stages), the finite check and the loss scale's update; an
   update whose norm is not finite is never applied.
3. ``update``: clip with the global norm, the optimizer's step, re-mask (and, on a mask-update
   step, new masks); MemoryX calls it per stage, loaded from its store.

``__call__`` runs all three for tensors that are all at hand (DDP, FSDP, one device). The
arithmetic is torch's ``clip_grad_norm_`` split in its halves: per-tensor norms with
``_foreach_norm``, their vector norm, and the clamped coefficient ``max_norm / (norm + 1e-6)``,
so every backend computes the same numbers.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from modelzoo.config import OptimizerConfig
from modelzoo.training import optim
from modelzoo.training.loss_scale import DynamicLossScaler
from modelzoo.training.sparsity import Sparsifier

GlobalNorm = Callable[[list[torch.Tensor]], torch.Tensor]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor, sharing its storage; a plain tensor as is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def total_norm(norms: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients from their per-tensor norms (as ``get_total_norm`` stacks them)."""
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


@torch.no_grad()
def clip_(grads: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients by min(1, max_norm / (norm + 1e-6)), as ``clip_grads_with_norm_``."""
    if grads:
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coefficient.to(grads[0].device))


class OptimizerStep:
    def __init__(self, optimizer: torch.optim.Optimizer | None, cfg: OptimizerConfig,
                 loss_scaler: DynamicLossScaler | None = None, sparsity: Sparsifier | None = None,
                 global_norm: GlobalNorm = total_norm):
        self.optimizer = optimizer
        self.max_norm = cfg.max_gradient_norm
        self.loss_scaler = loss_scaler
        self.sparsity = sparsity
        self.global_norm = global_norm

    def modifies(self, name: str) -> bool:
        """Whether finish_gradients changes the gradient of ``name`` (a store must write it back)."""
        return self.loss_scaler is not None or (self.sparsity is not None and self.sparsity.is_sparse(name))

    @torch.no_grad()
    def finish_gradients(self, named_grads: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Unscale and mask complete gradients in place; their norms, in the same order."""
        grads = [g for _, g in named_grads]
        if not grads:
            return []
        if self.loss_scaler is not None:
            self.loss_scaler.unscale_grads(grads)
        if self.sparsity is not None:  # before the norm: pruned weights are not parameters
            for name, grad in named_grads:
                self.sparsity.mask_gradient(name, grad)
        return list(torch._foreach_norm(grads))

    def decide(self, norms: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """(global norm, whether the update applies). Every rank must reach the same decision:
        ``global_norm`` returns the same value everywhere (an inf anywhere is an inf everywhere)."""
        norm = self.global_norm(norms)
        value = float(norm)
        return norm, self.loss_scaler.update(value) if self.loss_scaler is not None else math.isfinite(value)

    @torch.no_grad()
    def update(self, named_params: Iterable[tuple[str, torch.Tensor]], lr: float, norm: torch.Tensor) -> None:
        """Clip, step and re-mask ``named_params`` (those without a gradient are left to the
        optimizer, which skips them, and only re-masked)."""
        named_params = list(named_params)
        if self.max_norm is not None:
            clip_([local(p.grad) for _, p in named_params if p.grad is not None], self.max_norm, norm)
        optim.set_learning_rate(self.optimizer, lr)
        self.optimizer.step()
        if self.sparsity is not None:
            for name, param in named_params:
                self.sparsity.update(name, local(param.data), self.optimizer.state.get(param, {}))

    def end(self, applied: bool) -> dict[str, float]:
        """After the update (applied or not): the sparsity schedule advances on applied ones."""
        return self.sparsity.end_step() if applied and self.sparsity is not None else {}

    def __call__(self, named_params: Iterable[tuple[str, torch.Tensor]], lr: float) -> dict[str, float]:
        """The whole step on parameters whose gradients are complete and at hand; gradients are
        dropped after. Returns grad_norm, overflow and the sparsity scalars."""
        named_params = list(named_params)
        norms = self.finish_gradients([(n, local(p.grad)) for n, p in named_params if p.grad is not None])
        norm, apply = self.decide(norms)
        # read before the update is queued: decide has waited for the norm already, so on a GPU
        # this waits for nothing, where after the update it would wait for the whole optimizer step
        grad_norm = float(norm)
        if apply:
            self.update(named_params, lr, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, "overflow": self.loss_scaler is not None and not apply, **self.end(apply)}
