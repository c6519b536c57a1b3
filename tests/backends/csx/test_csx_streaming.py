"""Disk MemoryX larger than RAM: checkpoints stream tensor by tensor from MemoryX snapshots into
torch.save's own format (sealed like any checkpoint, loadable by every backend), snapshots do
not change under later updates, a memory-mapped checkpoint loads back exactly, and a model built
on the meta device is initialised tensor by tensor to the values building it in RAM gives."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys

import pytest
import torch
import yaml

from modelzoo.backends.csx.deferred_init import build_deferred
from modelzoo.backends.csx.streamed_state import StreamedState
from modelzoo.models import MODELS, build_model
from modelzoo.training import checkpoint as ckpt
from tests.helpers import assert_close_curves, make_backend, make_params, train


def save(directory, step, state):
    directory.mkdir(parents=True, exist_ok=True)
    state.update(step=step)
    return ckpt.save_checkpoint(directory, step, state)


def disk_params(data_dir, tmp_path, **kw):
    return make_params(data_dir, dropout=0.0, csx={"memoryx": "disk", "memoryx_dir": str(tmp_path / "mx")}, **kw)


def test_streamed_checkpoint_equals_in_memory_one(data_dir, tmp_path):
    _, ram = train("csx", make_params(data_dir, dropout=0.0), steps=3)
    _, disk = train("csx", disk_params(data_dir, tmp_path), steps=3)
    streamed = disk.state_dict()
    assert isinstance(streamed, StreamedState)
    path = save(tmp_path / "a", 3, streamed)
    assert ckpt.verify(path) is None  # sealed: the digest taken while streaming matches the file
    reference = save(tmp_path / "b", 3, ram.state_dict())
    a, b = ckpt.load_checkpoint(path), ckpt.load_checkpoint(reference)
    assert a.keys() == b.keys()
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for name, state in b["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(a["optimizer"]["state"][name][key]), torch.as_tensor(value)), (name, key)
    disk.close()


def test_snapshot_is_unchanged_by_later_updates(data_dir, tmp_path):
    params = disk_params(data_dir, tmp_path)
    _, backend = train("csx", params, steps=2)
    state = backend.state_dict()
    before = {k: v.clone() for k, v in state["model"].items()}
    train("csx", params, steps=2, backend=backend)
    after = backend.state_dict()["model"]
    assert any(not torch.equal(after[k], before[k]) for k in before)  # training went on...
    for k, v in state["model"].items():
        assert torch.equal(v, before[k]), k  # ...but the snapshot still holds the old weights
    loaded = ckpt.load_checkpoint(save(tmp_path / "ck", 2, state))
    for k in before:
        assert torch.equal(loaded["model"][k], before[k]), k
    assert list((tmp_path / "mx").rglob("*.snapshot*"))
    del state, after
    gc.collect()
    assert not list((tmp_path / "mx").rglob("*.snapshot*"))  # old versions go with the state
    backend.close()


def test_streamed_checkpoint_resumes_on_cpu_and_on_disk_memoryx(data_dir, tmp_path):
    """Save after 3 steps with disk MemoryX, load the (memory-mapped) file into the CPU backend
    and into a fresh disk MemoryX: both continue exactly like the run that never stopped."""
    params = disk_params(data_dir, tmp_path)
    _, first = train("csx", params, steps=3)
    state = first.state_dict()
    path = save(tmp_path / "ck", 3, state)
    expected, _ = train("csx", params, steps=4, backend=first)
    for kind in ("csx", "cpu"):
        backend = make_backend(kind, params)
        backend.setup(build_model(params.model), params.optimizer)
        backend.load_state_dict(ckpt.load_checkpoint(path), {"model", "optimizer"})
        resumed, _ = train(kind, params, steps=4, backend=backend)
        assert_close_curves(expected, resumed)


def test_loading_leaves_the_callers_state_intact(data_dir, tmp_path):
    """Releasing the pages of a loaded tensor never changes it (also for ordinary memory)."""
    params = disk_params(data_dir, tmp_path)
    _, source = train("csx", make_params(data_dir, dropout=0.0), steps=2)
    state = copy.deepcopy(source.state_dict())
    kept = copy.deepcopy(state)
    backend = make_backend("csx", params)
    backend.setup(build_model(params.model), params.optimizer)
    backend.load_state_dict(state, {"model", "optimizer"})
    for k, v in kept["model"].items():
        assert torch.equal(state["model"][k], v), k
        assert torch.equal(backend.state_dict()["model"][k], v), k
    backend.close()


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_deferred_init_equals_building_in_ram(data_dir, model_name):
    """Built on meta and replayed tensor by tensor: the same values and the same RNG state after
    as building in RAM, with at most a stage's parameters in RAM at once for stage-ordered inits."""
    cfg = make_params(data_dir, model_name).model
    torch.manual_seed(3)
    eager = build_model(cfg)
    rng_after = torch.get_rng_state()
    torch.manual_seed(3)
    model, deferred = build_deferred(build_model, cfg)
    assert deferred is not None and all(p.is_meta for p in model.parameters())
    values = dict(deferred.replay())
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert values.keys() == dict(eager.named_parameters()).keys()
    for name, p in eager.named_parameters():
        assert torch.equal(values[name], p), name
    if model_name == "gptj":  # initialised in stage order: one stage's tensors at a time
        assert deferred.peak_live <= max(len(list(s.parameters())) for s in eager.stages())


def test_deferred_build_trains_like_the_eager_one(data_dir, tmp_path):
    params = disk_params(data_dir, tmp_path, model_name="gptj")
    eager, _ = train("csx", params, steps=3)
    torch.manual_seed(params.runconfig.seed)
    backend = make_backend("csx", params)
    model = backend.build_model(build_model, params.model)
    assert all(p.is_meta for p in model.parameters())
    backend.setup(model, params.optimizer)
    deferred, _ = train("csx", params, steps=3, backend=backend)
    assert deferred == eager
    backend.close()


@pytest.mark.distributed
def test_two_systems_with_disk_memoryx_checkpoint_mid_run(data_dir, tmp_path):
    """A save in the middle of a 2-system run: the systems that do not write wait for the writer
    (a long barrier, not the collective timeout) and the run goes on; both checkpoints load."""
    params = make_params(data_dir, dropout=0.0, batch=4, accum=2, tmp=tmp_path / "model", log_steps=1,
                         max_steps=4, checkpoint_steps=2,
                         csx={"memoryx": "disk", "memoryx_dir": str(tmp_path / "mx")})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(params.to_yaml())))
    proc = subprocess.run([sys.executable, "run.py", "CSX", "--params", str(path), "--num_csx", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for step in (2, 4):
        state = ckpt.load_checkpoint(tmp_path / "model" / f"checkpoint_{step}.mdl")
        assert state["step"] == step and state["optimizer"]["state"]
