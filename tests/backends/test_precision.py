"""model.mixed_precision_on_cpu: with mixed_precision, 'auto' (the default) computes in fp16_type
on a CPU that multiplies matrices faster in it than in fp32 and in fp32 on one that does not, and
says which in one log line; true and false force either; GPUs (and a CSX wafer on a GPU) keep the
config as it is. The measured figure is replaced in the tests of the decision, so they hold on any
CPU; one test checks the measurement itself."""

import pytest
import yaml
import torch

from modelzoo import cli, startup
from modelzoo.backends import base, resident
from modelzoo.backends.precision import decide
from modelzoo.config import ModelConfig, validate_params
from modelzoo.models import layers
from tests.helpers import tiny_config, tiny_params, write_params

FORCE = "model.mixed_precision_on_cpu: true computes in bfloat16 anyway"


def config(**fields) -> ModelConfig:
    return tiny_config(**fields)


@pytest.fixture
def speedup(monkeypatch):
    """speedup(x): this CPU multiplies matrices at x times its fp32 rate in bf16/fp16, from now on."""
    return lambda x: monkeypatch.setattr(layers, "cpu_matmul_speedup", lambda dtype: x)


@pytest.mark.parametrize("fp16_type", ["bfloat16", "float16"])
def test_auto_computes_in_fp32_where_low_precision_is_slower(speedup, fp16_type):
    speedup(0.52)
    cfg = config(mixed_precision=True, fp16_type=fp16_type)
    decided, note = base.precision_on(cfg, "cpu")
    assert not decided.mixed_precision and decided.compute_dtype == torch.float32
    assert note == (f"model.mixed_precision: computing in float32, not {fp16_type}, on this CPU: its {fp16_type} "
                    f"matmuls measured 0.52x the float32 rate (model.mixed_precision_on_cpu: true computes in "
                    f"{fp16_type} anyway)")
    assert cfg.mixed_precision  # the params themselves (written to model_dir, saved in checkpoints) keep it
    assert decided.model_copy(update={"mixed_precision": True}) == cfg  # nothing else changed


def test_auto_keeps_low_precision_where_it_is_faster(speedup):
    speedup(2.3)
    cfg = config(mixed_precision=True)
    decided, note = base.precision_on(cfg, "cpu")
    assert decided is cfg
    assert note == ("model.mixed_precision: computing in bfloat16 on this CPU: its bfloat16 matmuls measured 2.30x "
                    "the float32 rate (model.mixed_precision_on_cpu: false computes in float32)")


def test_true_and_false_force_either_whatever_the_cpu(speedup):
    for measured in (0.5, 2.0):
        speedup(measured)
        forced = config(mixed_precision=True, mixed_precision_on_cpu=True)
        assert base.precision_on(forced, "cpu") == (forced, None)
        decided, note = base.precision_on(config(mixed_precision=True, mixed_precision_on_cpu=False), "cpu")
        assert not decided.mixed_precision and note.endswith("model.mixed_precision_on_cpu is false")


@pytest.mark.parametrize("measured", [0.5, 2.0])
@pytest.mark.parametrize("setting", ["auto", True, False])
def test_gpus_and_fp32_configs_are_left_as_they_are(speedup, measured, setting):
    speedup(measured)
    gpu = config(mixed_precision=True, mixed_precision_on_cpu=setting)
    assert base.precision_on(gpu, "cuda") == (gpu, None)
    fp32 = config(mixed_precision_on_cpu=setting)
    assert base.precision_on(fp32, "cpu") == (fp32, None)


def test_where_the_math_happens():
    params = lambda wafer: validate_params({"model": config().model_dump(),  # noqa: E731
                                            "runconfig": {"csx": {"wafer_device": wafer}}}, check_paths=False)
    assert startup.compute_device("GPU", params("cpu")) == "cuda"
    assert startup.compute_device("CPU", params("cpu")) == "cpu"
    assert startup.compute_device("CSX", params("cpu")) == "cpu"
    assert startup.compute_device("CSX", params("cuda")) == "cuda"


def test_the_measurement_is_real_and_leaves_the_run_alone(monkeypatch):
    """Real fp32 and bf16 products even under fake tensors, the meta device and autocast (a memory
    plan's forward may be the first to ask), without drawing from the run's random streams; once
    per process."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(layers, "cpu_matmul_speedups", {})
    rng = torch.get_rng_state()
    with FakeTensorMode(), torch.device("meta"), torch.autocast("cpu", dtype=torch.bfloat16):
        measured = layers.cpu_matmul_speedup(torch.bfloat16)
    # a real ratio, not a fake tensor's: AMX Xeons measure above 20x
    assert 0.05 < measured < 100 and torch.equal(torch.get_rng_state(), rng)
    assert layers.cpu_matmul_speedups == {torch.bfloat16: measured}
    assert layers.cpu_matmul_speedup(torch.bfloat16) == measured


def autocast_dtypes(monkeypatch) -> list:
    """The dtype every training and eval step of the resident backend autocasts to (None: fp32)."""
    seen = []

    def spy(device_type, cfg):
        context = base.autocast(device_type, cfg)
        seen.append(getattr(context, "fast_dtype", None))
        return context
    monkeypatch.setattr(resident, "autocast", spy)
    return seen


@pytest.mark.parametrize("forced", [False, True])
def test_run_py_cpu_follows_the_decision(shards_msl64, tmp_path, monkeypatch, speedup, forced):
    speedup(0.5)
    seen = autocast_dtypes(monkeypatch)
    raw = tiny_params(shards_msl64, tmp_path / "run", max_steps=2, checkpoint_steps=0, mode="train")
    raw["model"].update(mixed_precision=True, **({"mixed_precision_on_cpu": True} if forced else {}))
    assert cli.main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", raw))]) == 0
    log = (tmp_path / "run" / "run.log").read_text()
    if forced:
        assert set(seen) == {torch.bfloat16} and "resident on cpu, bfloat16 autocast" in log
        assert "computing in float32" not in log
    else:
        assert set(seen) == {None} and "on resident on cpu\n" in log
        assert sum(FORCE in line for line in log.splitlines()) == 1  # one line says so, and how to force it
    assert "mixed_precision: true" in (tmp_path / "run" / "params_train.yaml").read_text()  # the params as given


def test_compile_only_plans_what_the_run_computes_in(shards_msl64, tmp_path, speedup, capsys):
    """The memory plan of mixed precision decided away is the fp32 plan (no low-precision copies)."""
    speedup(0.5)
    outputs = []
    for mixed in (True, False):
        raw = tiny_params(shards_msl64, tmp_path / "run")
        raw["model"]["mixed_precision"] = mixed
        assert cli.main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", raw)), "--compile_only"]) == 0
        outputs.append(capsys.readouterr().out.splitlines())
    decided, fp32 = outputs
    assert any(FORCE in line for line in decided)
    assert [line for line in decided if FORCE not in line] == fp32
    assert "memory plan per rank" in "\n".join(fp32)


def test_ranks_settle_on_one_figure(monkeypatch):
    """With several ranks the figure is their mean, and attention's auto is decided by that figure too."""
    monkeypatch.setattr(layers, "cpu_matmul_speedups", {torch.bfloat16: 0.9})  # this rank measured 0.9
    monkeypatch.setattr(base, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(base.dist, "all_reduce", lambda total: total.add_(1.3))  # the other rank measured 1.3
    decided, note = base.precision_on(config(mixed_precision=True), "cpu")
    assert decided.mixed_precision and "measured 1.10x" in note
    assert layers.cpu_matmul_speedups == {torch.bfloat16: 0.9}  # this rank's measurement, not written over
    assert decide(config(mixed_precision=True, mixed_precision_on_cpu=True), "cpu")[0].attention_in_fp32 is False


@pytest.mark.parametrize("measured", [0.5, 2.0])
@pytest.mark.parametrize("forced", [False, True])
def test_decide_leaves_no_auto(speedup, measured, forced):
    """Before the model is built every 'auto' is a boolean: attention computes in fp32 only where
    low precision runs and its matmuls are slower on this CPU."""
    speedup(measured)
    cfg = config(mixed_precision=True, **({"mixed_precision_on_cpu": True} if forced else {}))
    decided, _ = decide(cfg, "cpu")
    assert decided.mixed_precision is (forced or measured > 1.0)
    assert decided.attention_in_fp32 is (forced and measured <= 1.0)
    assert decided.attention_in_fp32 is layers.attention_in_fp32("auto", torch.device("cpu"), decided.compute_dtype)
    assert decide(cfg, "cuda") == (cfg.model_copy(update={"attention_in_fp32": False}), None)
    assert decide(config(attention_in_fp32=True), "cpu")[0].attention_in_fp32 is True


def test_model_dir_says_what_ran(shards_msl64, tmp_path, speedup):
    speedup(0.5)
    raw = tiny_params(shards_msl64, tmp_path / "run", max_steps=1, checkpoint_steps=0, mode="train")
    raw["model"]["mixed_precision"] = True
    assert cli.main(["CPU", "--params", str(write_params(tmp_path / "p.yaml", raw))]) == 0
    written = (tmp_path / "run" / "params_train.yaml").read_text()
    assert written.endswith("# as run on this device: model.mixed_precision: false, "
                            "model.attention_in_fp32: false\n")
    assert validate_params(yaml.safe_load(written), check_paths=False).model.mixed_precision  # still loads as given
