"""The inference tools (embed, score, mutations) on K processes per machine: ``--num_workers_per_node K``.

    python -m modelzoo.tools.score ... --num_workers_per_node 4                 # 4 processes here
    torchrun --nnodes 2 --nproc_per_node 8 ... -m modelzoo.tools.embed ...        # 16, on two machines

Asked for K processes outside any launcher, a tool starts them itself through torch's elastic
launcher (``torchrun --standalone``), each the same tool with the same flags; under an outer
``torchrun`` it joins the group the launcher describes. Every process reads the same input and
computes its share of the batches (``inference_batching``); process 0 alone writes the output,
in input order: the same bytes as one process. On CUDA each process takes the GPU of its local
rank. A user error is one line from process 0, exit code 2, nothing written.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from modelzoo import distributed
from modelzoo.entry import run_entry
from modelzoo.errors import ConfigError, UserError
from modelzoo.inference_batching import glibc

MAX_WORKERS = 1024
M_MMAP_THRESHOLD, MMAP_FROM = -3, 4 << 20  # glibc's mallopt parameter, and the size from which blocks are mmapped


def run_tool(args, module: str, argv: list[str], lead: Callable[[], str], follow: Callable[[], Iterable]) -> int:
    """A tool's main: ``lead()`` runs the tool and writes its output (one process, or process 0
    of a group); ``follow()`` gives the stream the other processes read to its end, computing
    their share and writing nothing."""
    workers = getattr(args, "num_workers_per_node", 1)
    _fixed_mmap_threshold()
    if not 1 <= workers <= MAX_WORKERS:
        return run_entry(_refuse(f"--num_workers_per_node {workers}: must be 1 to {MAX_WORKERS}"))
    if distributed.launched_world_size() <= 1:
        return run_entry(lead) if workers == 1 else launch(workers, module, argv)
    device = str(getattr(args, "device", "cpu"))
    if device == "cuda":  # each process its own GPU
        args.device = f"cuda:{distributed.local_rank()}"
    rank, _ = distributed.init_process_group("cuda" if device.startswith("cuda") else "cpu")
    try:
        if rank == 0:
            return run_entry(lead)
        try:
            for _ in follow():
                pass
        except UserError:  # process 0 reads the same input and model, and says what is wrong
            return 2
        return 0
    finally:
        distributed.release_process_group()


def _fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold whenever a large block is freed; the batches' buffers then
    come from the heap and fragment it, so that peak memory creeps up with the number of batches
    (bench/bench_inference.py: +29% at 10x the records). A fixed threshold returns every buffer
    of ``MMAP_FROM`` bytes or more to the system when freed: memory stays flat in the input, for
    about the same CPU time. (Set in the process the tool runs in; without glibc, nothing.)"""
    if glibc() is not None:
        glibc().mallopt(M_MMAP_THRESHOLD, MMAP_FROM)


def _refuse(message: str):
    def refuse():
        raise ConfigError(message)
    return refuse


def launch(workers: int, module: str, argv: list[str]) -> int:
    """Run ``python -m module argv`` as ``workers`` processes of one group on this machine; the
    exit code of the first that failed (process 0 has printed why), else 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:  # the cores shared out (torchrun would give each process one)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    launcher = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={workers}", "--max_restarts=0",
                                             "--monitor_interval=1", "--module", module, *argv])
    try:
        run(launcher)
    except ChildFailedError as e:
        codes = [failure.exitcode for _, failure in sorted(e.failures.items())]
        return next((code for code in codes if code > 0), 1)
    except SignalException as e:  # SIGTERM / SIGINT, passed on to every process: no output appears
        return 128 + int(e.sigval)
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
    return 0
