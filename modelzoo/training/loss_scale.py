"""Dynamic loss scaling for fp16 mixed precision, shared by every backend.

fp16 gradients underflow to zero below ~6e-8, so the loss is multiplied by a large scale before
backward and the gradients divided by it afterwards. Too large a scale overflows instead (inf or
NaN gradients): that step is skipped and the scale shrinks; after ``steps_per_increase`` good steps
in a row it grows again, up to ``max_loss_scale``. The scaler works on gradient tensors and a
gradient norm only, so a resident backend and the CSX backend (whose gradients live in MemoryX)
use it alike. bf16 has fp32's range and needs none of this.

Data parallel: decide on gradients *after* the all-reduce. They are then identical on every rank
(an inf anywhere becomes an inf everywhere), so all ranks skip or apply the same steps.
"""

from __future__ import annotations

import logging
import math

import torch

from modelzoo.config import ModelConfig, OptimizerConfig
from modelzoo.errors import TrainingError

log = logging.getLogger("modelzoo")


class DynamicLossScaler:
    def __init__(self, initial_scale: float = 2.0 ** 15, min_scale: float = 1.0, max_scale: float = 2.0 ** 24,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, steps_per_increase: int = 2000):
        self.scale = float(initial_scale)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.steps_per_increase = int(steps_per_increase)
        self.good_steps = 0  # finite steps since the scale last changed
        self.skipped_steps = 0  # total, for the run log

    @classmethod
    def from_config(cls, cfg: OptimizerConfig) -> "DynamicLossScaler":
        return cls(cfg.initial_loss_scale, cfg.min_loss_scale, cfg.max_loss_scale,
                   cfg.loss_scale_growth_factor, cfg.loss_scale_backoff_factor, cfg.steps_per_increase)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_grads(self, grads: list[torch.Tensor]) -> None:
        """Divide the gradients by the scale in place (before clipping and the optimizer)."""
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, grad_norm: float) -> bool:
        """Given the (unscaled) global gradient norm, adjust the scale; True when the step may apply.

        A non-finite norm is exactly "some gradient is inf or NaN", so the norm the backend
        computes for clipping anyway is the overflow check; no extra pass over the gradients.
        """
        if math.isfinite(grad_norm):
            self.good_steps += 1
            if self.good_steps >= self.steps_per_increase:
                self.scale = min(self.scale * self.growth_factor, self.max_scale)
                self.good_steps = 0
            return True
        if self.scale <= self.min_scale:
            raise TrainingError(f"gradients are not finite even at the minimum loss scale {self.min_scale:g}: "
                                "the model diverged or fp16 cannot hold its gradients (try model.fp16_type: "
                                "bfloat16 or a lower learning rate)")
        old = self.scale
        self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        self.good_steps = 0
        self.skipped_steps += 1
        log.info("fp16 gradients overflowed at loss scale %g: step skipped, scale now %g", old, self.scale)
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


def needs_loss_scaling(model_cfg: ModelConfig) -> bool:
    return model_cfg.mixed_precision and model_cfg.fp16_type == "float16"
