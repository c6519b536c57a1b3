"""Optimizers, learning-rate schedules and gradient clipping, shared by every backend.

The resident backends apply them to the model's parameters; the CSX backend applies the very
same functions to MemoryX's master weights stage by stage, so both follow identical update rules.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from modelzoo.config import OptimizerConfig


EMBEDDINGS = "embeddings."  # every model keeps its token/position/type tables under this name


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to weight matrices only: never to biases or norm gains (1-d), nor to
    embedding tables, whose rows of rare codons would be shrunk toward zero by every step."""
    return param.ndim >= 2 and not name.startswith(EMBEDDINGS)


def param_groups(named_params: Iterable[tuple[str, torch.Tensor]], cfg: OptimizerConfig) -> list[dict]:
    """The parameters that train (frozen ones, e.g. the base weights under LoRA, get no optimizer
    and so no state), with and without weight decay."""
    with_decay, without = [], []
    for name, param in named_params:
        if param.requires_grad:
            (with_decay if decays(name, param) else without).append(param)
    groups = [{"params": with_decay, "weight_decay": cfg.weight_decay},
              {"params": without, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(named_params: Iterable[tuple[str, torch.Tensor]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(named_params, cfg)
    lr = learning_rate_at(0, cfg)
    if cfg.optimizer_type == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, foreach=True)
    adam = torch.optim.AdamW if cfg.optimizer_type == "AdamW" else torch.optim.Adam
    return adam(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def learning_rate_at(step: int, cfg: OptimizerConfig) -> float:
    """The learning rate of update number ``step`` (0-based) under the schedule's phases.

    Phases run one after another; past the last phase's total_iters its end value is held.
    """
    phases = cfg.schedule_phases
    for i, phase in enumerate(phases):
        last = i == len(phases) - 1
        if phase.total_iters is None or step < phase.total_iters or last:
            return _phase_value(phase, step)
        step -= phase.total_iters
    raise AssertionError("unreachable: the last phase always answers")


def _phase_value(phase, step: int) -> float:
    """The rate ``step`` steps into the phase (formulas of the Cerebras Model Zoo's schedulers)."""
    kind = phase.scheduler
    if kind == "Constant":
        return phase.learning_rate
    if kind == "Exponential":
        power = step / phase.decay_steps
        return phase.initial_learning_rate * phase.decay_rate ** (math.floor(power) if phase.staircase else power)
    if kind == "InverseSquareRootDecay":
        return phase.initial_learning_rate * phase.scale / math.sqrt(max(step, phase.warmup_steps))
    if kind == "Step":
        return phase.initial_learning_rate * phase.gamma ** (step // phase.step_size)
    progress = min(step, phase.total_iters) / phase.total_iters
    start, end = phase.initial_learning_rate, phase.end_learning_rate
    if kind == "Linear":
        return start + (end - start) * progress
    if kind == "Polynomial":
        return end + (start - end) * (1.0 - progress) ** phase.power
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_gradients(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Clip the global gradient norm (when max_norm is set) and return the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm else float("inf"), foreach=True))


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """Optimizer state keyed by parameter name instead of position, so any backend can load it.

    ``names`` maps ``id(param)`` to the parameter's name in the model.
    """
    state = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in optimizer.state:
                state[names[id(p)]] = {k: v for k, v in optimizer.state[p].items()}
    return {"type": type(optimizer).__name__, "state": state}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, saved: dict, params: dict[str, torch.Tensor]) -> None:
    if saved.get("type") != type(optimizer).__name__:
        from modelzoo.errors import CheckpointError
        raise CheckpointError(f"checkpoint optimizer is {saved.get('type')}, params ask for {type(optimizer).__name__}; "
                              "use --load_checkpoint_states model to start a fresh optimizer")
    for name, values in saved["state"].items():
        param = params[name]
        if not param.requires_grad:  # frozen here (LoRA), trained where the state was saved
            continue
        optimizer.state[param] = {k: (v.to(param.device) if torch.is_tensor(v) and v.ndim else v)
                                  for k, v in values.items()}
