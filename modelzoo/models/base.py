"""The model contract shared by every architecture and every backend.

A model is a sequence of stages whose composition is its forward pass. Each stage is called as
``stage(hidden, batch)``: ``hidden`` is the activation at the stage boundary (``None`` for the
first stage) and ``batch`` holds the non-differentiable inputs (ids, masks, labels). The last
stage returns the output dict. Backends that only see ``stages()`` (the CSX wafer) can therefore
run, recompute and differentiate any model one stage at a time.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class StagedModel(nn.Module):
    def stages(self) -> list[nn.Module]:
        raise NotImplementedError  # each architecture defines its stage list

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stages = self.stages()
        hidden = None
        for stage in stages[:-1]:
            hidden = stage(hidden, batch)
        return stages[-1](hidden, batch)

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The boundary activation after every stage but the head (embeddings, then each block)."""
        hidden, states = None, []
        for stage in self.stages()[:-1]:
            hidden = stage(hidden, batch)
            states.append(hidden)
        return states


def token_loss(logits: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Mean cross-entropy over labelled positions (labels are pre-aligned; -100 is ignored)."""
    out = {"logits": logits}
    if labels is not None:
        out["loss"] = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)
    return out


def init_weights(module: nn.Module, std: float) -> None:
    """GPT-2/BERT initialisation: N(0, std) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
