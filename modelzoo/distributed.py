"""Process groups for data parallelism (resident DDP and CSX SwarmX), on torch.distributed only.

``run.py`` asked for N ranks on one machine starts them itself through torch's elastic launcher
(``torchrun --standalone``); launched under an outer ``torchrun`` (one machine or many) it simply
joins the group that launcher describes in the environment. So a multi-node run needs no code:

    torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m modelzoo.cli CSX --params P --num_csx 2
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

# A dead peer must not hang the others: collectives fail after this long (issue: dead ranks).
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("MODELZOO_COLLECTIVE_TIMEOUT", "60")))
# set in the environment of the ranks that launch_local starts
LAUNCHED_BY_RUN_PY = "MODELZOO_LAUNCHED_BY_RUN_PY"
_created = False  # whether the process group up now is init_process_group's


def launched_world_size() -> int:
    """World size of the torchrun that started this process (1 when not under a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_local_world_size() -> int:
    """Processes the launcher started on this machine (1 when not under a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def init_process_group(device_type: str) -> tuple[int, int]:
    """Join the launcher's process group (gloo on CPU, NCCL on CUDA); returns (rank, world)."""
    global _created
    if launched_world_size() <= 1:
        return 0, 1
    if not dist.is_initialized():
        # On CUDA, small host-side reductions (token counts, eval totals) still travel over gloo.
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        _created = True
    return dist.get_rank(), dist.get_world_size()



def release_process_group() -> None:
    """Destroy the process group init_process_group created (and the groups made from it);
    never one that someone else set up. Idempotent."""
    global _created
    if _created and dist.is_initialized():
        dist.destroy_process_group()
    _created = False


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launch_local(num_processes: int, cli_args: list[str]) -> int:
    """Run ``python -m modelzoo.cli <cli_args>`` as num_processes ranks on this machine.

    The elastic agent watches the workers: if one dies the others are stopped and the exit code
    is non-zero, so a failure never leaves ranks waiting forever. A SIGTERM or SIGINT to this
    process is passed on to every rank (each cleans up after itself, e.g. its MemoryX files; the
    agent SIGKILLs one still running after 30 s) and then raised here as ``Interrupted``.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import get_args_parser, run
    from modelzoo.interrupts import Interrupted
    launcher_args = get_args_parser().parse_args([
        "--standalone", f"--nproc_per_node={num_processes}", "--max_restarts=0", "--monitor_interval=1",
        "--module", "modelzoo.cli", *cli_args])
    os.environ[LAUNCHED_BY_RUN_PY] = "1"  # the ranks leave the one-line summary to this process
    try:
        run(launcher_args)
    except SignalException as e:
        raise Interrupted(e.sigval) from None
    except Exception as e:  # ChildFailedError: the failing rank already printed its own error
        first = str(e).strip().splitlines()
        print(f"error: distributed run failed ({num_processes} ranks): "
              f"{first[0] if first else type(e).__name__}", flush=True)
        return 1
    finally:
        os.environ.pop(LAUNCHED_BY_RUN_PY, None)
    return 0


def cuda_device() -> torch.device:
    return torch.device("cuda", local_rank())


def exit_process(code: int) -> None:
    """End this process with ``code``. A rank of a distributed run (its work done, the backend
    closed, every file flushed) skips interpreter finalisation: gloo's worker threads may still be
    releasing tensors made in Python there (FSDP's all-gathers), which aborts the process
    ('terminate called without an active exception', SIGABRT) after the run succeeded."""
    if launched_world_size() <= 1:
        sys.exit(code)
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
