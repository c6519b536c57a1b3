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
from modelzoo.config import ModelConfig, OptimizerConfig
from modelzoo.errors import ConfigError
from modelzoo.models import build_model
from tests.conftest import tiny_params, write_params

REPO = Path(__file__).resolve().parents[1]
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
    cfg = ModelConfig(name="gpt2", hidden_size=16, num_hidden_layers=1, num_heads=2, max_position_embeddings=16,
                      mixed_precision=fp16_type is not None, fp16_type=fp16_type or "bfloat16")
    torch.manual_seed(0)
    backend = resident.gpu_backend()
    backend.setup(build_model(cfg), OptimizerConfig(learning_rate=0.01))
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


def run_gpu(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "run.py"), "GPU", "--params", "p.yaml", *args], cwd=tmp_path,
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
