"""Exact resume: a run killed with SIGKILL and re-run with the same command continues bit for bit.

On the CPU and on the CSX backend (one system, MemoryX in RAM). Dropout is on (0.1) and the data are shuffled, so the loss only matches when the model, the
optimizer, the schedule step, the dataloader position and the RNG states are all restored.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
import torch

from modelzoo.training import checkpoint as ckpt
from tests.helpers import run_py_command, steady_params, tensorboard_scalars, write_params

STEPS = 20


def start(tmp_path, name: str, shards, device: str):
    model_dir = tmp_path / name
    params = write_params(tmp_path / f"{name}.yaml", steady_params(shards, model_dir, max_steps=STEPS))
    log = open(tmp_path / f"{name}.out", "ab")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two runs share the cores
    proc = subprocess.Popen(run_py_command(device, "--params", params), stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    return proc, model_dir


def wait_for(path, proc, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended (code {proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.mark.parametrize("device", ["CPU", "CSX"])
def test_kill_9_then_rerun_resumes_bit_for_bit(tmp_path, shards, device):
    reference, ref_dir = start(tmp_path, "reference", shards, device)
    killed, run_dir = start(tmp_path, "killed", shards, device)
    # Kill as soon as the second checkpoint file shows up: possibly mid-write of its seal,
    # possibly mid-step. Either way the newest *good* checkpoint must be found.
    wait_for(ckpt.checkpoint_path(run_dir, 4), killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(60) == -signal.SIGKILL
    assert reference.wait(120) == 0

    rerun, _ = start(tmp_path, "killed", shards, device)  # the very same command
    assert rerun.wait(120) == 0, (tmp_path / "killed.out").read_text()[-2000:]

    log = (run_dir / "run.log").read_text()
    resumed_from = [int(s) for s in re.findall(rf"training gpt2 from step (\d+) to {STEPS}", log)]
    assert len(resumed_from) == 2 and resumed_from[0] == 0 and resumed_from[1] >= 2, log

    ref_loss = tensorboard_scalars(ref_dir / "train", "loss")
    run_loss = tensorboard_scalars(run_dir / "train", "loss")
    assert sorted(ref_loss) == sorted(run_loss) == list(range(1, STEPS + 1))
    mismatched = [s for s in ref_loss if ref_loss[s] != run_loss[s]]
    assert not mismatched, f"loss differs from step {mismatched[0]} (resumed at {resumed_from[1]})"

    ref_state = ckpt.load_checkpoint(ckpt.checkpoint_path(ref_dir, STEPS))
    run_state = ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, STEPS))
    for name, tensor in ref_state["model"].items():
        assert torch.equal(tensor, run_state["model"][name]), name
    for name, slots in ref_state["optimizer"]["state"].items():
        for slot, value in slots.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(run_state["optimizer"]["state"][name][slot]))
    assert ref_state["dataloader"] == run_state["dataloader"]
