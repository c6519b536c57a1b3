"""A trained model as its checkpoint saved it: the weights, the model section of the params it
trained with, and the reading frame of its data (the data paths themselves may be gone)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from modelzoo.config import ModelConfig
from modelzoo.data.tokenizer import READING_FRAMES
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.models import build_model
from modelzoo.models.base import StagedModel
from modelzoo.training import checkpoint as ckpt


def load_saved(model_dir_or_checkpoint, dtype: torch.dtype | str | None = None
               ) -> tuple[StagedModel, ModelConfig, str, int | None, str]:
    """(model, its config, the checkpoint file, its step, reading frame) of the newest good
    checkpoint of a model_dir, or of one ``checkpoint_{step}.mdl`` file."""
    path = Path(model_dir_or_checkpoint)
    if path.is_dir():
        found = ckpt.newest_good_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no good checkpoint_{{step}}.mdl in this model_dir (train first)")
        path = found
    elif not path.exists():
        raise CheckpointError(f"{path}: no such model_dir or checkpoint file")
    state = ckpt.load_checkpoint(path)
    saved = _saved_params(state, path)
    config = _model_config(saved, path)
    model = build_model(config)
    with_shapes = {k: v.shape for k, v in model.state_dict().items()}
    ckpt.check_model_state(path, state["model"], with_shapes)
    model.load_state_dict(state["model"])
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype {dtype!r}: not a torch dtype (e.g. 'bfloat16', 'float32')")
        dtype = getattr(torch, dtype)
    if dtype is not None:
        model = model.to(dtype)
    return model, config, str(path), state.get("step"), _reading_frame(saved)


def _saved_params(state: dict, path: Path) -> dict:
    """The params saved in the checkpoint, as a mapping with a model section (the data paths may be gone)."""
    try:
        raw = yaml.safe_load(state["params"])
    except (KeyError, TypeError, ValueError, RecursionError, yaml.YAMLError):
        raw = None
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(f"{path}: checkpoint holds no params with a model section")
    for name in ("train_input", "eval_input"):  # where the reading frame is read from
        section = raw.get(name)
        if section is not None and not isinstance(section, dict):
            raise CheckpointError(f"{path}: saved params {name}: {section!r:.60} is not a section")
        frame = (section or {}).get("reading_frame", "as_read")
        if frame not in READING_FRAMES:
            raise CheckpointError(f"{path}: saved params {name}.reading_frame: {frame!r:.60} is not one of "
                                  f"{', '.join(READING_FRAMES)}")
    return raw


def _model_config(raw: dict, path: Path) -> ModelConfig:
    """The saved params' model section."""
    try:
        return ModelConfig.model_validate(raw["model"])
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f".{x}" for x in first["loc"])
        raise CheckpointError(f"{path}: saved params model{where}: {first['msg']}") from None


def _reading_frame(raw: dict) -> str:
    """The reading frame of the saved params' training (else evaluation) data; as_read for
    checkpoints from before the setting."""
    section = raw.get("train_input") or raw.get("eval_input") or {}
    return section.get("reading_frame", "as_read")
