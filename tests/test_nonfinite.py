"""Non-finite loss or gradient: stop naming the step (default), or skip and count the batch
(runconfig.nonfinite_policy: skip); a bad update is never applied and the last checkpoint stays good."""

from __future__ import annotations

import math

import pytest
import torch

import modelzoo.models
from modelzoo.training import checkpoint as ckpt
from tests.helpers import error_line, params_file, run_cli, steady_params, tensorboard_scalars, write_params


def poison(monkeypatch, bad_steps: set[int], where: str) -> None:
    """Make training step k (1-based) of every run produce a NaN loss or a NaN gradient.

    For 'gradient' the loss stays finite: d/dw sqrt(0 * w) at 0 is inf * 0 = NaN.
    """
    real_build = modelzoo.models.build_model

    def build(cfg):
        model = real_build(cfg)
        real_forward, calls = model.forward, [0]

        def forward(batch):
            out = real_forward(batch)
            if model.training:
                calls[0] += 1
                if calls[0] in bad_steps:
                    w = next(model.parameters())
                    extra = torch.sqrt(w * 0).sum() if where == "gradient" else torch.tensor(float("nan"))
                    out = dict(out, loss=out["loss"] + extra)
            return out

        model.forward = forward
        return model

    monkeypatch.setattr(modelzoo.models, "build_model", build)


def all_finite(path) -> bool:
    state = ckpt.load_checkpoint(path)
    return all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize("where, what", [("loss", "loss is nan"), ("gradient", "grad_norm is nan")])
def test_stop_names_the_step(tmp_path, shards, capsys, monkeypatch, where, what):
    poison(monkeypatch, {3}, where)
    params = params_file(tmp_path, shards, max_steps=6)
    code, _, err = run_cli(capsys, "CPU", "--params", params)
    line = error_line(err)
    assert code == 1 and line.startswith(f"error: step 3: {what}") and "checkpoint_2.mdl" in line, line
    model_dir = tmp_path / "model_dir"
    assert [s for s, _ in ckpt.list_checkpoints(model_dir)] == [2]
    assert all_finite(ckpt.checkpoint_path(model_dir, 2))
    if where == "gradient":
        assert "grad_norm is nan" in line and "loss is" not in line


def test_divergence_from_a_huge_learning_rate_stops(tmp_path, shards, capsys):
    params = steady_params(shards, tmp_path / "model_dir", max_steps=6, checkpoint_steps=1)
    params["optimizer"] = {"optimizer_type": "SGD", "learning_rate": 1e30}
    code, _, err = run_cli(capsys, "CPU", "--params", write_params(tmp_path / "p.yaml", params))
    line = error_line(err)
    assert code == 1 and line.startswith("error: step 2: loss is nan"), line
    saved = ckpt.list_checkpoints(tmp_path / "model_dir")
    assert [s for s, _ in saved] == [1] and ckpt.load_checkpoint(saved[0][1])["step"] == 1


def test_skip_policy_skips_counts_and_resumes_the_count(tmp_path, shards, capsys, monkeypatch):
    poison(monkeypatch, {3, 6}, "loss")  # calls 3 and 6: the batches of steps 3 and 5
    params = params_file(tmp_path, shards, max_steps=6, nonfinite_policy="skip", max_nonfinite_skips=2)
    code, out, err = run_cli(capsys, "CPU", "--params", params)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if "skipped" in line]
    assert len(warnings) == 2 and "step 3: loss is nan" in warnings[0] and "(1 of at most 2)" in warnings[0]
    assert "step 5: loss is nan" in warnings[1]
    model_dir = tmp_path / "model_dir"
    assert tensorboard_scalars(model_dir / "train", "nonfinite_skipped") == {3: 1.0, 5: 2.0}
    losses = tensorboard_scalars(model_dir / "train", "loss")
    assert sorted(losses) == list(range(1, 7)) and all(math.isfinite(v) for v in losses.values())
    final = ckpt.load_checkpoint(ckpt.checkpoint_path(model_dir, 6))
    assert final["nonfinite_skipped"] == 2
    assert final["dataloader"]["batches_done"] == 8  # 6 steps + 2 skipped batches consumed
    assert all_finite(ckpt.checkpoint_path(model_dir, 6))  # the NaN gradients were never applied

    # the count is part of the run's state: one more bad batch after resuming exceeds the limit
    monkeypatch.undo()
    poison(monkeypatch, {1}, "gradient")
    code, _, err = run_cli(capsys, "CPU", "--params", params, "--max_steps", 8)
    line = error_line(err)
    assert code == 1 and line.startswith("error: step 7: grad_norm is nan") and "after 2 skipped" in line, line
