"""The GPU backend. Tests marked ``cuda`` need a CUDA device and skip cleanly without one; the
rest check, on any machine, what a user without (enough) GPUs is told."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelzoo import cli
from modelzoo.backends import resident
from modelzoo.config import OptimizerConfig
from modelzoo.errors import ConfigError
from tests import helpers
from tests.helpers import REPO, assert_close_curves, make_params, tiny_model, tiny_params, train, write_params

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


def params_file(shards: Path, tmp_path: Path, **model) -> Path:
    params = tiny_params(shards, tmp_path / "model_dir", max_steps=3)
    params["model"].update(model)
    return write_params(tmp_path / "p.yaml", params)


# ------------------------------------------------------------ without a GPU

@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_without_cuda_is_one_clear_line(shards_msl64, tmp_path, monkeypatch, capsys):
    params = params_file(shards_msl64, tmp_path)
    for extra in ([], ["--num_workers_per_node", "2"]):
        assert cli.main(["GPU", "--params", str(params), *extra]) == 2
        err = capsys.readouterr().err
        assert err == "error: GPU: no CUDA device is visible (torch.cuda.is_available() is False); use CPU\n"
    assert not (tmp_path / "model_dir").exists()


def test_more_workers_than_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    resident.check_cuda_devices(1)
    with pytest.raises(ConfigError, match="2 workers on this machine need 2 CUDA devices but 1 are visible"):
        resident.check_cuda_devices(2)


# ------------------------------------------------------------ on a GPU

def tiny_backend(fp16_type=None) -> resident.ResidentBackend:
    model = tiny_model(hidden_size=16, num_hidden_layers=1, num_heads=2, max_position_embeddings=16,
                       mixed_precision=fp16_type is not None, fp16_type=fp16_type or "bfloat16")
    backend = resident.gpu_backend()
    backend.setup(model, OptimizerConfig(learning_rate=0.01))
    return backend


def cpu_batch():
    ids = torch.randint(5, 69, (4, 16))
    labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


@cuda
def test_gpu_backend_uses_the_local_rank_device_with_tf32():
    backend = tiny_backend()
    assert backend.device == torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    moved = backend._to_device(cpu_batch())
    assert all(v.device == backend.device for v in moved.values())


@cuda
@pytest.mark.parametrize("fp16_type", [None, "bfloat16", "float16"])
def test_gpu_train_step_in_each_precision(fp16_type):
    backend = tiny_backend(fp16_type)
    assert (backend.loss_scaler is not None) == (fp16_type == "float16")
    before = {k: v.clone() for k, v in backend.state_dict()["model"].items()}
    metrics = backend.train_step([cpu_batch(), cpu_batch()], lr=0.01)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    after = backend.state_dict()["model"]
    assert all(v.device.type == "cpu" for v in after.values())  # checkpoints hold host tensors
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert backend.eval_step(cpu_batch())["tokens"] == 4 * 15


def run_gpu(tmp_path: Path, *args: str, device: str = "GPU") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "run.py"), device, "--params", "p.yaml", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


@cuda
def test_run_py_gpu_trains_and_checkpoints(shards_msl64, tmp_path):
    params_file(shards_msl64, tmp_path, mixed_precision=True, fp16_type="float16")
    done = run_gpu(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model_dir" / "checkpoint_3.mdl").exists()
    assert "resident on cuda:0, float16 autocast, dynamic loss scaling" in (tmp_path / "model_dir" / "run.log").read_text()


@two_gpus
def test_run_py_gpu_data_parallel_over_nccl(shards_msl64, tmp_path):
    params_file(shards_msl64, tmp_path, mixed_precision=True)
    done = run_gpu(tmp_path, "--num_workers_per_node", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    log = (tmp_path / "model_dir" / "run.log").read_text()
    assert "data parallel over 2 ranks (cpu:gloo,cuda:nccl)" in log
    assert (tmp_path / "model_dir" / "checkpoint_3.mdl").exists()


# ------------------------------------------------------------ the CSX wafer on a GPU (csx.wafer_device)

from modelzoo.backends.csx.link import Link, check_wafer_device  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_csx_cuda_wafer_without_cuda_is_one_clear_line(shards_msl64, tmp_path, capsys):
    path = write_params(tmp_path / "p.yaml", tiny_params(shards_msl64, tmp_path / "model_dir",
                                                         csx={"wafer_device": "cuda"}))
    assert cli.main(["CSX", "--params", str(path)]) == 2
    assert capsys.readouterr().err == ("error: runconfig.csx.wafer_device: cuda, but no CUDA device is visible "
                                       "(torch.cuda.is_available() is False); use wafer_device: cpu\n")
    assert not (tmp_path / "model_dir").exists()
    assert cli.main(["CSX", "--params", str(path), "--compile_only"]) == 0  # the plan needs no GPU
    assert "CSX weight streaming: 1 system(s), wafer on cuda:0" in capsys.readouterr().out


def test_more_csx_systems_than_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_wafer_device("cuda", 1)
    check_wafer_device("cpu", 8)
    with pytest.raises(ConfigError, match="cuda: 2 systems on this machine need 2 CUDA devices but 1 are visible"):
        check_wafer_device("cuda", 2)


def test_a_cpu_wafer_link_hands_tensors_through():
    """wafer_device: cpu runs the very code a CUDA wafer runs, with a link that moves nothing."""
    link, weights = Link(torch.device("cpu")), {"w": torch.ones(2)}
    assert link.ready(link.to_wafer(weights)) is weights
    assert link.to_host(weights)() is weights and link.batch(weights) is weights and link.in_flight == 0


def test_an_explicit_cpu_wafer_equals_the_default(data_dir, tmp_path):
    default, _ = train("csx", make_params(data_dir, tmp=tmp_path / "a"), steps=3)
    explicit, backend = train("csx", make_params(data_dir, csx={"wafer_device": "cpu"}, tmp=tmp_path / "b"), steps=3)
    assert backend.wafer.device == torch.device("cpu") and default == explicit


@pytest.fixture
def ieee_fp32(monkeypatch):
    """fp32 matmuls without TF32 (gpu_backend turns it on for the whole process)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")


@cuda
@pytest.mark.parametrize("csx", [{}, {"keep_activations": False}, {"prefetch_depth": 0},
                                 {"memoryx": "disk", "prefetch_depth": 2}], ids=["ram", "recompute", "depth0", "disk"])
def test_csx_on_cuda_equals_csx_on_cpu(data_dir, tmp_path, ieee_fp32, csx):
    """fp32, clipping, 2 micro-batches, tied weights: the wafer on the GPU (weights in and gradients
    out on streams of their own) follows the CPU wafer's losses and gradient norms."""
    on_cpu, cpu_backend = train("csx", make_params(data_dir, dropout=0.0, csx=csx, tmp=tmp_path / "cpu"), steps=8)
    on_gpu, gpu_backend = train("csx", make_params(data_dir, dropout=0.0, csx={**csx, "wafer_device": "cuda"},
                                                   tmp=tmp_path / "gpu"), steps=8)
    assert gpu_backend.wafer.device.type == "cuda" and gpu_backend.link.in_flight == 1
    assert_close_curves(on_cpu, on_gpu, rel=1e-4)
    a, b = cpu_backend.state_dict()["model"], gpu_backend.state_dict()["model"]
    for k in a:
        assert b[k].device.type == "cpu"
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    for backend in (cpu_backend, gpu_backend):
        backend.close()


@cuda
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16"])
def test_csx_on_cuda_with_dropout_equals_the_gpu_backend(data_dir, tmp_path, ieee_fp32, mixed, monkeypatch):
    """Dropout draws from the GPU's generator; the wafer restores it for each recomputed stage, so
    its masks are the resident GPU backend's."""
    params = make_params(data_dir, dropout=0.1, mixed=mixed, csx={"wafer_device": "cuda"}, tmp=tmp_path)
    on_wafer, backend = train("csx", params, steps=6)
    monkeypatch.setattr(helpers, "make_backend", lambda kind, params: resident.ResidentBackend("cuda"))
    on_device, _ = train("gpu", params, steps=6)
    # bf16: the wafer gets every weight in bf16 (norms included), autocast only the matmuls'
    assert_close_curves(on_device, on_wafer, rel=2e-2 if mixed else 1e-4)
    assert backend.eval_step(next(iter(eval_batches(params))))["tokens"] > 0
    backend.close()


def eval_batches(params):
    from modelzoo.data.datasets import build_dataloader, dataset_for
    cfg = params.eval_input
    cls, kwargs = dataset_for(params.model, cfg, params.runconfig.seed)
    return build_dataloader(cfg.data_dir, cfg.batch_size, shuffle=False, shuffle_seed=0,
                            max_seq_length=cfg.max_seq_length, dataset_cls=cls, dataset_kwargs=kwargs)


@cuda
def test_run_py_csx_on_a_gpu_trains_and_checkpoints(shards_msl64, tmp_path):
    write_params(tmp_path / "p.yaml", tiny_params(shards_msl64, tmp_path / "model_dir",
                                                  csx={"wafer_device": "cuda", "memoryx": "disk"}))
    done = run_gpu(tmp_path, device="CSX")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wafer on cuda:0" in (tmp_path / "model_dir" / "run.log").read_text()
    assert (tmp_path / "model_dir" / "checkpoint_6.mdl").exists()


@two_gpus
def test_run_py_csx_two_systems_on_two_gpus(shards_msl64, tmp_path):
    write_params(tmp_path / "p.yaml", tiny_params(shards_msl64, tmp_path / "model_dir", csx={"wafer_device": "cuda"}))
    done = run_gpu(tmp_path, "--num_csx", "2", device="CSX")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "model_dir" / "checkpoint_6.mdl").exists()
