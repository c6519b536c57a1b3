"""The CSX backend (emulated weight streaming) against the resident CPU backend: same losses,
same checkpoints, disk MemoryX equal to RAM MemoryX, and a plan that refuses what cannot fit."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from modelzoo.cli import main as cli_main
from modelzoo.data.datasets import build_dataloader
from modelzoo.models import MODELS, build_model
from tests.helpers import CSX_SEQ, assert_close_curves, make_backend, make_params, train


@pytest.mark.parametrize("model_name", sorted(n for n in MODELS if n != "bert") + ["bert"] * ("bert" in MODELS))
def test_csx_loss_curve_equals_cpu(data_dir, model_name):
    """fp32, dropout, clipping, warm-up + cosine schedule, 2 micro-batches, each stage recomputed
    in backward: 20 steps agree."""
    params = make_params(data_dir, model_name, csx={"keep_activations": False})
    cpu, _ = train("cpu", params)
    csx, _ = train("csx", params)
    assert cpu[0][0] != cpu[-1][0]  # it trains
    assert_close_curves(cpu, csx)


@pytest.mark.parametrize("model_name", [name for name, spec in MODELS.items() if spec.hf.tied])
def test_kept_activations_equal_cpu_and_leave_no_weights_on_the_wafer(data_dir, model_name, monkeypatch):
    """keep_activations: no recompute, weights still stream in twice and are released between the
    passes; the loss curve is the resident one (tied weights, dropout, disk MemoryX included)."""
    params = make_params(data_dir, model_name, csx={"keep_activations": True, "memoryx": "disk"})
    released = []
    real_resize = torch.UntypedStorage.resize_
    monkeypatch.setattr(torch.UntypedStorage, "resize_",
                        lambda self, n: released.append(n) or real_resize(self, n))
    csx, _ = train("csx", params, steps=8)
    cpu, _ = train("cpu", params, steps=8)
    assert_close_curves(cpu, csx)
    assert released.count(0) == sum(n > 0 for n in released) > 0  # every release refilled once


def test_disk_memoryx_equals_ram_bit_for_bit(data_dir, tmp_path):
    ram, ram_backend = train("csx", make_params(data_dir, csx={"memoryx": "ram"}), steps=6)
    disk_params = make_params(data_dir, csx={"memoryx": "disk", "memoryx_dir": str(tmp_path / "mx"),
                                             "prefetch_depth": 2})
    disk, disk_backend = train("csx", disk_params, steps=6)
    assert ram == disk
    a, b = ram_backend.state_dict(), disk_backend.state_dict()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for name, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][name][key]), (name, key)
    files = list((tmp_path / "mx").rglob("*.bin"))
    assert files  # the state really lives on disk
    disk_backend.close()
    assert not list((tmp_path / "mx").rglob("*.bin"))


@pytest.mark.parametrize("first,second", [("csx", "cpu"), ("cpu", "csx")])
def test_checkpoints_cross_load(data_dir, first, second):
    """Train 3 steps on one backend, hand its state_dict to the other, train 3 more: the same
    as 6 steps on the first alone. Tied weights keep both of model.state_dict()'s keys."""
    params = make_params(data_dir, dropout=0.0)
    straight, _ = train(first, params, steps=6)
    _, a = train(first, params, steps=3)
    state = a.state_dict()
    assert set(state["model"]) == set(build_model(params.model).state_dict())
    b = make_backend(second, params)
    b.setup(build_model(params.model), params.optimizer)
    b.load_state_dict(copy.deepcopy(state), {"model", "optimizer"})  # backends may alias what they load
    for k, v in b.state_dict()["model"].items():
        assert torch.equal(v, state["model"][k]), k
    resumed, _ = train(second, params, steps=6, backend=b)
    # the data restarts from batch 0: compare with a run that saw the same batches
    expected = _continue(first, params, state)
    assert_close_curves(expected, resumed)


def _continue(kind, params, state):
    backend = make_backend(kind, params)
    backend.setup(build_model(params.model), params.optimizer)
    backend.load_state_dict(copy.deepcopy(state), {"model", "optimizer"})
    curve, _ = train(kind, params, steps=6, backend=backend)
    return curve


@pytest.mark.parametrize("keep", [True, False])
def test_mixed_precision_trains_close_to_cpu(data_dir, keep):
    params = make_params(data_dir, mixed=True, dropout=0.0, csx={"keep_activations": keep})
    cpu, _ = train("cpu", params, steps=5)
    csx, _ = train("csx", params, steps=5)
    assert_close_curves(cpu, csx, rel=3e-2)  # bf16 copies of the weights vs autocast: close, not equal


def test_eval_step_matches_cpu(data_dir):
    params = make_params(data_dir, dropout=0.0)
    cpu, cpu_backend = train("cpu", params, steps=2)
    csx, csx_backend = train("csx", params, steps=2)
    cfg = params.eval_input
    batch = next(iter(build_dataloader(cfg.data_dir, 2, shuffle=False, shuffle_seed=0, max_seq_length=CSX_SEQ)))
    a, b = cpu_backend.eval_step(batch), csx_backend.eval_step(batch)
    assert a["tokens"] == b["tokens"] and a["correct"] == b["correct"]
    assert math.isclose(a["loss_sum"], b["loss_sum"], rel_tol=1e-5)


def test_compile_only_prints_plan_and_refuses_oversize_stage(data_dir, tmp_path, capsys):
    import yaml
    params = make_params(data_dir, tmp=tmp_path / "m")
    raw = yaml.safe_load(params.to_yaml())
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["CSX", "--params", str(path), "--compile_only"]) == 0
    out = capsys.readouterr().out
    for words in ("CSX plan", "2 GPT2Block", "peak wafer memory", "MemoryX", "streamed per step",
                  "activations: kept on the wafer between forward and backward (auto: the plan that keeps them needs"):
        assert words in out
    raw["runconfig"]["csx"] = {"wafer_memory_gb": 1e-5}
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["CSX", "--params", str(path), "--compile_only"]) == 2
    err = capsys.readouterr().err
    assert "runconfig.csx.wafer_memory_gb: stage" in err and "GiB" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_plan_counts_kept_activations(data_dir):
    from modelzoo.backends.csx.plan import make_plan
    params = make_params(data_dir)
    model = build_model(params.model)
    plans = {keep: make_plan(model, (4, CSX_SEQ), 2, 1, 1, params.optimizer, keep_activations=keep)
             for keep in (False, True)}
    kept = sum(c.saved_bytes for c in plans[True].stages[:-1])
    assert kept > 0
    # the first stage's peak now holds every earlier-kept graph: all stages' but the last
    first = [p.stages[0] for p in (plans[False], plans[True])]
    assert first[1].peak_bytes == first[0].peak_bytes - first[0].saved_bytes + kept
    assert plans[True].peak.peak_bytes > plans[False].peak.peak_bytes


def _wafer_between_the_two_plans(params) -> float:
    """A wafer_memory_gb that the recompute plan fits and the plan keeping activations does not."""
    from modelzoo.backends.csx.plan import GiB, make_plan
    model = build_model(params.model)
    peaks = [make_plan(model, (2, CSX_SEQ), 2, 1, 1, params.optimizer, keep_activations=keep).peak.peak_bytes
             for keep in (False, True)]
    assert peaks[0] < peaks[1]
    return (peaks[0] + peaks[1]) / 2 / GiB


@pytest.mark.parametrize("wafer", ["default", "small"])
def test_auto_keeps_activations_when_they_fit(data_dir, tmp_path, wafer):
    """keep_activations auto (the default): kept when the plan keeping them fits the wafer, each
    stage recomputed in backward when only that fits; the run log says which and why, and either
    way the run trains like the resident backend."""
    import yaml
    csx = {} if wafer == "default" else {"wafer_memory_gb": _wafer_between_the_two_plans(make_params(data_dir))}
    params = make_params(data_dir, csx=csx, tmp=tmp_path / "m", max_steps=1)
    assert params.runconfig.csx.keep_activations == "auto"
    csx_curve, backend = train("csx", params, steps=5)
    cpu_curve, _ = train("cpu", params, steps=5)
    assert_close_curves(cpu_curve, csx_curve)
    kept = wafer == "default"
    assert backend.wafer.keep_activations is kept
    said = ("activations: kept on the wafer between forward and backward (auto: the plan that keeps them needs"
            if kept else "activations: recomputed in backward from each stage's input (auto: keeping them would "
                         f"need {backend.activations.split('need ')[1]}")
    assert said in backend.describe() and "GiB" in backend.describe()
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(params.to_yaml())))
    assert cli_main(["CSX", "--params", str(path)]) == 0
    assert said in (tmp_path / "m" / "run.log").read_text()  # the line that describes the run


def test_forced_keep_activations_is_said_and_the_recompute_plan_must_still_fit(data_dir):
    params = make_params(data_dir, csx={"keep_activations": False})
    backend = make_backend("csx", params)
    backend.setup(build_model(params.model), params.optimizer)
    assert not backend.wafer.keep_activations
    assert "activations: recomputed in backward from each stage's input (runconfig.csx.keep_activations: false)" \
        in backend.describe()
    backend.close()
    from modelzoo.errors import ConfigError
    with pytest.raises(ConfigError, match="runconfig.csx.wafer_memory_gb: stage"):  # auto falls back, then refuses
        make_backend("csx", make_params(data_dir, csx={"wafer_memory_gb": 1e-5})).setup(
            build_model(params.model), params.optimizer)


@pytest.mark.parametrize("memoryx", ["disk", "ram"])
def test_the_update_overlaps_the_next_forward(data_dir, tmp_path, memoryx):
    """MemoryX updates the stages in the background, in forward order, and the next step's
    forward of a stage waits only for that stage's update: stage 0 of step 2 computes while the
    last stage's update of step 1 is held back (released only once stage 0 has run: a
    synchronous update would time out here), and no stage computes on weights its update has not
    written. The losses are those of a run without the hold."""
    import threading
    params = make_params(data_dir, dropout=0.0, accum=1,
                         csx={"memoryx": memoryx, "memoryx_dir": str(tmp_path / "mx")})
    expected, _ = train("csx", params, steps=3)
    torch.manual_seed(params.runconfig.seed)
    backend = make_backend("csx", params)
    backend.setup(build_model(params.model), params.optimizer)
    stages = [set(backend.wafer.stage_names(i)) for i in range(len(backend.wafer.stages))]
    events, step, step_2_began, held = [], [0], threading.Event(), []
    train_step, run, write = backend.train_step, backend.wafer.run, backend.memoryx._write_stage

    def counted_step(*args):
        step[0] += 1
        return train_step(*args)

    def recorded_run(i, *args):
        events.append(("run", step[0], i))
        if step[0] == 2 and i == 0:
            step_2_began.set()
        return run(i, *args)

    def held_write(updated, names):
        if not held and names and set(names) <= stages[-1]:  # the first update's last stage
            held.append(step_2_began.wait(timeout=120))
        write(updated, names)
        events.append(("written", set(names)))

    backend.train_step, backend.wafer.run, backend.memoryx._write_stage = counted_step, recorded_run, held_write
    curve, _ = train("csx", params, steps=3, backend=backend)
    backend.close()
    assert curve == expected
    assert held == [True], "step 2's forward did not start before step 1's update had finished"
    first_run = {e[2]: k for k, e in reversed(list(enumerate(events))) if e[:2] == ("run", 2)}
    first_write = {name: k for k, e in reversed(list(enumerate(events))) if e[0] == "written" for name in e[1]}
    for i, names in enumerate(stages):  # step 1's update wrote each stage before step 2 computed with it
        assert max(first_write[name] for name in names) < first_run[i], i
    last = max(first_write[name] for name in stages[-1] - stages[0])
    assert last > first_run[0]  # ...and was still writing the last stage while step 2 computed stage 0
    assert backend.phase_seconds["optimizer_update"] > 0


def test_a_failed_update_is_raised_by_the_next_step_and_close_does_not_hang(data_dir, tmp_path):
    """An update fails in the background (e.g. the disk is full): the next step raises that error,
    so does every later access (MemoryX is half updated), and close() still stops the threads and
    removes the files."""
    import threading
    params = make_params(data_dir, dropout=0.0, csx={"memoryx": "disk", "memoryx_dir": str(tmp_path / "mx")})
    earlier = set(threading.enumerate())  # other tests' backends may still hold theirs
    _, backend = train("csx", params, steps=1)
    backend.memoryx.wait()  # step 1's update is done: the next one fails
    step, calls = backend.memoryx._step_stage, []

    def failing(loaded, lr, norm):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (injected)")
        return step(loaded, lr, norm)

    backend.memoryx._step_stage = failing
    train("csx", params, steps=1, backend=backend)  # its update runs after the step has returned
    with pytest.raises(OSError, match="injected"):
        train("csx", params, steps=1, backend=backend)
    with pytest.raises(OSError, match="injected"):
        backend.state_dict()
    backend.close(failed=True)
    assert not [t.name for t in set(threading.enumerate()) - earlier if t.name.startswith("memoryx")]
    assert not list((tmp_path / "mx").rglob("*.bin"))
