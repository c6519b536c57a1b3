"""Backends have a lifecycle (issue 13): close() (or the backend as a context manager) stops their
threads and removes their disk MemoryX files on success, on error and on SIGTERM, and the CLI
always calls it; a MemoryX directory of a killed run is removed at the next start, one MemoryX
did not create never is; a sharded disk checkpoint streams each owner's tensors to the writer
one at a time; an unwritable memoryx_dir is one line, exit 2."""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from modelzoo.backends.csx import CSXBackend
from modelzoo.backends.csx.store import OWNER_MARKER, DiskStore
from modelzoo.backends.resident import ResidentBackend
from modelzoo.config import validate_params
from modelzoo.interrupts import Interrupted, raise_if_interrupted, signals_raise
from modelzoo.models import build_model
from modelzoo.training import checkpoint as ckpt
from modelzoo.trainer import split_micro_batches
from tests.helpers import REPO, one_line_error, run_cli, run_py_command, steady_params, write_params

STEPS = 8


def disk_params(tmp_path: Path, shards: Path, **runconfig) -> dict:
    params = steady_params(shards, tmp_path / "model_dir", **{"max_steps": STEPS, "checkpoint_steps": 2, **runconfig})
    params["runconfig"]["csx"] = {"memoryx": "disk", "memoryx_dir": str(tmp_path / "mx")}
    return params


def leftovers(memoryx_dir: Path) -> list[Path]:
    return sorted(memoryx_dir.rglob("*")) if memoryx_dir.exists() else []


_EARLIER_THREADS: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _threads_of_earlier_tests():
    """Threads other tests' backends left running are not this test's to account for."""
    _EARLIER_THREADS.clear()
    _EARLIER_THREADS.update(threading.enumerate())


def memoryx_threads() -> list[str]:
    """MemoryX threads started during this test and still running."""
    return [t.name for t in threading.enumerate() if t.name.startswith("memoryx") and t not in _EARLIER_THREADS]


def interrupted_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("interrupted")]


def run_until_first_checkpoint_then(sig: int, tmp_path: Path, argv: list[str]) -> tuple[int, str, str]:
    """Start ``argv``, send ``sig`` once the first checkpoint is sealed; (exit code, stdout, stderr)."""
    out, err = open(tmp_path / "run.out", "wb"), open(tmp_path / "run.err", "wb")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
    sealed = ckpt.checkpoint_path(tmp_path / "model_dir", 2).with_suffix(".mdl.sha256")
    deadline = time.monotonic() + 240
    while not sealed.exists():
        assert proc.poll() is None, (tmp_path / "run.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    out.close(), err.close()
    return code, (tmp_path / "run.out").read_text(), (tmp_path / "run.err").read_text()


def assert_resumable_line(stderr: str, model_dir: Path, name: str = "SIGTERM") -> int:
    """Exactly one 'interrupted' line, naming the newest sealed checkpoint; returns its step."""
    lines = interrupted_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    newest = ckpt.newest_good_checkpoint(model_dir)
    assert lines[0].startswith(f"interrupted ({name}): the newest sealed checkpoint is {newest} (step "), lines
    assert lines[0].endswith("); running the same command again resumes from it"), lines
    return int(re.search(r"\(step (\d+)\)", lines[0]).group(1))


# ------------------------------------------------------------ SIGTERM through the CLI

def test_sigterm_removes_memoryx_files_and_the_same_command_resumes(tmp_path, shards):
    argv = run_py_command("CSX", "--params", write_params(tmp_path / "params.yaml", disk_params(tmp_path, shards)))
    code, _, stderr = run_until_first_checkpoint_then(signal.SIGTERM, tmp_path, argv)
    assert code == 143, stderr[-3000:]
    step = assert_resumable_line(stderr, tmp_path / "model_dir")
    assert step >= 2
    assert leftovers(tmp_path / "mx") == []

    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (tmp_path / "model_dir" / "run.log").read_text()
    assert re.findall(rf"training gpt2 from step (\d+) to {STEPS}", log) == ["0", str(step)]
    assert ckpt.verify(ckpt.checkpoint_path(tmp_path / "model_dir", STEPS)) is None
    assert leftovers(tmp_path / "mx") == []


@pytest.mark.distributed
def test_sigterm_on_two_systems_each_removes_its_files_and_the_sharded_checkpoint_streamed(tmp_path, shards):
    """--num_csx 2 (torch's elastic launcher passes SIGTERM on to both ranks): exit 143, one line,
    no MemoryX file of either system left. The step-2 checkpoint, whose second system's half
    streamed to the writer one tensor at a time, equals bit for bit the one rank 0 writes of the
    same run with RAM MemoryX, which it gathers whole."""
    params = disk_params(tmp_path, shards, max_steps=40)
    argv = run_py_command("CSX", "--params", write_params(tmp_path / "params.yaml", params), "--num_csx", 2)
    code, stdout, stderr = run_until_first_checkpoint_then(signal.SIGTERM, tmp_path, argv)
    assert code == 143, stdout[-2000:] + stderr[-3000:]
    assert_resumable_line(stderr, tmp_path / "model_dir")
    assert leftovers(tmp_path / "mx") == []

    # what rank 0 held of rank 1's tensors: one at a time, never more than a stage
    log = (tmp_path / "model_dir" / "run.log").read_text()
    streamed = re.search(r"checkpoint: (\d+) tensors, ([\d,]+) bytes, streamed from 1 other system one at a time "
                         r"\(at most ([\d,]+) bytes of them held at once\)", log)
    assert streamed, log
    total, peak = (int(streamed.group(i).replace(",", "")) for i in (2, 3))
    cfg = validate_params(params)
    with torch.device("meta"):
        model = build_model(cfg.model)
    largest_stage = max(sum(p.numel() * 4 for p in stage.parameters()) for stage in model.stages())
    largest_tensor = max(p.numel() * 4 for p in model.parameters())
    assert 0 < peak <= largest_tensor <= largest_stage < total

    # the same run with RAM MemoryX, whose state rank 0 gathers whole and writes itself
    ram = {**params, "runconfig": {**params["runconfig"], "model_dir": str(tmp_path / "ram"), "csx": {}}}
    proc = subprocess.run(run_py_command("CSX", "--params", write_params(tmp_path / "ram.yaml", ram), "--num_csx", 2,
                                         "--max_steps", 2),
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "model_dir", 2))
    b = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "ram", 2))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, values in a["optimizer"]["state"].items():
        assert values.keys() == b["optimizer"]["state"][name].keys(), name
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][name][key])), (name, key)


def test_sigterm_before_the_first_checkpoint_in_process(tmp_path, shards, capsys, monkeypatch):
    """The handler turns SIGTERM into an exception wherever it lands (here inside a step): close()
    runs, the line says nothing survives, and the previous handler is back afterwards."""
    real_step = CSXBackend.train_step

    def terminated_step(self, micro_batches, lr):
        metrics = real_step(self, micro_batches, lr)
        os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(CSXBackend, "train_step", terminated_step)
    before = signal.getsignal(signal.SIGTERM)
    params = write_params(tmp_path / "params.yaml", disk_params(tmp_path, shards))
    code, _, err = run_cli(capsys, "CSX", "--params", params)
    assert code == 143
    assert interrupted_lines(err) == ["interrupted (SIGTERM): no checkpoint was written yet; running the same "
                                      "command again starts over"], err
    assert leftovers(tmp_path / "mx") == [] and memoryx_threads() == []
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------ errors end through close()

def test_an_exception_in_training_still_removes_the_files_and_stops_the_threads(tmp_path, shards, capsys,
                                                                               monkeypatch):
    real_step, seen = CSXBackend.train_step, []

    def failing_step(self, micro_batches, lr):
        seen.append(sorted(p.name for p in leftovers(tmp_path / "mx")))
        if len(seen) == 3:
            raise RuntimeError("boom")
        return real_step(self, micro_batches, lr)

    monkeypatch.setattr(CSXBackend, "train_step", failing_step)
    params = write_params(tmp_path / "params.yaml", disk_params(tmp_path, shards))
    with pytest.raises(RuntimeError, match="boom"):
        run_cli(capsys, "CSX", "--params", params)
    assert any(name.endswith(".bin") for name in seen[-1])  # MemoryX was on disk while it trained
    assert leftovers(tmp_path / "mx") == []
    assert memoryx_threads() == []


def test_close_is_idempotent_and_the_backend_is_a_context_manager(tmp_path, shards):
    cfg = validate_params(disk_params(tmp_path, shards))
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, 69, (4, 64)), "labels": torch.randint(5, 69, (4, 64)),
             "attention_mask": torch.ones(4, 64, dtype=torch.long)}
    with CSXBackend(cfg) as backend:
        backend.setup(build_model(cfg.model), cfg.optimizer)
        backend.train_step(split_micro_batches(batch, 1), 1e-3)
        assert any(p.suffix == ".bin" for p in leftovers(tmp_path / "mx"))
        assert memoryx_threads()  # the prefetch thread
    assert leftovers(tmp_path / "mx") == [] and memoryx_threads() == []
    backend.close()
    backend.close(failed=True)

    never_set_up = CSXBackend(cfg)  # close() before (or after a failed) setup
    never_set_up.close()
    never_set_up.close()

    resident = ResidentBackend("cpu")
    with resident:
        resident.setup(build_model(cfg.model), cfg.optimizer)
        resident.train_step(split_micro_batches(batch, 1), 1e-3)
    resident.close()


# ------------------------------------------------------------ directories of killed runs

def killed_run_dir(memoryx_dir: Path) -> Path:
    """The MemoryX directory a SIGKILLed process leaves (no handler runs)."""
    code = ("import os, sys, torch\n"
            "from modelzoo.backends.csx.store import DiskStore\n"
            "store = DiskStore(sys.argv[1], prefix='rank0-')\n"
            "store.put('w/x', torch.ones(4))\n"
            "os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(memoryx_dir)], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    (left,) = memoryx_dir.iterdir()
    assert (left / OWNER_MARKER).is_file() and list(left.glob("*.bin"))
    return left


def test_a_killed_runs_memoryx_dir_goes_at_the_next_start_and_nothing_else(tmp_path, shards, capsys):
    mx = tmp_path / "mx"
    stale = killed_run_dir(mx)
    unmarked = mx / "rank0-not-ours"  # no marker: MemoryX did not create it (or an older version did)
    unmarked.mkdir()
    (unmarked / "000001.bin").write_bytes(b"keep")
    live = DiskStore(mx, prefix="rank0-")  # a run of this (live) process
    other_host = mx / "rank0-otherhost"  # a run on another machine sharing the directory
    other_host.mkdir()
    marker = json.loads((live.directory / OWNER_MARKER).read_text())
    (other_host / OWNER_MARKER).write_text(json.dumps({**marker, "host": "elsewhere", "pid": 1 << 22}))
    (other_host / "000001.bin").write_bytes(b"keep")
    stale_with_foreign_file = mx / "rank0-stale-but-shared"  # a killed run's, where someone put a file
    stale_with_foreign_file.mkdir()
    (stale_with_foreign_file / OWNER_MARKER).write_text((stale / OWNER_MARKER).read_text())
    (stale_with_foreign_file / "000001.bin").write_bytes(b"ours")
    (stale_with_foreign_file / "notes.txt").write_text("someone else's")

    params = write_params(tmp_path / "params.yaml", disk_params(tmp_path, shards))
    code, _, err = run_cli(capsys, "CSX", "--params", params, "--max_steps", 1)
    assert code == 0, err
    assert not stale.exists()
    assert f"removed {stale}: disk MemoryX of process" in (tmp_path / "model_dir" / "run.log").read_text()
    assert (unmarked / "000001.bin").read_bytes() == b"keep"
    assert (other_host / "000001.bin").read_bytes() == b"keep"
    assert live.directory.is_dir() and (live.directory / OWNER_MARKER).is_file()
    # only MemoryX's own files go; the directory, its marker and the stranger stay
    assert sorted(p.name for p in stale_with_foreign_file.iterdir()) == [OWNER_MARKER, "notes.txt"]
    live.close()
    assert not live.directory.exists()


# ------------------------------------------------------------ one-line errors

def test_unwritable_memoryx_dir_is_one_line_and_writes_nothing(tmp_path, shards, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    params = disk_params(tmp_path, shards)
    params["runconfig"]["csx"]["memoryx_dir"] = str(blocker / "mx")
    line = one_line_error(capsys, "CSX", "--params", write_params(tmp_path / "params.yaml", params))
    assert line.startswith(f"error: runconfig.csx.memoryx_dir: cannot write disk MemoryX files to {blocker / 'mx'} ")
    assert not (tmp_path / "model_dir").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "params.yaml"]


# ------------------------------------------------------------ signals as exceptions

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_raises_interrupted_once_and_the_handlers_come_back(sig, code):
    before = signal.getsignal(sig)
    with signals_raise() as received:
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler runs at the next bytecode: this never completes
        os.kill(os.getpid(), sig)  # while cleaning up: recorded, not raised
        with pytest.raises(Interrupted):  # a loop that is still running is told again
            raise_if_interrupted()
    assert caught.value.exit_code == code and received == [sig, sig]
    assert signal.getsignal(sig) is before
    raise_if_interrupted()  # outside: nothing pending


def test_a_signal_in_a_finalizer_is_raised_by_the_loop():
    class Holder:
        pass

    with signals_raise() as received:
        holder = Holder()
        weakref.finalize(holder, os.kill, os.getpid(), signal.SIGTERM)
        del holder
        gc.collect()
        assert received == [signal.SIGTERM]  # the finalizer would have swallowed the exception
        with pytest.raises(Interrupted):
            raise_if_interrupted()
