"""The backend contract: how one optimizer step or one eval batch is executed.

The Trainer owns the loop and hands a backend the micro-batches of one global step; the backend
owns devices, precision, parallelism and the optimizer update. Models never see a backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

from modelzoo.config import OptimizerConfig
from modelzoo.models.base import StagedModel
# precision lives in backends/precision.py; the precision tests still read these two here
from modelzoo.backends.precision import autocast, precision_on  # noqa: F401


class Backend(ABC):
    @abstractmethod
    def setup(self, model: StagedModel, optimizer_cfg: OptimizerConfig | None, sparsity=None) -> None:
        """Take ownership of the model (and build the optimizer when training). ``sparsity``
        (params.sparsity, training only) masks weights through training.sparsity.Sparsifier;
        train_step then also returns its scalars."""

    @abstractmethod
    def train_step(self, micro_batches: list[dict], lr: float) -> dict[str, float]:
        """Forward/backward over the micro-batches, one optimizer update. Returns loss, grad_norm and
        overflow. An update whose gradient norm is not finite is never applied (the trainer then
        stops or skips the batch); overflow=True says it was an fp16 loss-scale overflow, already
        handled by lowering the scale."""

    @abstractmethod
    def eval_step(self, batch: dict) -> dict[str, float]:
        """Returns loss_sum, tokens and correct (summed over labelled positions)."""

    @abstractmethod
    def state_dict(self) -> dict:
        """{'model': name -> fp32 tensor, 'optimizer': state keyed by parameter name}."""

    @abstractmethod
    def load_state_dict(self, state: dict, states: set[str]) -> None:
        """Load 'model' and/or 'optimizer' (as listed in states) from a state_dict()."""

    def build_model(self, build, model_cfg) -> StagedModel:
        """The model to hand to setup(), from ``build(model_cfg)``; a backend may build it where
        its weights will live (CSX: on the meta device, initialised into MemoryX)."""
        return build(model_cfg)

    def describe(self) -> str:
        return type(self).__name__

    def plan(self, model: StagedModel, params, ranks: int) -> str | None:
        """What ``--compile_only`` prints: the memory the run needs where it runs, from shapes alone
        (``model`` is on the meta device); raises ConfigError when it cannot fit."""
        return None

    # ------------------------------------------------------------ lifecycle

    _closed = False

    def close(self, failed: bool = False) -> None:
        """Release what the backend holds: its threads, its files (CSX disk MemoryX); the process
        group is the run's (Trainer.from_params joins it, and releases it after this). Idempotent;
        the Trainer calls it on success, on error and on SIGTERM/SIGINT. ``failed``: the run is
        ending on an exception, so nothing may wait on the other ranks (they may be gone, or stuck
        in a collective with this one's threads); otherwise work they wait for is finished first."""
        if self._closed:
            return
        self._closed = True
        self._release(failed)

    def _release(self, failed: bool) -> None:
        """What a backend holds (close() calls it once)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def frozen_note(model: StagedModel | None) -> str:
    """What trains when some weights are frozen (LoRA), for describe(); '' when all train."""
    unique = list({id(p): p for p in model.parameters()}.values()) if model is not None else []
    trained = sum(p.numel() for p in unique if p.requires_grad)
    total = sum(p.numel() for p in unique)
    return f", training {trained:,} of {total:,} parameters (the rest frozen)" if trained < total else ""


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def labelled_tokens(micro_batches: list[dict]) -> list[int]:
    return [int((mb["labels"] != -100).sum()) for mb in micro_batches]


def loss_weights(micro_batches: list[dict]) -> list[float]:
    """Weight of each micro-batch's mean loss so that their weighted sum is the token mean of the
    whole global batch, across all ranks. That makes N ranks x M micro-batches compute exactly
    the loss (and gradient) of one big batch, however padding is spread."""
    counts = labelled_tokens(micro_batches)
    total = torch.tensor(float(sum(counts)))
    _, world = rank_and_world()
    if world > 1:
        dist.all_reduce(total)
    total = max(float(total), 1.0)
    return [c / total for c in counts]


class Recomputed(torch.nn.Module):
    """A StagedModel run stage by stage with every stage but the head recomputed in backward
    (activation checkpointing): only each stage's input is kept through the forward pass. The RNG
    state is restored for the recompute, so dropout masks equal the first pass's."""

    def __init__(self, model: StagedModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        from torch.utils.checkpoint import checkpoint
        if not torch.is_grad_enabled():  # evaluation (FSDP evaluates through its root, this)
            return self.model.forward(batch)
        stages = self.model.stages()
        hidden = None
        for stage in stages[:-1]:
            hidden = checkpoint(stage, hidden, batch, use_reentrant=False, preserve_rng_state=True)
        return stages[-1](hidden, batch)


@torch.no_grad()
def token_metrics(out: dict, labels: torch.Tensor) -> dict[str, float]:
    valid = labels != -100
    tokens = int(valid.sum())
    correct = int(((out["logits"].argmax(-1) == labels) & valid).sum())
    loss_sum = float(out["loss"]) * tokens if tokens else 0.0  # a batch of filler rows has no loss (NaN)
    return {"loss_sum": loss_sum, "tokens": tokens, "correct": correct}
