"""Start-up order (Trainer.from_params): validation before anything is built or written, the
process group joined by the start-up and never by making a backend, and a run through from_params
equal to one through run.py."""

import pytest
import torch
import torch.distributed as dist

from modelzoo import cli, startup
from modelzoo.config import validate_params
from modelzoo.errors import ConfigError
from modelzoo.trainer import Trainer
from tests.helpers import tiny_params, write_params


@pytest.mark.parametrize("device", ["CPU", "CSX"])
def test_making_a_backend_joins_no_process_group(shards_msl64, tmp_path, monkeypatch, device):
    """Under a launcher (WORLD_SIZE 2) a backend is made without joining its group: join() does that."""
    class Joined(Exception):
        pass

    def join(*args, **kwargs):
        raise Joined
    monkeypatch.setattr(dist, "init_process_group", join)
    monkeypatch.setenv("WORLD_SIZE", "2")
    params = validate_params(tiny_params(shards_msl64, tmp_path / "md"), "p.yaml")
    startup.make_backend(device, params).close()  # joins nothing
    with pytest.raises(Joined):
        startup.join(device)


def test_the_batch_split_is_refused_before_anything_is_written(shards_msl64, tmp_path):
    raw = tiny_params(shards_msl64, tmp_path / "md", max_steps=1)
    raw["optimizer"]["grad_accum_steps"] = 3  # does not divide the batch of 4
    with pytest.raises(ConfigError, match=r"p.yaml: optimizer.grad_accum_steps: 3 does not divide the per-rank "
                                          r"batch size 4"):
        Trainer.from_params(validate_params(raw, "p.yaml"), "CPU", "p.yaml")
    assert not (tmp_path / "md").exists()


def test_from_params_runs_what_run_py_runs(shards_msl64, tmp_path):
    """The same params through Trainer.from_params(...).run() and through run.py: the same weights."""
    weights = []
    for name in ("api", "cli"):
        raw = tiny_params(shards_msl64, tmp_path / name, max_steps=2, checkpoint_steps=0, mode="train")
        if name == "api":
            with Trainer.from_params(validate_params(raw, "p.yaml"), "CPU", "p.yaml") as trainer:
                assert trainer.run() == 0
        else:
            assert cli.main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", raw))]) == 0
        weights.append(torch.load(tmp_path / name / "checkpoint_2.mdl", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
