"""LoRA (Hu et al. 2021): a frozen Linear layer W plus a trained low-rank update, y = W x + b +
(alpha / r) B A dropout(x), with A (r x in) drawn as nn.Linear's weights are and B (out x r) zero,
so training starts from the frozen model exactly.

Models know nothing of it: ``add_adapters`` swaps the target Linear layers of a built model for
``LoRALinear`` layers that keep the very same weight and bias Parameters (same names, same
objects, so a checkpoint of the model without adapters loads, and a deferred build's recorded
initialisation still finds them) and adds ``lora_A`` / ``lora_B`` beside them; every other
parameter gets ``requires_grad = False``. Backends then train what requires a gradient and no
more: no gradient, no optimizer state for the frozen weights.

``merged_state`` folds the adapters of a checkpoint's state into its weights,
W + (alpha / r) B A, giving the state of the same model without adapters.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn
import torch.nn.functional as F

from modelzoo.config import LoraConfig
from modelzoo.errors import CheckpointError, ConfigError

ADAPTERS = ("lora_A", "lora_B")  # the names LoRALinear adds beside weight and bias


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the base layer's own Parameters
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's weight (and the paper's code)
        nn.init.zeros_(self.lora_B)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the scale on the rank-r side, and B's product added by the matmul itself (addmm's beta):
        # the adapters cost two thin matmuls and nothing on the full-width output
        low = F.linear(self.dropout(x), self.lora_A) * self.scaling
        frozen = F.linear(x, self.weight, self.bias)
        out = torch.addmm(frozen.reshape(-1, self.out_features), low.reshape(-1, low.shape[-1]), self.lora_B.t())
        return out.view(frozen.shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_A.shape[0]}, " \
               f"scaling={self.scaling:g}"


def selects(target: str, name: str) -> bool:
    """Whether ``target`` (model.lora.targets) names the module ``name``."""
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def add_adapters(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Adapters on ``model``'s target Linear layers (in place); every parameter but the adapters
    and those ``cfg.trainable`` names is frozen. A target selecting no Linear layer is refused in
    one line naming the layers there are."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: dict[str, nn.Linear] = {}
    for target in cfg.targets:
        found = {name: m for name, m in linears.items() if selects(target, name)}
        if not found:
            kinds = sorted({name.split(".", 2)[-1] if name.startswith("blocks.") else name for name in linears})
            raise ConfigError(f"model.lora.targets: {target!r} selects no Linear layer of this model; its Linear "
                              f"layers are {', '.join(kinds)} (in every block: blocks.N.<name>)")
        chosen.update(found)
    for name, linear in chosen.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                LoRALinear(linear, cfg.rank, cfg.alpha, cfg.dropout))
    names = [name for name, _ in model.named_parameters()]
    for pattern in cfg.trainable:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"model.lora.trainable: {pattern!r} matches no parameter of this model (its "
                              f"parameters are named like {', '.join(names[:3])})")
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name) or any(fnmatch.fnmatchcase(name, p) for p in cfg.trainable))
    return model


def is_adapter(name: str) -> bool:
    """Whether a parameter or checkpoint tensor name is a LoRA adapter's."""
    return name.rpartition(".")[2] in ADAPTERS


def adapter_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """The layers (name prefixes) of a state that hold adapters."""
    return sorted({name.rpartition(".")[0] for name in state if is_adapter(name)})


@torch.no_grad()
def merged_state(state: dict[str, torch.Tensor], cfg: LoraConfig,
                 source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """``state`` without adapters: each adapted layer's weight becomes W + (alpha / r) B A (in
    float64, rounded once to the weight's dtype); every other tensor as it is."""
    merged = {name: t for name, t in state.items() if not is_adapter(name)}
    for layer in adapter_layers(state):
        parts = [f"{layer}.{x}" for x in ("weight", *ADAPTERS)]
        missing = [p for p in parts if p not in state]
        if missing:
            raise CheckpointError(f"{source}: adapter layer {layer!r} has no tensor {missing[0]!r}")
        weight, a, b = (state[p] for p in parts)
        if a.shape[0] != cfg.rank or b.shape != (weight.shape[0], a.shape[0]) or a.shape[1] != weight.shape[1]:
            raise CheckpointError(f"{source}: adapter {layer!r} has shapes A {tuple(a.shape)}, B {tuple(b.shape)} "
                                  f"for weight {tuple(weight.shape)} at rank {cfg.rank}: they do not fit")
        update = (b.double() @ a.double()) * (cfg.alpha / cfg.rank)
        merged[parts[0]] = (weight.double() + update).to(weight.dtype)
    return merged


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters), tied weights counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
