"""The compile-time plan: what each stage needs on the wafer and what MemoryX holds.

Every figure comes from shapes alone: stages run on fake CPU tensors (``FakeTensorMode``: CPU
kernel choices, no data, no allocation), so the plan of a 25B-parameter preset built on the meta
device takes seconds. Activation memory is what autograd saves while a stage is recomputed for
its backward (counted with ``saved_tensors_hooks``), which is exactly what the wafer must hold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.func import functional_call
from torch._subclasses.fake_tensor import FakeTensorMode

from modelzoo.backends.precision import autocast
from modelzoo.config import OptimizerConfig
from modelzoo.errors import ConfigError
from modelzoo.models import CLASSIFY, objective_of
from modelzoo.models.base import StagedModel

GiB = 2 ** 30


@dataclass
class StageCost:
    label: str
    weight_bytes: int  # streamed in, compute dtype
    output_bytes: int  # boundary activation it hands to the next stage
    saved_bytes: int  # activations autograd keeps while its backward runs
    peak_bytes: int = 0
    trained_bytes: int = 0  # of weight_bytes, the weights that get a gradient (LoRA: the adapters only)


@dataclass
class Plan:
    stages: list[StageCost]
    micro_batch: tuple[int, int]
    micro_batches: int
    compute_dtype: torch.dtype
    prefetch_depth: int
    systems: int
    boundary_bytes: int  # all boundary activations of a micro-batch, kept for the backward pass
    memoryx_bytes: int
    state_tensors: int  # optimizer state tensors per parameter
    streamed_in: int  # weight bytes streamed per step per system
    streamed_out: int  # gradient bytes streamed per step per system
    keep_activations: bool = False  # stages keep their autograd activations until their backward
    activations: str = ""  # which of the two and why, for the run log and --compile_only
    frozen: int = 0  # parameters that never train (LoRA's base weights): no gradient, no optimizer state

    @property
    def peak(self) -> StageCost:
        return max(self.stages, key=lambda s: s.peak_bytes)


def optimizer_state_tensors(cfg: OptimizerConfig | None) -> int:
    """Full-size state tensors the configured optimizer keeps per parameter (Adam: 2)."""
    if cfg is None:
        return 0
    from modelzoo.training import optim
    probe = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = optim.build_optimizer([("probe", probe)], cfg)
    probe.grad = torch.zeros(2, 2)
    optimizer.step()
    return sum(1 for v in optimizer.state[probe].values() if torch.is_tensor(v) and v.ndim > 0)


def make_plan(model: StagedModel, micro_batch: tuple[int, int], micro_batches: int, prefetch_depth: int,
              systems: int, optimizer_cfg: OptimizerConfig | None, training: bool = True,
              keep_activations: bool | str = False, wafer_memory_gb: float | None = None,
              device_memory: tuple[str, float] | None = None) -> Plan:
    """The plan; ``keep_activations`` "auto" keeps activations when the plan that keeps them fits
    ``wafer_memory_gb`` and ``device_memory`` ((name, GiB) of the device the wafer computes on, e.g.
    the host's RAM for a CPU wafer, when known) and recomputes each stage in backward otherwise;
    true / false force either (check_fits then says whether the chosen plan fits at all)."""
    costs = stage_costs(model, micro_batch, model.config.compute_dtype, training)
    assemble = lambda keep: _assemble(model, [replace(c) for c in costs], micro_batch, micro_batches,  # noqa: E731
                                      prefetch_depth, systems, optimizer_cfg, training, keep)
    if not training:
        return assemble(False)
    if keep_activations != "auto":
        plan = assemble(bool(keep_activations))
        plan.activations = (f"activations: {_KEPT if plan.keep_activations else _RECOMPUTED} "
                            f"(runconfig.csx.keep_activations: {str(plan.keep_activations).lower()})")
        return plan
    if wafer_memory_gb is None:
        raise ValueError("keep_activations='auto' decides against wafer_memory_gb: pass it")
    limits = [(wafer_memory_gb, f"the wafer's {wafer_memory_gb:g} GiB")]
    if device_memory is not None and device_memory[1] < wafer_memory_gb:
        limits.append((device_memory[1], f"the {device_memory[1]:.1f} GiB of {device_memory[0]} the wafer runs in"))
    kept = assemble(True)
    need = size_text(kept.peak.peak_bytes)
    over = [where for gb, where in limits if kept.peak.peak_bytes > gb * GiB]
    if not over:
        kept.activations = f"activations: {_KEPT} (auto: the plan that keeps them needs {need} of {limits[-1][1]})"
        return kept
    plan = assemble(False)
    plan.activations = f"activations: {_RECOMPUTED} (auto: keeping them would need {need} of {over[0]})"
    return plan


_KEPT = "kept on the wafer between forward and backward"
_RECOMPUTED = "recomputed in backward from each stage's input"


def _assemble(model: StagedModel, costs: list[StageCost], micro_batch: tuple[int, int], micro_batches: int,
              prefetch_depth: int, systems: int, optimizer_cfg: OptimizerConfig | None, training: bool,
              keep_activations: bool) -> Plan:
    n = len(costs)
    boundary = sum(c.output_bytes for c in costs[:-1])
    # keep_activations: every stage but the last holds what autograd saved until its backward
    kept = sum(c.saved_bytes for c in costs[:-1]) if (keep_activations and training) else 0
    for i, c in enumerate(costs):
        ahead = sum(costs[j % n].weight_bytes for j in range(i + 1, i + 1 + prefetch_depth))
        grads = c.trained_bytes if training else 0
        grad_in = costs[i - 1].output_bytes if (training and i > 0) else 0
        own_saved = c.saved_bytes if (not kept or i == n - 1) else 0  # else already counted in kept
        c.peak_bytes = boundary + kept + c.weight_bytes + ahead + grads + own_saved + c.output_bytes + grad_in
    unique = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # frozen: no gradient, no state
    states = optimizer_state_tensors(optimizer_cfg) if training else 0
    memoryx = 4 * (unique + (trained * (1 + states) if training else 0))
    weights = sum(c.weight_bytes for c in costs)
    streamed_in = micro_batches * (weights + (weights - costs[-1].weight_bytes if training else 0))
    streamed_out = micro_batches * sum(c.trained_bytes for c in costs) if training else 0
    return Plan(costs, micro_batch, micro_batches, model.config.compute_dtype, prefetch_depth, systems, boundary,
                memoryx, states, streamed_in, streamed_out, keep_activations and training, frozen=unique - trained)


def stage_costs(model: StagedModel, micro_batch: tuple[int, int], dtype: torch.dtype,
                 training: bool) -> list[StageCost]:
    costs = []
    # fake CPU tensors even when called under torch.device("meta"): meta has no flash attention,
    # and its math kernel would count an L x L attention matrix per head that the real run never keeps
    with torch.device("cpu"), FakeTensorMode() as mode:
        b, t = micro_batch
        # Full (unpadded) windows: no attention mask, as models skip it when nothing is padded,
        # and fake tensors cannot answer that data-dependent question.
        # A sequence classifier has one label per window, a language model one per token.
        per_sequence = objective_of(model.config) == CLASSIFY
        batch = {"input_ids": torch.zeros(b, t, dtype=torch.long),
                 "labels": torch.zeros((b,) if per_sequence else (b, t), dtype=torch.long)}
        hidden = None
        for i, stage in enumerate(model.stages()):
            weights = {n: torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype,
                                      requires_grad=training and p.requires_grad)
                       for n, p in stage.named_parameters()}
            bound = dict(weights)
            bound.update({n: torch.empty(x.shape, dtype=x.dtype) for n, x in stage.named_buffers()})
            if torch.is_tensor(hidden) and training:
                hidden = hidden.detach().requires_grad_(hidden.is_floating_point())
            excluded = {id(w) for w in weights.values()} | ({id(hidden)} if torch.is_tensor(hidden) else set())
            saved: dict[int, int] = {}

            def pack(x):
                base = x._base if x._base is not None else x
                if id(base) not in excluded:
                    saved[id(base)] = base.numel() * base.element_size()
                return x

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.set_grad_enabled(training), \
                    autocast("cpu", model.config):
                out = functional_call(stage, bound, (hidden, batch))
            weight_bytes = sum(w.numel() * w.element_size() for w in weights.values())
            trained_bytes = sum(w.numel() * w.element_size() for w in weights.values() if w.requires_grad)
            output_bytes = out.numel() * out.element_size() if torch.is_tensor(out) else 0
            costs.append(StageCost(f"{i} {type(stage).__name__}", weight_bytes, output_bytes, sum(saved.values()),
                                   trained_bytes=trained_bytes))
            hidden = out
    del mode
    return costs


def check_fits(plan: Plan, wafer_memory_gb: float) -> None:
    peak = plan.peak
    if peak.peak_bytes > wafer_memory_gb * GiB:
        raise ConfigError(
            f"runconfig.csx.wafer_memory_gb: stage {peak.label} needs {peak.peak_bytes / GiB:.2f} GiB of wafer "
            f"memory (weights {peak.weight_bytes / GiB:.2f} GiB, activations {peak.saved_bytes / GiB:.2f} GiB, "
            f"boundary activations {plan.boundary_bytes / GiB:.2f} GiB at micro-batch {plan.micro_batch[0]} x "
            f"{plan.micro_batch[1]}) but the wafer has {wafer_memory_gb:g} GiB; use a smaller batch or more "
            f"grad_accum_steps, shorter sequences, or a larger wafer_memory_gb")


def size_text(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_plan(plan: Plan, wafer_memory_gb: float, memoryx_where: str) -> str:
    b, t = plan.micro_batch
    dtype = str(plan.compute_dtype).removeprefix("torch.")
    lines = [f"CSX plan: {len(plan.stages)} stages, micro-batch {b} x {t} tokens ({plan.micro_batches} per step), "
             f"weights stream in {dtype}, prefetch depth {plan.prefetch_depth}, {plan.systems} system(s)",
             f"  {'stage':<24}{'weights':>12}{'boundary act.':>15}{'saved act.':>13}{'peak wafer':>13}"]
    for c in plan.stages:
        lines.append(f"  {c.label:<24}{size_text(c.weight_bytes):>12}{size_text(c.output_bytes):>15}"
                     f"{size_text(c.saved_bytes):>13}{size_text(c.peak_bytes):>13}")
    peak = plan.peak
    per_system = plan.memoryx_bytes / plan.systems
    lines += [f"peak wafer memory: {size_text(peak.peak_bytes)} at stage {peak.label} "
              f"(of {wafer_memory_gb:g} GiB; all boundary activations: {size_text(plan.boundary_bytes)})",
              f"MemoryX ({memoryx_where}): {size_text(plan.memoryx_bytes)} fp32 (weights, gradients, "
              f"{plan.state_tensors} optimizer state tensor(s) per {'trained ' if plan.frozen else ''}weight"
              f"{f'; {plan.frozen:,} frozen weights have neither' if plan.frozen else ''}), "
              f"~{size_text(int(per_system))} per system",
              f"streamed per step per system: weights in {size_text(plan.streamed_in)}, "
              f"gradients out {size_text(plan.streamed_out)}"]
    if plan.activations:
        lines.append(plan.activations)
    return "\n".join(lines)
