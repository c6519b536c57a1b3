"""Activation checkpointing on the resident backends, and the memory plan --compile_only prints."""

from __future__ import annotations

import copy

import pytest
import torch

from modelzoo.backends.memory_plan import memory_plan
from modelzoo.backends.resident import ResidentBackend
from modelzoo.cli import main as cli_main
from modelzoo.config import validate_params
from modelzoo.data.datasets import build_dataloader
from modelzoo.models import MODELS, build_model
from modelzoo.trainer import split_micro_batches
from tests.helpers import tiny_params, write_params


def train(params, recompute: bool, steps: int = 4):
    torch.manual_seed(0)
    backend = ResidentBackend("cpu", activation_checkpointing=recompute)
    backend.setup(build_model(params.model), params.optimizer)
    loader = iter(build_dataloader(params.train_input.data_dir, 4, shuffle=True, shuffle_seed=0))
    torch.manual_seed(1)  # dropout
    losses = [backend.train_step(split_micro_batches(next(loader), 2), 1e-3)["loss"] for _ in range(steps)]
    return losses, backend.state_dict()["model"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_recompute_gives_the_same_training_with_dropout(shards_msl64, tmp_path, name):
    raw = tiny_params(shards_msl64, tmp_path / "md")
    raw["model"].update(name=name, attention_dropout_rate=0.1)  # dropout 0.1 too: masks must repeat
    params = validate_params(raw)
    plain, weights = train(params, recompute=False)
    recomputed, recomputed_weights = train(params, recompute=True)
    assert plain == pytest.approx(recomputed, rel=1e-6, abs=1e-6)
    for key in weights:
        torch.testing.assert_close(recomputed_weights[key], weights[key], rtol=1e-5, atol=1e-6)


def measured_saved_bytes(model, batch) -> int:
    """What autograd really keeps through one training forward pass on the CPU."""
    saved = {}
    params = {id(p) for p in model.parameters()}

    def pack(x):
        base = x._base if x._base is not None else x
        if id(base) not in params:
            saved[id(base)] = base.numel() * base.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(batch)["loss"]
    return sum(saved.values())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_plan_activations_match_what_autograd_keeps(name):
    cfg = validate_params({"model": {"name": name, "hidden_size": 64, "num_hidden_layers": 3, "num_heads": 4,
                                     "max_position_embeddings": 128}}, check_paths=False).model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids = torch.randint(5, 69, (2, 128))
    measured = measured_saved_bytes(model, {"input_ids": ids, "labels": ids})
    with torch.device("meta"):
        plan = memory_plan(build_model(cfg), (2, 128), 1, None, training=True)
    # the plan leaves out each stage's input, which the stage before it counted as its output
    assert plan.activations == pytest.approx(measured, rel=0.1)
    with torch.device("meta"):
        recompute = memory_plan(build_model(cfg), (2, 128), 1, None, activation_checkpointing=True)
    assert recompute.activations < plan.activations / 1.5


def test_gpu_plan_without_a_gpu_names_what_fits(shards_msl64, tmp_path, capsys):
    raw = tiny_params(shards_msl64, tmp_path / "md")
    raw["runconfig"]["device_memory_gb"] = 0.0017  # between the checkpointed and the plain run's need
    params = write_params(tmp_path / "p.yaml", raw)
    assert cli_main(["GPU", "--params", str(params), "--compile_only"]) == 2  # refused, as CSX refuses (issue 23)
    out = capsys.readouterr().out
    assert "memory plan per rank" in out and "cuda memory" in out
    assert "does not fit with these params; these settings fit: sharding none, activation_checkpointing true" in out
    assert not (tmp_path / "md").exists()


def test_activation_checkpointing_is_for_resident_backends(shards_msl64, tmp_path, capsys):
    raw = copy.deepcopy(tiny_params(shards_msl64, tmp_path / "md", activation_checkpointing=True))
    assert cli_main(["CSX", "--params", str(write_params(tmp_path / "p.yaml", raw))]) == 2
    assert "runconfig.activation_checkpointing applies to CPU and GPU" in capsys.readouterr().err
