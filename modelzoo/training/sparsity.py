"""Unstructured weight sparsity, one implementation for every backend.

A ``Sparsifier`` holds a boolean mask per sparse weight (by parameter name) and works on plain
named tensors, their gradients and their optimizer state dicts, so the resident backends call
it with the model's parameters and the CSX backend with MemoryX's master weights. Per optimizer
step ``training.step.OptimizerStep`` (which every backend runs) calls:

1. ``mask_gradient(name, grad)`` once the gradient is complete (after an fp16 unscale, before
   clipping): pruned weights are not parameters, so their gradients count in neither the norm
   nor the optimizer state. RigL first keeps the dense gradient's magnitude, its regrowth score.
2. ``update(name, weight, optimizer_state)`` after the optimizer updated ``name``: on a
   mask-update step the mask changes (and the optimizer state of every weight that was pruned
   or regrown is reset to zero); then the weight is re-masked, so pruned weights stay exactly 0.
3. ``end_step()`` after every applied update: advances the schedule and returns the scalars to
   log (realised density per group, weights moved by the update).

Steps count applied optimizer updates, 1-based: update t is a mask update when the schedule
says so. Random choices (initial masks, SET's regrowth) come from generators seeded by
(seed, parameter name, step), so they do not depend on the global RNG, on which system owns a
weight, or on the order weights are visited: every backend picks the same masks.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from modelzoo.config import SparsityConfig
from modelzoo.errors import ConfigError

log = logging.getLogger("modelzoo")


@dataclass
class Group:
    label: str
    density: float  # the target
    names: list[str] = field(default_factory=list)


def sparse_by_default(name: str, shape) -> bool:
    """Weight matrices are sparse under the top-level density; embeddings, norms and biases are not."""
    return len(shape) >= 2 and not any("embed" in part for part in name.split("."))


def select_groups(cfg: SparsityConfig, named_shapes: Iterable[tuple[str, torch.Size]]) -> list[Group]:
    """Parameters by group: the first group whose pattern matches, else the top-level density for
    weight matrices. A group pattern that selects nothing is a ConfigError (a typo, surely)."""
    named_shapes = list(named_shapes)
    groups = [Group(g.name or f"group{i}", g.density) for i, g in enumerate(cfg.groups)]
    default = Group("default", cfg.density) if cfg.density is not None else None
    for name, shape in named_shapes:
        for group, spec in zip(groups, cfg.groups):
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.params):
                group.names.append(name)
                break
        else:
            if default is not None and sparse_by_default(name, shape):
                default.names.append(name)
    for i, (group, spec) in enumerate(zip(groups, cfg.groups)):
        if not group.names:
            example = next((n for n, s in named_shapes if len(s) >= 2), named_shapes[0][0])
            raise ConfigError(f"sparsity.groups.{i}.params: {spec.params} match no parameter of the model "
                              f"(names look like {example!r})")
    return groups + ([default] if default is not None and default.names else [])


# ---------------------------------------------------------------- schedules

def kept(density: float, numel: int) -> int:
    """Weights a tensor keeps at ``density``: rounded, and never none at all."""
    return min(numel, max(1, round(density * numel)))


def is_update_step(cfg: SparsityConfig, step: int) -> bool:
    """Whether applied update ``step`` (1-based) changes the masks."""
    if cfg.algorithm == "static":
        return False
    if cfg.algorithm == "gmp":
        inside = cfg.start_step < step <= cfg.end_step
        return inside and ((step - cfg.start_step) % cfg.update_frequency == 0 or step == cfg.end_step)
    return step % cfg.update_frequency == 0 and step < cfg.end_step


def drop_fraction_at(cfg: SparsityConfig, step: int) -> float:
    """RigL's cosine decay of the fraction of kept weights moved, to zero at end_step."""
    if step >= cfg.end_step:
        return 0.0
    return cfg.drop_fraction / 2 * (1 + math.cos(math.pi * step / cfg.end_step))


def gmp_density_at(cfg: SparsityConfig, target: float, step: int) -> float:
    """Zhu & Gupta's cubic schedule: dense until start_step, the target from end_step on."""
    progress = min(max((step - cfg.start_step) / (cfg.end_step - cfg.start_step), 0.0), 1.0)
    return target + (1.0 - target) * (1.0 - progress) ** 3


def _generator(seed: int, name: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{step}".encode()))


def _mask_of(indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    mask[indices.to(like.device)] = True
    return mask.view(like.shape)


# ---------------------------------------------------------------- the sparsifier

class Sparsifier:
    def __init__(self, cfg: SparsityConfig, groups: list[Group],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """``reduce`` sums a tensor over ranks that hold different masks (CSX systems each own
        some weights); ranks holding every mask (data parallel) need none."""
        self.cfg = cfg
        self.groups = groups
        self.group_of = {name: g for g in groups for name in g.names}
        self.masks: dict[str, torch.Tensor] = {}
        self.step = 0
        self._scores: dict[str, torch.Tensor] = {}  # RigL: |dense gradient| of this step
        self._moved = {g.label: 0 for g in groups}
        self._report = True  # the first step of a process reports the density it starts from
        self._reduce = reduce or (lambda t: t)

    def describe(self) -> str:
        groups = ", ".join(f"{g.label} {g.density:g} ({len(g.names)} tensors)" for g in self.groups)
        return f"{self.cfg.algorithm} sparsity, density {groups}"

    def is_sparse(self, name: str) -> bool:
        return name in self.masks

    # ------------------------------------------------------------ masks

    def initialize(self, weights: dict[str, torch.Tensor]) -> None:
        """Masks of the sparse weights among ``weights`` (gmp starts dense). Weights unchanged:
        call apply()."""
        for name, weight in weights.items():
            group = self.group_of.get(name)
            if group is None:
                continue
            density = 1.0 if self.cfg.algorithm == "gmp" else group.density
            self.masks[name] = self._initial_mask(name, weight.detach(), density)

    def _initial_mask(self, name: str, weight: torch.Tensor, density: float) -> torch.Tensor:
        k = kept(density, weight.numel())
        if k == weight.numel():
            return torch.ones_like(weight, dtype=torch.bool)
        if self.cfg.init_method == "magnitude":
            indices = torch.topk(weight.abs().reshape(-1), k, sorted=False).indices
        else:
            indices = torch.randperm(weight.numel(), generator=_generator(self.cfg.seed, name, 0))[:k]
        return _mask_of(indices, weight)

    @torch.no_grad()
    def apply(self, weights: dict[str, torch.Tensor]) -> None:
        """Zero the pruned weights, in place."""
        for name, weight in weights.items():
            if name in self.masks:
                weight.mul_(self.masks[name])

    def masked(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of the sparse weights with pruned entries zeroed (the others as they are)."""
        return {name: (w * self.masks[name] if name in self.masks else w) for name, w in weights.items()}

    # ------------------------------------------------------------ per step

    @torch.no_grad()
    def mask_gradient(self, name: str, grad: torch.Tensor) -> None:
        mask = self.masks.get(name)
        if mask is None:
            return
        if self.cfg.algorithm == "rigl" and is_update_step(self.cfg, self.step + 1):
            self._scores[name] = grad.abs()
        grad.mul_(mask)

    @torch.no_grad()
    def update(self, name: str, weight: torch.Tensor, optimizer_state: dict) -> None:
        mask = self.masks.get(name)
        if mask is None:
            return
        step = self.step + 1
        if is_update_step(self.cfg, step):
            new = self._next_mask(name, weight, mask, step)
            survivors = mask & new  # weights and state of everything else start from zero
            for value in optimizer_state.values():
                if torch.is_tensor(value) and value.shape == weight.shape:
                    value.mul_(survivors)
            changed = (new & ~mask) if self.cfg.algorithm != "gmp" else (mask & ~new)
            self._moved[self.group_of[name].label] += int(changed.sum())
            self.masks[name] = mask = new
        weight.mul_(mask)

    def _next_mask(self, name: str, weight: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
        flat_mask, magnitude = mask.reshape(-1), weight.detach().abs().reshape(-1)
        if self.cfg.algorithm == "gmp":
            k = kept(gmp_density_at(self.cfg, self.group_of[name].density, step), mask.numel())
            if k >= int(flat_mask.sum()):
                return mask
            keep = torch.topk(torch.where(flat_mask, magnitude, -1.0), k, sorted=False).indices
            return _mask_of(keep, mask)
        k = int(drop_fraction_at(self.cfg, step) * int(flat_mask.sum()))
        score = self._scores.pop(name, None)
        if k == 0 or (self.cfg.algorithm == "rigl" and score is None):
            return mask
        # drop the k smallest kept weights ...
        drop = torch.topk(torch.where(flat_mask, magnitude, math.inf), k, largest=False, sorted=False).indices
        after = flat_mask.clone()
        after[drop] = False
        # ... and regrow k among all the others (a weight just dropped may come straight back)
        if self.cfg.algorithm == "rigl":
            grow = torch.topk(torch.where(after, -1.0, score.reshape(-1).float()), k, sorted=False).indices
        else:
            candidates = (~after).nonzero().squeeze(1)
            pick = torch.randperm(candidates.numel(), generator=_generator(self.cfg.seed, name, step))[:k]
            grow = candidates[pick.to(candidates.device)]
        after[grow] = True
        return after.view(mask.shape)

    def end_step(self) -> dict[str, float]:
        """Advance the schedule; the scalars to log on a mask update (and a process's first step)."""
        self.step += 1
        self._scores.clear()
        updated = is_update_step(self.cfg, self.step)
        if not (updated or self._report):
            return {}
        self._report = False
        counts = torch.zeros(len(self.groups), 3, dtype=torch.float64)  # kept, total, moved
        for i, group in enumerate(self.groups):
            for name in group.names:
                if name in self.masks:
                    counts[i, 0] += int(self.masks[name].sum())
                    counts[i, 1] += self.masks[name].numel()
            counts[i, 2] = self._moved[group.label]
            self._moved[group.label] = 0
        counts = self._reduce(counts)
        metrics = {}
        for i, group in enumerate(self.groups):
            metrics[f"sparsity/{group.label}/density"] = float(counts[i, 0] / max(counts[i, 1], 1))
            if updated:
                metrics[f"sparsity/{group.label}/moved"] = float(counts[i, 2])
        if updated:
            log.info("step %d: sparsity masks updated: %s", self.step,
                     ", ".join(f"{g.label} density {metrics[f'sparsity/{g.label}/density']:.4f}, "
                               f"{int(metrics[f'sparsity/{g.label}/moved'])} weights moved" for g in self.groups))
        return metrics

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {"algorithm": self.cfg.algorithm, "step": self.step,
                "masks": {name: mask.cpu() for name, mask in self.masks.items()}}

    def load_state_dict(self, saved: dict | None, weights: dict[str, torch.Tensor], with_step: bool) -> None:
        """Masks of ``weights`` from a checkpoint. A weight the checkpoint has no mask for (a dense
        checkpoint, or a group added since) gets a fresh one from the loaded weights, so
        magnitude initialisation prunes the pretrained weights. Weights unchanged: call apply()."""
        saved_masks = (saved or {}).get("masks", {})
        fresh = {}
        for name, weight in weights.items():
            if name not in self.group_of:
                continue
            mask = saved_masks.get(name)
            if mask is not None and tuple(mask.shape) == tuple(weight.shape):
                self.masks[name] = mask.to(device=weight.device, dtype=torch.bool).clone()
            else:
                fresh[name] = weight
        self.initialize(fresh)
        if with_step and saved is not None:
            self.step = int(saved["step"])
        self._report = True


def build_sparsifier(cfg: SparsityConfig | None, named_params: Iterable[tuple[str, torch.Tensor]],
                     reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Sparsifier | None:
    """The sparsifier of a model's parameters (None when cfg is None); masks come from initialize()."""
    if cfg is None:
        return None
    return Sparsifier(cfg, select_groups(cfg, ((n, p.shape) for n, p in named_params)), reduce)


def merge_states(parts: list[dict]) -> dict:
    """One state_dict from those of ranks that each hold some masks (CSX systems)."""
    merged = {**parts[0], "masks": {}}
    for part in parts:
        merged["masks"].update(part["masks"])
    return merged
