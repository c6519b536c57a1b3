"""Sparse training on two CSX systems (MemoryX sharded by stage: each system holds the masks of
the weights it owns) through run.py: the checkpoint gathers every mask, the realised density is
summed over both systems, and the run matches one system."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers import make_params, tensorboard_scalars

pytestmark = pytest.mark.distributed  # several processes (ranks, systems): `pytest -m "not distributed"` skips them

STEPS = 4


def run_sparse(tmp_path, data_dir, systems):  # noqa: F811
    model_dir = tmp_path / f"csx{systems}"
    raw = yaml.safe_load(make_params(data_dir, "gptj", dropout=0.0, batch=4, accum=2, tmp=model_dir, log_steps=1,
                                     max_steps=STEPS).to_yaml())
    raw["sparsity"] = {"density": 0.3, "groups": [{"params": ["blocks.0.*.weight"], "density": 0.5, "name": "first"}]}
    path = tmp_path / f"params{systems}.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "run.py", "CSX", "--params", str(path), "--num_csx", str(systems)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return model_dir


def test_two_sparse_systems_equal_one(tmp_path, data_dir):  # noqa: F811
    one, two = run_sparse(tmp_path, data_dir, 1), run_sparse(tmp_path, data_dir, 2)
    losses = (tensorboard_scalars(run / "train", "loss").values() for run in (one, two))
    for x, y in zip(*losses):
        assert math.isclose(x, y, rel_tol=1e-5)
    for group, target in (("first", 0.5), ("default", 0.3)):
        density, density_one = (tensorboard_scalars(run / "train", f"sparsity/{group}/density") for run in (two, one))
        assert density == density_one and next(iter(density.values())) == pytest.approx(target, abs=2e-3)
    a = torch.load(one / f"checkpoint_{STEPS}.mdl", weights_only=False)["sparsity"]
    b = torch.load(two / f"checkpoint_{STEPS}.mdl", weights_only=False)["sparsity"]
    assert a["masks"].keys() == b["masks"].keys() and "blocks.1.mlp.fc_in.weight" in a["masks"]
    for name, mask in a["masks"].items():
        assert torch.equal(mask, b["masks"][name]), name

