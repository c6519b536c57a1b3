"""Fully sharded data parallel (runconfig.sharding: fsdp) on 2 CPU ranks (gloo), end to end
through run.py: the same losses, gradient norms and weights as one rank, checkpoints in the one
format (resumed on 1 rank without sharding, on 2 ranks with DDP and with FSDP), activation
checkpointing, clipping, mixed precision and static sparsity.

Windows are padded unevenly and SGD is used (helpers.write_shards, ranks_params), as in
test_data_parallel.py: only a SUM of the ranks' gradients (not FSDP's default mean) reproduces one rank.
"""

import pytest
import torch

from tests.helpers import tensorboard_scalars as scalars  # {step: value} of a run's phase
from tests.helpers import (RANKS_STEPS, assert_same_curve, assert_same_curves, assert_same_state, checkpoint,
                           ranks_params, run_py, write_shards)

pytestmark = pytest.mark.distributed  # several processes (ranks, systems): `pytest -m "not distributed"` skips them


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    write_shards(d / "data" / "train", 48, seed=0)
    write_shards(d / "data" / "val", 16, seed=1)
    ranks_params(d / "none.yaml", clip=1.0)
    ranks_params(d / "fsdp.yaml", clip=1.0, sharding="fsdp")
    ranks_params(d / "fsdp_train.yaml", clip=1.0, mode="train", sharding="fsdp")
    ranks_params(d / "none_train.yaml", clip=1.0, mode="train")
    ranks_params(d / "fsdp_ckpt.yaml", clip=1.0, sharding="fsdp", activation_checkpointing=True)
    return d


@pytest.fixture(scope="module")
def one_rank(workdir):
    run_py(workdir, "CPU", "--params", "none.yaml", "--model_dir", "one")
    return workdir / "one"


@pytest.fixture(scope="module")
def two_ranks(workdir):
    run_py(workdir, "CPU", "--params", "fsdp.yaml", "--model_dir", "two", "--num_workers_per_node", "2")
    return workdir / "two"


def test_two_fsdp_ranks_follow_one_rank(one_rank, two_ranks):
    assert_same_curves(two_ranks, one_rank)
    assert max(scalars(one_rank / "train", "grad_norm").values()) > 1.0  # max_gradient_norm 1 clips
    assert_same_state(checkpoint(two_ranks), checkpoint(one_rank))
    log = (two_ranks / "run.log").read_text()
    assert "fully sharded (FSDP) over 2 ranks (gloo)" in log


def test_fsdp_with_activation_checkpointing_follows_one_rank(workdir, one_rank):
    run_py(workdir, "CPU", "--params", "fsdp_ckpt.yaml", "--model_dir", "ckpt", "--num_workers_per_node", "2")
    assert_same_curve(scalars(workdir / "ckpt" / "train", "loss"), scalars(one_rank / "train", "loss"),
                      range(1, RANKS_STEPS + 1))
    assert_same_state(checkpoint(workdir / "ckpt"), checkpoint(one_rank))


@pytest.mark.parametrize("second", [("fsdp_train.yaml", "2"), ("none_train.yaml", None),
                                    ("none_train.yaml", "2")], ids=["fsdp-2", "one-rank", "ddp-2"])
def test_fsdp_checkpoint_resumes_anywhere(workdir, one_rank, second):
    """An FSDP checkpoint at step 4 resumed on 2 FSDP ranks, on 1 rank and on 2 DDP ranks."""
    params, workers = second
    run_dir = f"resumed-{params}-{workers}"
    ranks = ("--num_workers_per_node", workers) if workers else ()
    run_py(workdir, "CPU", "--params", "fsdp_train.yaml", "--model_dir", run_dir, "--num_workers_per_node", "2",
           "--num_steps", "4")
    done = run_py(workdir, "CPU", "--params", params, "--model_dir", run_dir, *ranks)
    assert "checkpoint_4.mdl" in done.stdout and "at step 4" in done.stdout
    assert_same_curve(scalars(workdir / run_dir / "train", "loss"), scalars(one_rank / "train", "loss"),
                      range(1, RANKS_STEPS + 1))


def test_a_one_rank_checkpoint_resumes_sharded(workdir, one_rank):
    run_py(workdir, "CPU", "--params", "none_train.yaml", "--model_dir", "from-one", "--num_steps", "4")
    run_py(workdir, "CPU", "--params", "fsdp_train.yaml", "--model_dir", "from-one", "--num_workers_per_node", "2")
    assert_same_curve(scalars(workdir / "from-one" / "train", "loss"), scalars(one_rank / "train", "loss"),
                      range(1, RANKS_STEPS + 1))
    assert_same_state(checkpoint(workdir / "from-one"), checkpoint(one_rank))


@pytest.mark.parametrize("fp16_type", ["bfloat16", "float16"])
def test_mixed_precision_follows_one_rank(workdir, fp16_type):
    """Gathered weights in the compute dtype, fp32 gradient reduction and masters (fp16: with the
    dynamic loss scale, which ends where one rank's does). Not bit-equal to autocast over fp32
    weights (norms and embeddings see rounded weights), so within 2%."""
    extra = {"model": {"mixed_precision": True, "fp16_type": fp16_type, "mixed_precision_on_cpu": True}}
    ranks_params(workdir / f"{fp16_type}-none.yaml", clip=1.0, mode="train", extra=extra)
    ranks_params(workdir / f"{fp16_type}-fsdp.yaml", clip=1.0, mode="train", sharding="fsdp", extra=extra)
    run_py(workdir, "CPU", "--params", f"{fp16_type}-none.yaml", "--model_dir", f"{fp16_type}-one")
    done = run_py(workdir, "CPU", "--params", f"{fp16_type}-fsdp.yaml", "--model_dir", f"{fp16_type}-two",
                  "--num_workers_per_node", "2")
    assert "fully sharded (FSDP) over 2 ranks" in done.stdout + (workdir / f"{fp16_type}-two" / "run.log").read_text()
    ours, theirs = (scalars(workdir / f"{fp16_type}-{d}" / "train", "loss") for d in ("two", "one"))
    assert sorted(ours) == list(range(1, RANKS_STEPS + 1))
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], rel=2e-2), step
    if fp16_type == "float16":
        assert checkpoint(workdir / "float16-two")["loss_scale"] == checkpoint(workdir / "float16-one")["loss_scale"]


def test_static_sparsity_follows_one_rank(workdir):
    """Masks from the whole tensors (magnitude: each tensor's top k), each rank applying its chunk;
    checkpoints hold the whole masks, equal to one rank's."""
    extra = {"sparsity": {"density": 0.4, "init_method": "magnitude"}}
    ranks_params(workdir / "sparse-none.yaml", clip=1.0, mode="train", extra=extra)
    ranks_params(workdir / "sparse-fsdp.yaml", clip=1.0, mode="train", sharding="fsdp", extra=extra)
    run_py(workdir, "CPU", "--params", "sparse-none.yaml", "--model_dir", "sparse-one")
    run_py(workdir, "CPU", "--params", "sparse-fsdp.yaml", "--model_dir", "sparse-two", "--num_workers_per_node", "2")
    one, two = workdir / "sparse-one", workdir / "sparse-two"
    assert_same_curve(scalars(two / "train", "loss"), scalars(one / "train", "loss"), range(1, RANKS_STEPS + 1))
    assert scalars(two / "train", "sparsity/default/density") == scalars(one / "train", "sparsity/default/density")
    ours, theirs = checkpoint(two), checkpoint(one)
    assert ours["sparsity"]["masks"].keys() == theirs["sparsity"]["masks"].keys()
    for name, mask in ours["sparsity"]["masks"].items():
        assert torch.equal(mask, theirs["sparsity"]["masks"][name]), name
        assert not ours["model"][name][~mask].any(), name  # pruned weights stay exactly zero
    assert_same_state(ours, theirs)


def test_what_fsdp_does_not_do_is_one_line(workdir, monkeypatch, capsys):
    from modelzoo import cli
    monkeypatch.chdir(workdir)
    ranks_params(workdir / "gmp.yaml", clip=1.0, sharding="fsdp",
                 extra={"sparsity": {"algorithm": "gmp", "density": 0.5, "end_step": 4}})
    assert cli.main(["CPU", "--params", "gmp.yaml", "--num_workers_per_node", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: sparsity.algorithm: gmp changes masks from whole tensors, which runconfig.sharding: fsdp does not "
        "hold; use static sparsity, sharding: none, or CSX")
    assert cli.main(["CSX", "--params", "fsdp.yaml"]) == 2
    assert "runconfig.sharding applies to CPU and GPU" in capsys.readouterr().err


def test_csx_reads_an_fsdp_checkpoint(workdir, two_ranks):
    """The one format: CSX's MemoryX takes an FSDP checkpoint's weights and optimizer state as they are."""
    from modelzoo.backends.csx import CSXBackend
    from modelzoo.config import load_params
    from modelzoo.models import build_model
    params = load_params(str(workdir / "fsdp_train.yaml"), {"model_dir": str(workdir / "csx")}, check_paths=False)
    state = checkpoint(two_ranks)
    with CSXBackend(params) as backend:
        backend.setup(build_model(params.model), params.optimizer)
        backend.load_state_dict(state, {"model", "optimizer"})
        assert_same_state(backend.state_dict(), state)


def test_fsdp_evaluates_a_checkpoint(workdir, one_rank, two_ranks):
    """mode eval: the model sharded without an optimizer, evaluated through the FSDP root."""
    run_py(workdir, "CPU", "--params", "fsdp.yaml", "--model_dir", "eval-only", "--mode", "eval", "--checkpoint_path",
           str(two_ranks / f"checkpoint_{RANKS_STEPS}.mdl"), "--num_workers_per_node", "2")
    for tag in ("loss", "accuracy"):
        assert_same_curve(scalars(workdir / "eval-only" / "eval", tag), scalars(one_rank / "eval", tag), [RANKS_STEPS])
