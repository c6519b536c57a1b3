"""The memory plan of the resident backends (CPU, GPU): per rank, the bytes of parameters,
gradients, optimizer state and activations under the chosen sharding and activation
checkpointing, and whether they fit the device, from shapes alone (no GPU needed).

Activations are what autograd saves, counted per stage on fake tensors exactly as the CSX plan
counts them (``csx.plan.stage_costs``): without checkpointing every stage's saved tensors live
until its backward; with it only each stage's input is kept and one stage is recomputed at a time.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from modelzoo.backends.csx.plan import GiB, optimizer_state_tensors, size_text, stage_costs
from modelzoo.backends.fsdp import shared_stages
from modelzoo.config import OptimizerConfig
from modelzoo.errors import ConfigError
from modelzoo.models.base import StagedModel

SHARDINGS = ("none", "fsdp")  # runconfig.sharding values the resident backends build
FITS = 0.9  # of the device's memory: the rest is for the CUDA context and the allocator's slack


@dataclass
class MemoryPlan:
    ranks: int
    sharding: str
    activation_checkpointing: bool
    micro_batch: tuple[int, int]
    parameters: int
    gradients: int
    optimizer: int
    working: int  # low-precision weight copies autocast caches; FSDP: the stage gathered to run
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.working + self.activations + self.logits


def memory_plan(model: StagedModel, micro_batch: tuple[int, int], ranks: int, optimizer_cfg: OptimizerConfig | None,
                sharding: str = "none", activation_checkpointing: bool = False, training: bool = True) -> MemoryPlan:
    """Bytes per rank. Master weights, gradients and optimizer state are fp32 (mixed precision
    computes in its low-precision dtype under autocast, from fp32 weights)."""
    parameters, gradients, optimizer = master_bytes(model, optimizer_cfg, training)
    n = parameters // 4
    shard = ranks if sharding == "fsdp" else 1
    costs = stage_costs(model, micro_batch, model.config.compute_dtype, training)
    compute_bytes = torch.empty(0, dtype=model.config.compute_dtype).element_size()
    if sharding == "fsdp" and ranks > 1:
        # gathered in the compute dtype (and their unsharded gradients when training): the root
        # unit's parameters through the whole step (stages sharing a weight, fsdp.shard) and
        # one other stage's at a time
        stages, tied = model.stages(), shared_stages(model)
        root = sum({id(p): p.numel() for i in tied for p in stages[i].parameters()}.values())
        biggest = max((sum(p.numel() for p in s.parameters()) for i, s in enumerate(stages) if i not in tied),
                      default=0)
        working = (root + biggest) * compute_bytes * (2 if training else 1)
    else:  # autocast keeps a low-precision copy of every weight through the forward pass
        working = n * compute_bytes if model.config.mixed_precision else 0
    if not training:
        activations = max(c.output_bytes for c in costs)
    elif activation_checkpointing:  # stage inputs kept; one stage's activations during its recompute
        activations = sum(c.output_bytes for c in costs[:-1]) + max(c.saved_bytes for c in costs)
    else:
        activations = sum(c.saved_bytes for c in costs)
    b, t = micro_batch
    logits = b * t * model.config.vocab_size * 4 * (2 if training else 1)  # fp32 logits and their gradient
    return MemoryPlan(ranks, sharding, activation_checkpointing, micro_batch, parameters // shard, gradients // shard,
                      optimizer // shard, working, activations, logits)


def master_bytes(model: StagedModel, optimizer_cfg: OptimizerConfig | None, training: bool) -> tuple[int, int, int]:
    """fp32 bytes of the weights, of their gradients and of the optimizer's state: what a resident
    rank keeps unsharded, and what CSX's MemoryX holds. Frozen weights (LoRA's base) have neither."""
    n = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) if training else 0
    states = optimizer_state_tensors(optimizer_cfg) if training else 0
    return n * 4, trained * 4, states * trained * 4


def format_memory_plan(plans: list[MemoryPlan], chosen: MemoryPlan, device: str, device_bytes: int | None) -> str:
    b, t = chosen.micro_batch
    capacity = size_text(device_bytes) if device_bytes else "unknown (set runconfig.device_memory_gb)"
    lines = [f"memory plan per rank: {chosen.ranks} rank(s), micro-batch {b} x {t} tokens, {device} memory {capacity} "
             f"(fits: total within {FITS:.0%} of it)",
             f"  {'sharding':<10}{'act. ckpt':<11}{'params':>11}{'grads':>11}{'optimizer':>11}{'working':>11}"
             f"{'activations':>13}{'logits':>11}{'total':>11}  fits"]
    for p in plans:
        fits = "?" if not device_bytes else ("yes" if p.total <= FITS * device_bytes else "no")
        mark = "  <- params" if p is chosen else ""
        lines.append(f"  {p.sharding:<10}{'on' if p.activation_checkpointing else 'off':<11}"
                     f"{size_text(p.parameters):>11}{size_text(p.gradients):>11}{size_text(p.optimizer):>11}"
                     f"{size_text(p.working):>11}{size_text(p.activations):>13}{size_text(p.logits):>11}"
                     f"{size_text(p.total):>11}  {fits}{mark}")
    return "\n".join(lines)


def device_memory_bytes(device: torch.device, configured_gb: float | None) -> int | None:
    """runconfig.device_memory_gb, else the visible device's memory (GPU) or RAM (CPU)."""
    if configured_gb is not None:
        return int(configured_gb * GiB)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        import os
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def resident_plan_text(model: StagedModel, params, ranks: int, device: torch.device) -> str:
    """The memory plan for ``run.py CPU/GPU --compile_only``: the configured settings and the
    alternatives, per rank, against the device's memory."""
    run = params.runconfig
    training = run.mode in ("train", "train_and_eval")
    section = params.train_input if training else params.eval_input
    accum = params.optimizer.grad_accum_steps if training else 1
    micro = (max(1, section.batch_size // ranks // accum), section.max_seq_length)
    sharding = run.sharding
    plans = [memory_plan(model, micro, ranks, params.optimizer, s, c, training)
             for s in SHARDINGS for c in (False, True)]
    chosen = next(p for p in plans if (p.sharding, p.activation_checkpointing) == (sharding, run.activation_checkpointing))
    device_bytes = device_memory_bytes(device, run.device_memory_gb)
    text = format_memory_plan(plans, chosen, device.type, device_bytes)
    if device_bytes and chosen.total > FITS * device_bytes:
        fitting = [f"sharding {p.sharding}, activation_checkpointing {str(p.activation_checkpointing).lower()}"
                   for p in plans if p.total <= FITS * device_bytes]
        text += ("\ndoes not fit with these params" +
                 (f"; these settings fit: {'; '.join(fitting)}" if fitting else
                  "; no setting fits: use a smaller batch or more grad_accum_steps, shorter sequences, more ranks, "
                  "or the CSX backend (weights streamed from host memory)"))
    return text


def check_memoryx_fits(params, source: str, systems_here: int) -> None:
    """CSX, before anything is built or written: the MemoryX of the ``systems_here`` systems this
    host runs must fit it, in RAM (within FITS of the host's RAM, as a resident plan must fit its
    device) or on disk (the free space of memoryx_dir's filesystem); else one line naming the
    figure. MemoryX is sharded by stage, so a host's share is counted as an even split."""
    from modelzoo.models import build_model
    run, csx = params.runconfig, params.runconfig.csx
    training = run.mode in ("train", "train_and_eval")
    with torch.device("meta"):  # shapes only
        model = build_model(params.model)
    need = sum(master_bytes(model, params.optimizer if training else None, training)) * systems_here // run.num_csx
    held = f"MemoryX of {systems_here} system(s) on this host" if systems_here > 1 else "MemoryX"
    if csx.memoryx == "ram":
        ram = device_memory_bytes(torch.device("cpu"), None)
        if ram and need > FITS * ram:
            raise ConfigError(f"{source}: runconfig.csx.memoryx: ram: the {held} needs {size_text(need)} (fp32 "
                              f"weights, gradients, optimizer state) but this host has {size_text(ram)} of RAM "
                              f"(fits: within {FITS:.0%} of it); use runconfig.csx.memoryx: disk (files under "
                              f"runconfig.csx.memoryx_dir)")
        return
    where = Path(csx.memoryx_dir or Path(run.model_dir) / "memoryx").absolute()
    while not where.exists() and where != where.parent:  # created at the run's start: its nearest existing parent
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # an unusable memoryx_dir is the backend's own one-line refusal
    if need > free:
        key = "runconfig.csx.memoryx_dir" + ("" if csx.memoryx_dir else " (not set: model_dir/memoryx)")
        raise ConfigError(f"{source}: {key}: disk: the {held} needs {size_text(need)} (fp32 weights, gradients, "
                          f"optimizer state) but the filesystem of {where} has {size_text(free)} free; free space "
                          f"there or point runconfig.csx.memoryx_dir at a larger disk")
