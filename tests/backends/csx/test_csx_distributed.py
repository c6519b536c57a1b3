"""--num_csx 2 through run.py (torch's elastic launcher, gloo): two systems with global batch B
train exactly like one system with batch B."""

from __future__ import annotations

import math
import subprocess
import sys

import torch
import pytest
import yaml

from tests.helpers import make_params, tensorboard_scalars

pytestmark = pytest.mark.distributed  # several processes (ranks, systems): `pytest -m "not distributed"` skips them

STEPS = 6


def run_cli(tmp_path, data_dir, systems, memoryx="ram"):
    model_dir = tmp_path / f"csx{systems}"
    params = make_params(data_dir, dropout=0.0, batch=4, accum=2, tmp=model_dir, log_steps=1,
                         max_steps=STEPS, csx={"memoryx": memoryx})
    path = tmp_path / f"params{systems}.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(params.to_yaml())))
    proc = subprocess.run([sys.executable, "run.py", "CSX", "--params", str(path), "--num_csx", str(systems)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return model_dir


def test_two_systems_equal_one(tmp_path, data_dir):  # noqa: F811
    one = run_cli(tmp_path, data_dir, 1)
    two = run_cli(tmp_path, data_dir, 2, memoryx="disk")  # sharded disk MemoryX, one shard per system
    for tag in ("loss", "grad_norm"):
        a, b = (list(tensorboard_scalars(run / "train", tag).values()) for run in (one, two))
        assert len(a) == len(b) == STEPS
        for step, (x, y) in enumerate(zip(a, b)):
            assert math.isclose(x, y, rel_tol=1e-5), f"{tag} at step {step + 1}: {x} vs {y}"
    ckpt_one = torch.load(one / f"checkpoint_{STEPS}.mdl", weights_only=False)
    ckpt_two = torch.load(two / f"checkpoint_{STEPS}.mdl", weights_only=False)
    assert ckpt_one["model"].keys() == ckpt_two["model"].keys()
    for k, v in ckpt_one["model"].items():
        # Adam turns a 1e-7 gradient difference on a near-zero gradient into ~1e-6 of weight
        torch.testing.assert_close(ckpt_two["model"][k], v, rtol=1e-5, atol=1e-5)
    assert ckpt_one["optimizer"]["state"].keys() == ckpt_two["optimizer"]["state"].keys()
