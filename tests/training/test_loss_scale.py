"""Dynamic fp16 loss scaling: the scaler's rules, and the resident backend using it on the CPU
(fp16 autocast runs on the CPU, so no GPU is needed to exercise the whole path)."""

import math

import pytest
import torch

from modelzoo import cli
from modelzoo.backends.resident import ResidentBackend
from modelzoo.config import OptimizerConfig, validate_params
from modelzoo.errors import ConfigError, TrainingError
from modelzoo.training.loss_scale import DynamicLossScaler
from tests.helpers import tiny_model, tiny_params, write_params

INF, NAN = float("inf"), float("nan")


def scaler(**kw):
    args = dict(initial_scale=1024.0, min_scale=1.0, max_scale=4096.0, growth_factor=2.0, backoff_factor=0.5,
                steps_per_increase=3)
    return DynamicLossScaler(**{**args, **kw})


def test_overflow_skips_the_step_and_halves_the_scale():
    s = scaler()
    assert s.update(INF) is False and s.scale == 512
    assert s.update(NAN) is False and s.scale == 256
    assert s.skipped_steps == 2


def test_growth_after_n_good_steps_in_a_row_capped_at_max():
    s = scaler()
    assert [s.update(1.0) for _ in range(2)] == [True, True] and s.scale == 1024
    assert s.update(1.0) and s.scale == 2048
    s.update(1.0), s.update(1.0)
    s.update(INF)  # an overflow restarts the count of good steps
    assert s.scale == 1024
    for _ in range(2):
        s.update(1.0)
    assert s.scale == 1024
    for _ in range(3 * 4):
        s.update(1.0)
    assert s.scale == 4096  # 1024 -> 2048 -> 4096, then held at max_scale


def test_overflow_at_the_minimum_scale_stops_training():
    s = scaler(initial_scale=2.0, min_scale=1.0)
    assert s.update(INF) is False and s.scale == 1.0
    with pytest.raises(TrainingError, match="minimum loss scale 1"):
        s.update(INF)


def test_unscale_divides_gradients_and_state_round_trips():
    grads = [torch.full((3,), 1024.0), torch.full((2,), -2048.0)]
    s = scaler()
    s.unscale_grads(grads)
    assert torch.equal(grads[0], torch.ones(3)) and torch.equal(grads[1], torch.full((2,), -2.0))
    s.update(INF), s.update(1.0)
    fresh = scaler()
    fresh.load_state_dict(s.state_dict())
    assert fresh.state_dict() == {"scale": 512.0, "good_steps": 1, "skipped_steps": 1}


def test_config_keys_are_validated(tmp_path):
    raw = {"train_input": {"data_dir": str(tmp_path), "batch_size": 2, "max_seq_length": 8},
           "model": {"name": "gpt2", "hidden_size": 8, "num_hidden_layers": 1, "num_heads": 2,
                     "max_position_embeddings": 8},
           "optimizer": {"learning_rate": 0.1, "initial_loss_scale": 2.0 ** 30}}
    with pytest.raises(ConfigError, match=r"p\.yaml: optimizer: .*initial_loss_scale \(1.07374e\+09\) <= "
                                          r"max_loss_scale"):
        validate_params(raw, "p.yaml")
    raw["optimizer"]["max_loss_scale"] = 2.0 ** 30
    cfg = validate_params(raw, "p.yaml").optimizer
    assert DynamicLossScaler.from_config(cfg).scale == 2.0 ** 30


# ------------------------------------------------------------ the backend on CPU fp16 autocast

def fp16_model(fp16_type=None):
    """An even smaller GPT-2 (16 codons), in mixed precision when fp16_type is given."""
    return tiny_model(hidden_size=16, num_hidden_layers=1, num_heads=2, max_position_embeddings=16,
                      mixed_precision=fp16_type is not None, fp16_type=fp16_type or "bfloat16")


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 69, (4, 16), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def backend(model, **opt):
    b = ResidentBackend("cpu")
    b.setup(model, OptimizerConfig(learning_rate=0.01, optimizer_type="SGD", **opt))
    return b


def test_only_fp16_gets_a_loss_scaler():
    assert backend(fp16_model("float16")).loss_scaler is not None
    assert backend(fp16_model("bfloat16")).loss_scaler is None
    assert backend(fp16_model()).loss_scaler is None


def test_fp16_overflow_skips_the_update_and_halves_the_scale():
    b = backend(fp16_model("float16"), initial_loss_scale=2.0 ** 40, max_loss_scale=2.0 ** 40)
    before = {k: v.clone() for k, v in b.state_dict()["model"].items()}
    metrics = b.train_step([batch()], lr=0.01)
    assert metrics["overflow"] and not math.isfinite(metrics["grad_norm"]) and math.isfinite(metrics["loss"])
    assert b.loss_scaler.scale == 2.0 ** 39
    after = b.state_dict()["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in b.model.parameters())  # nothing leaks into the next step
    assert b.state_dict()["loss_scale"]["scale"] == 2.0 ** 39


def test_fp16_scaled_gradients_are_unscaled_before_the_update():
    fp32 = backend(fp16_model())
    scaled = backend(fp16_model("float16"), initial_loss_scale=2.0 ** 12)
    m32, m16 = fp32.train_step([batch()], lr=0.01), scaled.train_step([batch()], lr=0.01)
    assert scaled.loss_scaler.scale == 2.0 ** 12 and scaled.loss_scaler.good_steps == 1
    # fp16 rounding only: without unscaling the norm would be 4096 times larger
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=2e-2)
    w32, w16 = fp32.state_dict()["model"], scaled.state_dict()["model"]
    moved = [k for k in w32 if not torch.equal(w16[k], fp16_model().state_dict()[k])]
    assert moved  # the step was applied
    for k in w32:
        torch.testing.assert_close(w16[k], w32[k], rtol=0, atol=1e-4)


def test_loss_scale_is_restored_with_the_optimizer_state():
    b = backend(fp16_model("float16"), initial_loss_scale=2.0 ** 40, max_loss_scale=2.0 ** 40)
    b.train_step([batch()], lr=0.01)
    state = b.state_dict()
    fresh = backend(fp16_model("float16"), initial_loss_scale=2.0 ** 40, max_loss_scale=2.0 ** 40)
    fresh.load_state_dict(state, {"model"})
    assert fresh.loss_scaler.scale == 2.0 ** 40
    fresh.load_state_dict(state, {"model", "optimizer"})
    assert fresh.loss_scaler.state_dict() == b.loss_scaler.state_dict()


def test_without_loss_scaling_a_non_finite_gradient_is_never_applied():
    b = backend(fp16_model())
    with torch.no_grad():
        next(b.model.parameters()).fill_(NAN)  # every output and gradient becomes NaN
    before = {k: v.clone() for k, v in b.state_dict()["model"].items()}
    metrics = b.train_step([batch()], lr=0.01)
    assert not metrics["overflow"] and not math.isfinite(metrics["grad_norm"])
    after = b.state_dict()["model"]
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


def test_fp16_run_skips_overflowing_steps_and_keeps_training(shards_msl64, tmp_path, capsys):
    params = tiny_params(shards_msl64, tmp_path / "run", max_steps=3, checkpoint_steps=0)
    # fp16 even on a CPU without AMX tiles for it (where mixed_precision_on_cpu: auto would compute in fp32)
    params["model"].update(mixed_precision=True, fp16_type="float16", mixed_precision_on_cpu=True, dropout_rate=0.0)
    params["optimizer"].update(initial_loss_scale=2.0 ** 40, max_loss_scale=2.0 ** 40)
    assert cli.main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", params))]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint_3.mdl", weights_only=False)
    assert state["loss_scale"]["scale"] == 2.0 ** 37 and state["loss_scale"]["skipped_steps"] == 3
    log = (tmp_path / "run" / "run.log").read_text()
    assert "fp16 gradients overflowed at loss scale 1.09951e+12: step skipped, scale now 5.49756e+11" in log
    assert "float16 autocast, dynamic loss scaling" in log
