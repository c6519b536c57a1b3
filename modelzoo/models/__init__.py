"""Model registry: ``model.name`` in the params selects the architecture's spec (its model class,
objective and transformers twin; ``modelzoo.models.spec``)."""

from __future__ import annotations

import logging

import torch

from modelzoo.config import ModelConfig
from modelzoo.errors import CheckpointError
from modelzoo.models import bert, gpt2, gpt_neox, gptj, lora
from modelzoo.models.base import StagedModel
from modelzoo.models.spec import CAUSAL_LM, CLASSIFY, MASKED_LM, ModelSpec  # noqa: F401  (the objectives)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (gpt2.SPEC, gptj.SPEC, gpt_neox.SPEC, bert.SPEC)}
HEAD_PREFIX = "head."  # the last stage; a task head that may differ between pretraining and fine-tuning

log = logging.getLogger("modelzoo")


def spec_of(cfg: ModelConfig) -> ModelSpec:
    return MODELS[cfg.name]


def objective_of(cfg: ModelConfig) -> str:
    """CAUSAL_LM, MASKED_LM or CLASSIFY: what this configured model predicts."""
    return spec_of(cfg).objective_of(cfg)


def build_model(cfg: ModelConfig) -> StagedModel:
    """The architecture's model; with model.lora, its target layers wrapped in adapters and every
    other weight frozen (the model itself never knows)."""
    model = spec_of(cfg).model(cfg)
    if cfg.lora is not None:
        lora.add_adapters(model, cfg.lora)
    return model


def transfer_backbone(saved: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor],
                      source: str) -> dict[str, torch.Tensor]:
    """Fine-tuning: the saved weights of every stage but the head, with the current model's own
    (freshly initialised) head where the checkpoint's task head differs (e.g. MLM -> classifier),
    and its own fresh LoRA adapters where the checkpoint has none (a pretrained model, adapted).

    Returns ``saved`` unchanged when the two models have the same tensors. Tensors shared by the
    head and the backbone (the tied token embedding) come from the checkpoint.
    """
    if saved.keys() == fresh.keys():
        return saved
    missing = [k for k in fresh if k not in saved and not k.startswith(HEAD_PREFIX) and not lora.is_adapter(k)]
    if missing:
        raise CheckpointError(f"{source}: checkpoint has no tensor {missing[0]!r} ({len(missing)} missing): "
                              f"it belongs to another model")
    out = {}
    for name, tensor in fresh.items():
        out[name] = saved[name] if name in saved else tensor
    fresh_head = sorted(k for k in fresh if k not in saved)
    dropped = sorted(k for k in saved if k not in fresh)
    adapters = [k for k in fresh_head if lora.is_adapter(k)]
    fresh_head = [k for k in fresh_head if not lora.is_adapter(k)]
    log.info("fine-tuning from %s: new head tensors %s; checkpoint tensors not used: %s%s", source,
             ", ".join(fresh_head) or "none", ", ".join(dropped) or "none",
             f"; fresh LoRA adapters on {len(adapters) // 2} layers" if adapters else "")
    return out
