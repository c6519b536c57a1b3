"""A rank killed in a 2-rank run (resident DDP and CSX --num_csx 2): the run ends non-zero with a
clear message well within 60 s (no rank left waiting in a collective), and re-running the same
command resumes from the last good checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from modelzoo.training import checkpoint as ckpt
from tests.helpers import run_py_command, steady_params, write_params

pytestmark = pytest.mark.distributed  # several processes (ranks, systems): `pytest -m "not distributed"` skips them

STEPS = 30


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in env:
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def start(tmp_path: Path, shards: Path, device: str, ranks_flag: str) -> tuple[subprocess.Popen, Path, list[str]]:
    model_dir = tmp_path / "model_dir"
    params = write_params(tmp_path / "params.yaml", steady_params(shards, model_dir, max_steps=STEPS))
    argv = run_py_command(device, "--params", params, ranks_flag, 2)
    out = open(tmp_path / "run.out", "ab")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env), model_dir, argv


@pytest.mark.parametrize("device, ranks_flag, victim", [("CPU", "--num_workers_per_node", 1),
                                                        ("CSX", "--num_csx", 0)])
def test_killed_rank_ends_the_run_and_rerun_resumes(tmp_path, shards, device, ranks_flag, victim):
    launcher, model_dir, argv = start(tmp_path, shards, device, ranks_flag)
    deadline = time.monotonic() + 240
    sealed = ckpt.checkpoint_path(model_dir, 2).with_suffix(".mdl.sha256")
    while not sealed.exists():
        assert launcher.poll() is None, (tmp_path / "run.out").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    workers = {rank_of(pid): pid for pid in children(launcher.pid)}
    assert set(workers) == {0, 1}, workers
    os.kill(workers[victim], signal.SIGKILL)
    killed_at = time.monotonic()

    code = launcher.wait(timeout=90)
    elapsed = time.monotonic() - killed_at
    output = (tmp_path / "run.out").read_text()
    assert code != 0 and elapsed < 60, f"exit {code} after {elapsed:.0f} s"
    assert "error: distributed run failed (2 ranks)" in output, output[-3000:]
    survivor = workers[1 - victim]
    assert not alive(survivor), "the surviving rank was left running"

    newest = ckpt.newest_good_checkpoint(model_dir)
    assert newest is not None
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    log = (model_dir / "run.log").read_text()
    starts = [int(s) for s in re.findall(rf"training gpt2 from step (\d+) to {STEPS}", log)]
    assert starts[0] == 0 and starts[-1] == int(newest.name.split("_")[1].split(".")[0]) >= 2, starts
    assert ckpt.verify(ckpt.checkpoint_path(model_dir, STEPS)) is None
