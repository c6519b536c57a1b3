"""Resident data parallel on the CPU (DDP over gloo), end to end through run.py.

The windows are padded unevenly, so ranks hold different numbers of labelled tokens: only an
exact global-token normalisation (and a sum, not DDP's average, over ranks) reproduces the
one-rank run. SGD is used because it is sensitive to the scale of the gradient (Adam would hide
a factor of 2).
"""

import os
import subprocess
import sys

import pytest
import torch

from modelzoo import cli
from tests.helpers import tensorboard_scalars as scalars  # {step: value} of a run's phase
from tests.helpers import RANKS_STEPS, REPO, assert_same_curve, assert_same_curves, ranks_params, run_py, write_shards

pytestmark = pytest.mark.distributed  # several processes (ranks, systems): `pytest -m "not distributed"` skips them


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp")
    write_shards(d / "data" / "train", 48, seed=0)
    write_shards(d / "data" / "val", 16, seed=1)
    ranks_params(d / "one.yaml", grad_accum_steps=1)
    ranks_params(d / "two.yaml", grad_accum_steps=2)  # 4 rows per rank in 2 micro-batches of 2
    ranks_params(d / "two_train.yaml", grad_accum_steps=2, mode="train")
    return d


@pytest.fixture(scope="module")
def one_rank(workdir):
    run_py(workdir, "CPU", "--params", "one.yaml", "--model_dir", "one")
    return workdir / "one"


@pytest.fixture(scope="module")
def two_ranks(workdir):
    run_py(workdir, "CPU", "--params", "two.yaml", "--model_dir", "two", "--num_workers_per_node", "2")
    return workdir / "two"


def test_two_ranks_follow_the_one_rank_loss_curve(one_rank, two_ranks):
    assert_same_curves(two_ranks, one_rank)
    ours, theirs = (torch.load(d / f"checkpoint_{RANKS_STEPS}.mdl", weights_only=False)["model"]
                    for d in (two_ranks, one_rank))
    assert ours.keys() == theirs.keys()  # the bare model's names: no DDP 'module.' prefix
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-6)


def test_only_rank_zero_writes(two_ranks):
    assert sorted(p.name for p in two_ranks.iterdir()) == [
        "checkpoint_10.mdl", "checkpoint_10.mdl.sha256", "eval", "params_train_and_eval.yaml", "run.log",
        "run.rank1.log", "train"]  # rank 1's log: its own file, not rank 0's console (issue 25)
    for phase in ("train", "eval"):
        assert len(list((two_ranks / phase).iterdir())) == 1  # one event file, not one per rank
    log = (two_ranks / "run.log").read_text()
    assert "data parallel over 2 ranks (gloo)" in log
    assert log.count(f"INFO step {RANKS_STEPS} | loss") == 1


def test_two_rank_run_resumes_from_its_checkpoint(workdir, one_rank):
    args = ("--params", "two_train.yaml", "--model_dir", "resumed", "--num_workers_per_node", "2")
    run_py(workdir, "CPU", *args, "--num_steps", "4")
    assert [p.name for p in (workdir / "resumed").glob("checkpoint_*.mdl")] == ["checkpoint_4.mdl"]
    second = run_py(workdir, "CPU", *args)  # same command, no step count: continues to max_steps
    assert "checkpoint_4.mdl" in second.stdout and "at step 4" in second.stdout
    reference = scalars(one_rank / "train", "loss")
    assert_same_curve(scalars(workdir / "resumed" / "train", "loss"), reference, range(1, RANKS_STEPS + 1))


def test_uneven_split_is_refused_before_any_rank_starts(workdir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "run.py"), "CPU", "--params", "one.yaml", "--model_dir",
                           "uneven", "--num_workers_per_node", "3"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: one.yaml: train_input.batch_size: 8 is not divisible by the 3 data-parallel ranks"]
    assert not (workdir / "uneven").exists()


def test_outer_launcher_must_match_the_requested_workers(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli.main(["CPU", "--params", "one.yaml", "--num_workers_per_node", "4"]) == 2
    assert capsys.readouterr().err.strip() == "error: launched with LOCAL_WORLD_SIZE=2 but the params ask for 4 ranks"


def test_worker_flag_belongs_to_cpu_and_gpu(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    assert cli.main(["CSX", "--params", "one.yaml", "--num_workers_per_node", "2"]) == 2
    assert "--num_workers_per_node applies to CPU and GPU" in capsys.readouterr().err
    assert cli.main(["CPU", "--params", "one.yaml", "--num_csx", "2"]) == 2
    assert "--num_csx applies to the CSX device only" in capsys.readouterr().err
