"""``python run.py {CPU,GPU,CSX} --params P [flags]``: the Model Zoo command line.

Flags override the yaml's runconfig. Every user error ends in one line on stderr and exit code 2,
before anything is written. SIGTERM and SIGINT end a run through its cleanup (the backend's
threads and disk MemoryX files), with one line on what survives and exit code 143 or 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from modelzoo.config import MODES, load_params
from modelzoo.distributed import LAUNCHED_BY_RUN_PY, launch_local, launched_world_size
from modelzoo.entry import OneLineParser, run_entry
from modelzoo.interrupts import Interrupted, signals_raise
from modelzoo.startup import validate

DEVICES = ("CPU", "GPU", "CSX")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run.py", description="Train or evaluate a genome language model.")
    p.add_argument("device", choices=DEVICES, help="CPU, GPU or CSX (emulated weight-streaming Cerebras system)")
    p.add_argument("--params", "-p", required=True, help="params yaml (train_input, eval_input, model, optimizer, runconfig)")
    p.add_argument("--mode", "-m", choices=MODES, help="what to run (default: runconfig.mode or train)")
    p.add_argument("--model_dir", "-o", help="checkpoints, TensorBoard events and logs go here")
    p.add_argument("--checkpoint_path", help="start from this checkpoint (default: the newest in model_dir)")
    p.add_argument("--load_checkpoint_states", help="states to load from --checkpoint_path: all, or a comma list of "
                                                    "model,optimizer,scheduler,dataloader,rng")
    p.add_argument("--num_steps", type=int, help="train this many steps in this invocation")
    p.add_argument("--max_steps", type=int, help="train until this global step")
    p.add_argument("--eval_steps", type=int, help="batches per evaluation")
    p.add_argument("--seed", type=int, help="seed for initialisation, dropout and masking")
    p.add_argument("--num_csx", type=int, help="CSX: number of systems (data-parallel ranks)")
    p.add_argument("--num_workers_per_node", type=int,
                   help="CPU/GPU: data-parallel processes to start on this machine (DDP; GPU: one per device)")
    p.add_argument("--validate_only", action="store_true", help="check params and build the model, then stop")
    p.add_argument("--compile_only", action="store_true",
                   help="build the model and print its execution plan (CSX: per-stage memory and streaming), then stop")
    return p


def overrides(args: argparse.Namespace) -> dict:
    keys = ("mode", "model_dir", "checkpoint_path", "load_checkpoint_states", "num_steps", "max_steps",
            "eval_steps", "seed", "num_csx", "num_workers_per_node")
    return {k: getattr(args, k) for k in keys}


def main(argv: list[str] | None = None) -> int:
    """SIGTERM or SIGINT ends the run through its cleanup (backend.close(): threads, disk
    MemoryX files), then one line says what survives; the exit code is 128 + the signal's number."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    args.run_model_dir = None  # known once the params are read
    with signals_raise() as received:
        try:
            code = run_entry(lambda: run(args))
        except Interrupted as e:
            signum = e.signum
        except BaseException:
            if not received:
                raise
            signum = received[0]  # what the interruption set off (e.g. a collective with a rank it stopped)
        else:
            if not received:
                return code
            signum = received[0]
    interrupted = Interrupted(signum)
    if reports_interruption():
        print(f"interrupted ({interrupted.name}){what_survives(args.run_model_dir)}", file=sys.stderr, flush=True)
    return interrupted.exit_code


def reports_interruption() -> bool:
    """One line per run: from run.py itself, not from the ranks it started; under an outer
    launcher, from rank 0."""
    if os.environ.get(LAUNCHED_BY_RUN_PY) and launched_world_size() > 1:
        return False
    return int(os.environ.get("RANK", "0")) == 0


def what_survives(model_dir: Path | None) -> str:
    if model_dir is None:
        return ""
    from modelzoo.training.checkpoint import list_checkpoints, verify
    for step, path in reversed(list_checkpoints(model_dir)):
        if verify(path) is None:
            return f": the newest sealed checkpoint is {path} (step {step}); running the same command again resumes " \
                   f"from it"
    return ": no checkpoint was written yet; running the same command again starts over"


def run(args: argparse.Namespace) -> int:
    """argv's params -> the Trainer, which owns the run's start-up (trainer.Trainer.from_params).
    The first process of a run prepares missing data and, for several ranks on this machine,
    starts them (they re-read the same params)."""
    params = load_params(args.params, overrides(args))
    args.run_model_dir = Path(params.runconfig.model_dir)
    only_plan = "validate" if args.validate_only else "compile" if args.compile_only else None
    first = only_plan is None and launched_world_size() == 1
    if first:
        ranks = validate(params, args.device, args.params)
        from data_preparation.first_use import ensure_prepared
        ensure_prepared(params)
        if ranks > 1:
            return launch_local(ranks, sys.argv[1:] if args.argv is None else args.argv)
    from modelzoo.trainer import Trainer
    with Trainer.from_params(params, args.device, args.params, only_plan, validated=first) as trainer:
        if only_plan:
            print(trainer.describe_plan(compile_only=args.compile_only))
            return 0
        return trainer.run()


if __name__ == "__main__":  # how run.py's --num_workers_per_node / --num_csx ranks start
    from modelzoo.distributed import exit_process
    exit_process(main())
