"""Atomic checkpoints: a crash or a full disk mid-write never costs an earlier checkpoint, and a
truncated or corrupted one is detected by its seal, reported in one line and skipped, never loaded."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from modelzoo.errors import CheckpointError
import modelzoo.files
from modelzoo.training import checkpoint as ckpt
from tests.helpers import REPO, error_line, one_line_error, params_file, run_cli, tensorboard_scalars


def small_state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "step": step}


def files(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir())


def trained(tmp_path, shards, capsys, **runconfig) -> tuple[Path, Path]:
    """A tiny run to step 4 with checkpoints 2 and 4: (params, model_dir)."""
    params = params_file(tmp_path, shards, max_steps=4, **runconfig)
    code, _, err = run_cli(capsys, "CPU", "--params", params)
    assert code == 0, err
    model_dir = tmp_path / "model_dir"
    assert [s for s, _ in ckpt.list_checkpoints(model_dir)] == [2, 4]
    return params, model_dir


# ------------------------------------------------------------------ crash mid-write

SLOW_WRITER = textwrap.dedent("""
    import sys, time, torch
    import modelzoo.files
    from modelzoo.training import checkpoint as ckpt
    model_dir = sys.argv[1]
    ckpt.save_checkpoint(model_dir, 2, {"model": {"w": torch.ones(4)}, "step": 2})

    class SlowFile:  # a slow disk: the write of checkpoint 4 takes seconds, in small pieces
        def __init__(self, f): self.f = f
        def __enter__(self): return self
        def __exit__(self, *exc): self.f.close()
        def write(self, data):
            for i in range(0, len(data), 4096):
                self.f.write(data[i:i + 4096]); self.f.flush(); time.sleep(0.01)
        def __getattr__(self, name): return getattr(self.f, name)

    modelzoo.files.open = lambda path, mode: SlowFile(open(path, mode))  # what checkpoints write through
    ckpt.save_checkpoint(model_dir, 4, {"model": {"w": torch.randn(200_000)}, "step": 4})
""")


def test_kill_9_mid_write_leaves_the_previous_checkpoint(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(tmp_path)], cwd=REPO)
    tmp = tmp_path / "checkpoint_4.mdl.tmp"
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 0):
        assert child.poll() is None and time.monotonic() < deadline, "the slow write never started"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait(30) == -signal.SIGKILL
    assert files(tmp_path) == ["checkpoint_2.mdl", "checkpoint_2.mdl.sha256", "checkpoint_4.mdl.tmp"]
    assert ckpt.newest_good_checkpoint(tmp_path) == ckpt.checkpoint_path(tmp_path, 2)
    assert torch.equal(ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 2))["model"]["w"], torch.ones(4))
    ckpt.save_checkpoint(tmp_path, 6, small_state(6))
    ckpt.prune_checkpoints(tmp_path, keep=5)  # the next save tidies the orphan away
    assert files(tmp_path) == ["checkpoint_2.mdl", "checkpoint_2.mdl.sha256",
                               "checkpoint_6.mdl", "checkpoint_6.mdl.sha256"]


def test_interrupted_and_unsealed_writes_are_skipped(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("modelzoo"), "propagate", True)  # the CLI turns it off
    ckpt.save_checkpoint(tmp_path, 2, small_state(2))
    # killed after the data rename, before the seal: a complete-looking file with no seal
    ckpt.save_checkpoint(tmp_path, 4, small_state(4))
    ckpt.checkpoint_path(tmp_path, 4).with_suffix(".mdl.sha256").unlink()
    # killed while the seal of checkpoint 6 was being written
    ckpt.save_checkpoint(tmp_path, 6, small_state(6))
    seal = ckpt.checkpoint_path(tmp_path, 6).with_suffix(".mdl.sha256")
    seal.rename(seal.with_name(seal.name + ".tmp"))
    with caplog.at_level("WARNING", logger="modelzoo"):
        assert ckpt.newest_good_checkpoint(tmp_path) == ckpt.checkpoint_path(tmp_path, 2)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("\n" not in w and "seal" in w for w in warnings)
    assert "checkpoint_6.mdl" in warnings[0] and "checkpoint_4.mdl" in warnings[1]
    with pytest.raises(CheckpointError, match="checkpoint_4.mdl: no checkpoint_4.mdl.sha256"):
        ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 4))


def test_an_exception_mid_write_cleans_up(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 2, small_state(2))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def interrupted(fd):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the data are being flushed

    monkeypatch.setattr(ckpt.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, small_state(4))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ------------------------------------------------------------------ corrupted checkpoints

def test_truncated_checkpoint_is_reported_and_skipped(tmp_path, shards, capsys):
    params, model_dir = trained(tmp_path, shards, capsys)
    first_losses = tensorboard_scalars(model_dir / "train", "loss")
    newest = ckpt.checkpoint_path(model_dir, 4)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, e.g. by a full disk outside our control

    code, out, err = run_cli(capsys, "CPU", "--params", params, "--max_steps", 6)
    assert code == 0, err
    skipped = [line for line in out.splitlines() if "skipping" in line]
    assert len(skipped) == 1 and "checkpoint_4.mdl" in skipped[0] and "checksum mismatch" in skipped[0]
    assert "training gpt2 from step 2 to 6" in out  # resumed from the previous good one
    assert [s for s, _ in ckpt.list_checkpoints(model_dir)] == [2, 4, 6]
    assert ckpt.verify(newest) is None  # re-written whole
    redone = tensorboard_scalars(model_dir / "train", "loss")
    assert redone[3] == first_losses[3] and redone[4] == first_losses[4]  # steps 3-4 redone exactly


def test_flipped_byte_is_detected_and_never_loaded(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 2, small_state(2))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert ckpt.verify(path) == "sha256 checksum mismatch (truncated or corrupted)"
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert ckpt.newest_good_checkpoint(tmp_path) is None


def test_sealed_file_that_is_not_a_checkpoint(tmp_path):
    path = ckpt.checkpoint_path(tmp_path, 2)
    for content in (b"PK\x03\x04 not a torch file", None):
        if content is None:
            torch.save({"weights": torch.ones(2)}, path)  # a torch file, but not ours
        else:
            path.write_bytes(content)
        path.with_suffix(".mdl.sha256").write_text(ckpt.hashlib.sha256(path.read_bytes()).hexdigest())
        with pytest.raises(CheckpointError, match="checkpoint_2.mdl: (cannot be read|not a Model Zoo)"):
            ckpt.load_checkpoint(path)


def test_corrupt_explicit_checkpoint_path_is_a_one_line_error(tmp_path, shards, capsys):
    params, model_dir = trained(tmp_path, shards, capsys)
    corrupt = tmp_path / "elsewhere" / "checkpoint_4.mdl"
    corrupt.parent.mkdir()
    for suffix in ("", ".sha256"):
        corrupt.with_name(corrupt.name + suffix).write_bytes(
            ckpt.checkpoint_path(model_dir, 4).with_name("checkpoint_4.mdl" + suffix).read_bytes())
    corrupt.write_bytes(corrupt.read_bytes()[:-10])
    fresh = tmp_path / "fresh_dir"
    for mode in ("train", "eval"):
        line = one_line_error(capsys, "CPU", "--params", params, "--mode", mode, "--model_dir", fresh,
                              "--checkpoint_path", corrupt)
        assert str(corrupt) in line and "checksum mismatch" in line
    assert not fresh.exists()  # nothing written for a run that could not start


# ------------------------------------------------------------------ disk full, unwritable model_dir

def failing_open(fail_when: str, err: int):
    """open() for checkpoint.py whose writes fail with errno err once the path contains fail_when."""
    real_open = open

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:100])  # a part gets to disk, then the device is full
            raise OSError(err, os.strerror(err))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Failing(f) if fail_when in str(path) else f

    return fake_open


@pytest.mark.parametrize("fail_when", ["checkpoint_4.mdl.tmp", "checkpoint_4.mdl.sha256.tmp"])
def test_disk_full_mid_checkpoint(tmp_path, shards, capsys, monkeypatch, fail_when):
    # checkpoints are written through modelzoo.files.atomic_file
    monkeypatch.setattr(modelzoo.files, "open", failing_open(fail_when, errno.ENOSPC), raising=False)
    params = params_file(tmp_path, shards, max_steps=6)
    code, _, err = run_cli(capsys, "CPU", "--params", params)
    line = error_line(err)
    assert code == 2 and "checkpoint_4.mdl" in line and "No space left on device" in line
    model_dir = tmp_path / "model_dir"
    assert [n for n in files(model_dir) if n.startswith("checkpoint")] == \
        ["checkpoint_2.mdl", "checkpoint_2.mdl.sha256"]  # no partial, unsealed or temporary file
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(model_dir, 2))["step"] == 2

    monkeypatch.undo()  # space freed: the same command resumes from step 2
    code, out, err = run_cli(capsys, "CPU", "--params", params)
    assert code == 0 and "training gpt2 from step 2 to 6" in out, err


@pytest.mark.parametrize("where", ["main thread", "background update"])
def test_disk_full_under_memoryx_dir(tmp_path, shards, capsys, monkeypatch, where):
    """ENOSPC writing a disk MemoryX file after checkpoint_2: from the main thread (a gradient)
    or from MemoryX's background optimizer update of step 4, which the run meets when it takes
    checkpoint 4. One line, exit 2, checkpoint_2 as it was, no checkpoint_4, MemoryX files gone."""
    import threading

    from modelzoo.backends.csx import memoryx, store
    model_dir, mx = tmp_path / "model_dir", tmp_path / "mx"
    params = params_file(tmp_path, shards, max_steps=4)
    raw = yaml.safe_load(params.read_text())
    raw["runconfig"]["csx"] = {"memoryx": "disk", "memoryx_dir": str(mx)}
    params.write_text(yaml.safe_dump(raw))
    updates, real_write, real_start = [], store.write_all, memoryx.MemoryX.start_update
    saved = {}

    def start_update(self, *args):
        updates.append(1)
        return real_start(self, *args)

    def write_all(f, buffer):
        if ckpt.checkpoint_path(model_dir, 2).with_suffix(".mdl.sha256").exists() and not saved:
            saved.update({p.name: p.read_bytes() for p in model_dir.glob("checkpoint_2*")})
        background = threading.current_thread() is not threading.main_thread()
        if saved and background == (where == "background update") and (not background or len(updates) == 4):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(f, buffer)

    monkeypatch.setattr(store, "write_all", write_all)
    monkeypatch.setattr(memoryx.MemoryX, "start_update", start_update)
    code, _, err = run_cli(capsys, "CSX", "--params", params)
    line = error_line(err)
    assert code == 2 and line.startswith(f"error: runconfig.csx.memoryx_dir: cannot write disk MemoryX file {mx}/")
    assert "No space left on device" in line
    assert {p.name: p.read_bytes() for p in model_dir.glob("checkpoint_*")} == saved  # 2 untouched, no 4
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(model_dir, 2))["step"] == 2
    assert list(mx.rglob("*")) == []  # the run's MemoryX files removed on the way out


def test_unwritable_model_dir(tmp_path, shards, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    params = params_file(tmp_path, shards)
    line = one_line_error(capsys, "CPU", "--params", params, "--model_dir", blocker / "run")
    assert "runconfig.model_dir" in line and "cannot write" in line

    # an existing run whose directory became read-only (EROFS: even root cannot write)
    params, model_dir = trained(tmp_path, shards, capsys)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.name.startswith("checkpoint")}
    real_write_text = Path.write_text

    def read_only(self, *args, **kwargs):
        if self.parent == model_dir:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    line = one_line_error(capsys, "CPU", "--params", params, "--max_steps", 6)
    assert "Read-only file system" in line
    after = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.name.startswith("checkpoint")}
    assert after == before


def test_checkpoint_larger_than_ram_plus_swap_loads_through_a_shared_map(tmp_path, monkeypatch):
    """The kernel refuses a private map of a file larger than RAM + swap (a 30 GB GenSLM-2.5B
    checkpoint on a 24 GB machine): loading falls back to a shared map of the same file."""
    import mmap
    path = ckpt.save_checkpoint(tmp_path, 3, small_state(3))
    real_load, modes = torch.load, []

    def load(*args, **kwargs):
        modes.append(torch.serialization.get_default_mmap_options())
        if modes[-1] != mmap.MAP_SHARED:
            raise RuntimeError(f"unable to mmap 30399717937 bytes from file <{path}>: Cannot allocate memory (12)")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    state = ckpt.load_checkpoint(path)
    assert modes == [mmap.MAP_PRIVATE, mmap.MAP_SHARED] and state["step"] == 3
    assert torch.serialization.get_default_mmap_options() == mmap.MAP_PRIVATE  # restored afterwards
    # a file as large as RAM goes straight to the shared map (torch leaks the fd of a refused one)
    modes.clear()
    monkeypatch.setattr(ckpt, "_ram_bytes", lambda: path.stat().st_size)
    assert ckpt.load_checkpoint(path)["step"] == 3 and modes == [mmap.MAP_SHARED]
    # any other failure is still one line naming the file
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad zip")))
    with pytest.raises(CheckpointError, match="cannot be read as a checkpoint .*bad zip"):
        ckpt.load_checkpoint(path)
