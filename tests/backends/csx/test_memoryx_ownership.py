"""Who may remove a disk MemoryX directory (issue 25): only a sweep that can prove the owner gone.

The owner marker carries host, boot id, PID namespace, PID and the process's start time. The
sweep at a run's start removes a directory only when its owner is provably gone on this host
(the machine booted since; or same boot and PID namespace and the PID free or reused); another
namespace (a container with host networking), another host or a marker of an earlier version is
left with one warning line; a symbolic link under memoryx_dir is never entered.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelzoo.backends.csx import store
from modelzoo.backends.csx.store import OWNER_MARKER, DiskStore, remove_stale_dirs
from tests.helpers import REPO

FREE_PID = (1 << 22) + 12345  # above Linux's pid_max: no process has it


@pytest.fixture
def warnings():
    """The warning lines the sweep logs (the modelzoo logger does not propagate to pytest's)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("modelzoo")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def our_marker() -> dict:
    return {"owner": "modelzoo disk MemoryX", "version": 2, "host": store._HOST, "boot_id": store._boot_id(),
            "pid_namespace": store._pid_namespace(), "pid": os.getpid(), "started": store._process_start(os.getpid())}


def run_dir(memoryx_dir: Path, name: str, **marker) -> Path:
    """A MemoryX directory as a DiskStore leaves it, with the marker fields given."""
    d = memoryx_dir / name
    d.mkdir(parents=True)
    (d / OWNER_MARKER).write_text(json.dumps({**our_marker(), **marker}))
    (d / "000001.bin").write_bytes(b"tensor")
    return d


def test_the_marker_says_which_boot_namespace_and_process(tmp_path):
    live = DiskStore(tmp_path / "mx")
    try:
        marker = json.loads((live.directory / OWNER_MARKER).read_text())
        assert marker == our_marker()
        assert marker["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert marker["pid_namespace"] == os.stat("/proc/self/ns/pid").st_ino
        fields = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
        assert marker["started"] == fields[19]  # field 22 of the whole line: starttime
    finally:
        live.close()


def test_only_provably_gone_owners_lose_their_directory(tmp_path, warnings):
    mx = tmp_path / "mx"
    other_start = str(int(store._process_start(os.getpid())) + 1)
    gone = {
        "pid_free": run_dir(mx, "rank0-pid-free", pid=FREE_PID),
        "pid_reused": run_dir(mx, "rank0-pid-reused", started=other_start),  # our PID, another start
        "rebooted": run_dir(mx, "rank0-rebooted", boot_id="00000000-0000-0000-0000-000000000000"),
    }
    kept_silently = {"alive": run_dir(mx, "rank0-alive")}  # this very process
    kept_with_warning = {
        "namespace": run_dir(mx, "rank0-other-namespace", pid=FREE_PID, pid_namespace=1),
        "host": run_dir(mx, "rank0-other-host", pid=FREE_PID, host="elsewhere"),
        "old": run_dir(mx, "rank0-old-format", pid=FREE_PID, boot_id=None, pid_namespace=None, version=None),
    }
    for d in kept_with_warning.values():  # drop the keys an earlier version did not write
        marker = json.loads((d / OWNER_MARKER).read_text())
        (d / OWNER_MARKER).write_text(json.dumps({k: v for k, v in marker.items() if v is not None}))

    removed = remove_stale_dirs(mx)
    assert sorted(d for d, _ in removed) == sorted(gone.values())
    assert not any(d.exists() for d in gone.values())
    for d in [*kept_silently.values(), *kept_with_warning.values()]:
        assert (d / "000001.bin").read_bytes() == b"tensor" and (d / OWNER_MARKER).is_file()
    assert len(warnings) == len(kept_with_warning)
    for key, why in [("namespace", "another PID namespace"), ("host", "host 'elsewhere'"),
                     ("old", "earlier version")]:
        d = kept_with_warning[key]
        (line,) = [w for w in warnings if str(d) in w]
        assert line.startswith(f"left {d}: ") and why in line and "\n" not in line


def test_a_live_run_in_another_pid_namespace_keeps_its_directory(tmp_path, warnings):
    """A real second PID namespace (unshare, as a container has): its run's PID means another
    process here (PID 1 exists here too, started at another time), so only the namespace tells."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    code = ("import sys, torch\n"
            "from modelzoo.backends.csx.store import DiskStore\n"
            "store = DiskStore(sys.argv[1], prefix='rank0-')\n"
            "store.put('w/x', torch.ones(4))\n"
            "print(store.directory, flush=True)\n"
            "sys.stdin.read()\n"  # alive until the test closes stdin
            "store.close()\n")
    mx = tmp_path / "mx"
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code, str(mx)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line:
            pytest.skip(f"cannot make a PID namespace here: {proc.stderr.read().strip()[:200]}")
        theirs = Path(line)
        marker = json.loads((theirs / OWNER_MARKER).read_text())
        assert marker["pid_namespace"] != store._pid_namespace() and marker["boot_id"] == store._boot_id()
        assert remove_stale_dirs(mx) == []
        assert list(theirs.glob("*.bin")) and "another PID namespace" in warnings[0]
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert not theirs.exists()  # its owner removed it when done


def test_the_sweep_never_follows_a_symbolic_link(tmp_path, warnings):
    """A link in memoryx_dir to a directory with a dead owner's marker is not entered; a link
    inside a dead owner's directory is removed as a link, its target kept; a marker that is a
    link is not read."""
    mx, elsewhere = tmp_path / "mx", tmp_path / "elsewhere"
    target = run_dir(elsewhere, "victim", pid=FREE_PID)
    mx.mkdir()
    (mx / "rank0-link").symlink_to(target, target_is_directory=True)
    precious = elsewhere / "precious.bin"
    precious.write_bytes(b"keep")
    dead = run_dir(mx, "rank0-dead", pid=FREE_PID)
    (dead / "000002.bin").symlink_to(precious)
    linked_marker = mx / "rank0-linked-marker"
    linked_marker.mkdir()
    (linked_marker / OWNER_MARKER).symlink_to(target / OWNER_MARKER)
    (linked_marker / "000001.bin").write_bytes(b"tensor")

    removed = remove_stale_dirs(mx)
    assert [d for d, _ in removed] == [dead]
    assert (target / "000001.bin").read_bytes() == b"tensor" and (mx / "rank0-link").is_symlink()
    assert precious.read_bytes() == b"keep"
    assert (linked_marker / "000001.bin").read_bytes() == b"tensor"
    assert warnings == []


def test_a_memoryx_dir_that_is_itself_a_link_is_swept(tmp_path):
    """memoryx_dir may be the user's link to a larger disk: followed once, nothing under it."""
    real = tmp_path / "big_disk"
    dead = run_dir(real, "rank0-dead", pid=FREE_PID)
    (tmp_path / "mx").symlink_to(real, target_is_directory=True)
    assert [d.name for d, _ in remove_stale_dirs(tmp_path / "mx")] == [dead.name] and not dead.exists()
    live = DiskStore(tmp_path / "mx")
    live.put("w/x", torch.ones(2))
    live.close()
    assert list(real.iterdir()) == []
