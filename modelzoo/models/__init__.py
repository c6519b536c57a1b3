"""Model registry: ``model.name`` in the params selects the architecture."""

from __future__ import annotations

from modelzoo.config import ModelConfig
from modelzoo.models.base import StagedModel
from modelzoo.models.gpt2 import GPT2LMModel

MODELS = {"gpt2": GPT2LMModel}


def build_model(cfg: ModelConfig) -> StagedModel:
    if cfg.name not in MODELS:
        from modelzoo.errors import ConfigError
        raise ConfigError(f"model.name: {cfg.name!r} is not built yet; available: {sorted(MODELS)}")
    return MODELS[cfg.name](cfg)
