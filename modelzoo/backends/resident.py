"""CPU and GPU backends: the whole model resident on one device."""

from __future__ import annotations

import torch

from modelzoo.backends.base import Backend, autocast, loss_weights, token_metrics
from modelzoo.config import OptimizerConfig
from modelzoo.models.base import StagedModel
from modelzoo.training import optim
from modelzoo.training.checkpoint import check_model_state


class ResidentBackend(Backend):
    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        self.model: StagedModel | None = None
        self.optimizer = None
        self.optimizer_cfg: OptimizerConfig | None = None

    def describe(self) -> str:
        return f"resident on {self.device}"

    def setup(self, model, optimizer_cfg):
        self.model = model.to(self.device)
        self.optimizer_cfg = optimizer_cfg
        if optimizer_cfg is not None:
            self.optimizer = optim.build_optimizer(model.named_parameters(), optimizer_cfg)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, micro_batches, lr):
        self.model.train()
        total = 0.0
        for mb, weight in zip(micro_batches, loss_weights(micro_batches)):
            mb = self._to_device(mb)
            with autocast(self.device.type, self.model.config):
                loss = self.model(mb)["loss"] * weight
            loss.backward()
            total += float(loss.detach())
        params = list(self.model.parameters())
        grad_norm = optim.clip_gradients(params, self.optimizer_cfg.max_gradient_norm)
        optim.set_learning_rate(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total, "grad_norm": grad_norm}

    @torch.no_grad()
    def eval_step(self, batch):
        self.model.eval()
        batch = self._to_device(batch)
        with autocast(self.device.type, self.model.config):
            out = self.model(batch)
        return token_metrics(out, batch["labels"])

    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    def state_dict(self):
        state = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}
        if self.optimizer is not None:
            state["optimizer"] = optim.optimizer_state_by_name(self.optimizer, self._names())
        return state

    def load_state_dict(self, state, states):
        if "model" in states:
            expected = {k: v.shape for k, v in self.model.state_dict().items()}
            check_model_state("checkpoint", state["model"], expected)
            self.model.load_state_dict(state["model"])
        if "optimizer" in states and self.optimizer is not None and "optimizer" in state:
            optim.load_optimizer_state_by_name(self.optimizer, state["optimizer"],
                                               dict(self.model.named_parameters()))
