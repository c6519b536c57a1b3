"""``python run.py {CPU,GPU,CSX} --params P [flags]``: the Model Zoo command line.

Flags override the yaml's runconfig. Every user error ends in one line on stderr and exit code 2,
before anything is written. SIGTERM and SIGINT end a run through its cleanup (the backend's
threads and disk MemoryX files), with one line on what survives and exit code 143 or 130.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

import torch

from modelzoo.config import MODES, Params, load_params
from modelzoo.distributed import LAUNCHED_BY_RUN_PY, launch_local, launched_local_world_size, launched_world_size
from modelzoo.entry import OneLineParser, run_entry
from modelzoo.errors import ConfigError
from modelzoo.interrupts import Interrupted, signals_raise

log = logging.getLogger("modelzoo")
DEVICES = ("CPU", "GPU", "CSX")
# How the resident backends' memory plan (backends/memory_plan.py) ends when it does not fit.
RESIDENT_PLAN_DOES_NOT_FIT = "does not fit with these params"


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
    params = load_params(args.params, overrides(args))
    args.run_model_dir = Path(params.runconfig.model_dir)
    only_plan = args.validate_only or args.compile_only
    ranks = ranks_requested(args.device, params, check_devices=not only_plan)
    if args.device == "CSX" and not args.validate_only:  # --compile_only and a run refuse alike
        from modelzoo.backends.memory_plan import check_memoryx_fits
        here = launched_local_world_size() if launched_world_size() > 1 else ranks  # the systems of this host
        check_memoryx_fits(params, args.params, here)
    if not (args.validate_only or args.compile_only) and launched_world_size() == 1:
        from data_preparation.first_use import ensure_prepared
        ensure_prepared(params)
    if ranks > 1 and launched_world_size() == 1 and not (args.validate_only or args.compile_only):
        # Validated once here; the ranks re-read the same params and fail the same way if at all.
        check_batch_split(args.params, params, ranks)
        return launch_local(ranks, sys.argv[1:] if args.argv is None else args.argv)
    if launched_world_size() > 1:
        check_launched_ranks(args.device, params, ranks)
    # closed however the run ends (an error, SIGTERM): its threads stop, its files go
    with make_backend(args.device, params, only_plan) as backend:
        torch.manual_seed(params.runconfig.seed)
        from modelzoo.backends.precision import decide
        from modelzoo.models import build_model
        # every precision 'auto' decided for this device: the model is built with the config it computes in
        model_cfg, precision_note = decide(params.model, compute_device(args.device, params))
        if only_plan:
            with torch.device("meta"):  # shapes only: 25B plans instantly
                model = build_model(model_cfg)
        else:
            model = backend.build_model(build_model, model_cfg)
        if only_plan:
            if args.validate_only:
                check_data(params, backend)
            ranks_planned = max(ranks, launched_world_size())
            print(summary(params, model, backend, args.compile_only, ranks_planned, precision_note))
            return 0
        return execute(params, model, backend, precision_note)


def compute_device(device: str, params: Params) -> str:
    """Where the run's math happens: 'cuda' for GPU and for a CSX wafer on a GPU, else 'cpu'."""
    on_gpu = device == "GPU" or (device == "CSX" and params.runconfig.csx.wafer_device == "cuda")
    return "cuda" if on_gpu else "cpu"


def ranks_requested(device: str, params: Params, check_devices: bool = True) -> int:
    """Data-parallel ranks to start on this machine: --num_csx systems on CSX, --num_workers_per_node
    processes on CPU/GPU (default 1)."""
    run = params.runconfig
    if device == "CSX":
        if run.num_workers_per_node is not None:
            raise ConfigError("--num_workers_per_node applies to CPU and GPU; CSX takes --num_csx")
        if run.activation_checkpointing:
            raise ConfigError("runconfig.activation_checkpointing applies to CPU and GPU; the CSX wafer recomputes "
                              "each stage when its activations do not fit (runconfig.csx.keep_activations)")
        if run.sharding != "none":
            raise ConfigError("runconfig.sharding applies to CPU and GPU; CSX keeps weights and optimizer state in "
                              "MemoryX, sharded by stage across --num_csx systems")
        if check_devices:  # a CUDA wafer: one GPU per system on this machine
            from modelzoo.backends.csx.link import check_wafer_device
            here = launched_local_world_size() if launched_world_size() > 1 else run.num_csx
            check_wafer_device(run.csx.wafer_device, here)
        return run.num_csx
    sparsity = params.sparsity if run.mode in ("train", "train_and_eval") else None
    if run.sharding == "fsdp" and sparsity is not None and sparsity.algorithm != "static":
        raise ConfigError(f"sparsity.algorithm: {sparsity.algorithm} changes masks from whole tensors, which "
                          f"runconfig.sharding: fsdp does not hold; use static sparsity, sharding: none, or CSX")
    if run.num_csx != 1:
        raise ConfigError("--num_csx applies to the CSX device only; CPU and GPU take --num_workers_per_node")
    ranks = run.num_workers_per_node or 1
    if device == "GPU" and check_devices:
        from modelzoo.backends.resident import check_cuda_devices
        check_cuda_devices(ranks)
    return ranks


def check_launched_ranks(device: str, params: Params, ranks: int) -> None:
    """Under torchrun, the ranks it started must be those the params ask for (CPU/GPU without
    --num_workers_per_node take whatever it started, on any number of nodes)."""
    if device == "CSX":
        launched, what = launched_world_size(), "WORLD_SIZE"
    elif params.runconfig.num_workers_per_node is None:
        return
    else:
        launched, what = launched_local_world_size(), "LOCAL_WORLD_SIZE"
    if launched != ranks:
        raise ConfigError(f"launched with {what}={launched} but the params ask for {ranks} ranks")


def check_batch_split(source: str, params: Params, ranks: int) -> None:
    """Each rank gets batch_size / ranks sequences: refuse before starting ranks that would all fail."""
    mode = params.runconfig.mode
    used = [name for name, needed in (("train_input", mode in ("train", "train_and_eval")),
                                      ("eval_input", mode != "train")) if needed]
    for name in used:
        batch = getattr(params, name).batch_size
        if batch % ranks:
            raise ConfigError(f"{source}: {name}.batch_size: {batch} is not divisible by the {ranks} "
                              f"data-parallel ranks")
    if "train_input" in used and (params.train_input.batch_size // ranks) % params.optimizer.grad_accum_steps:
        raise ConfigError(f"{source}: optimizer.grad_accum_steps: {params.optimizer.grad_accum_steps} does not "
                          f"divide the per-rank batch size {params.train_input.batch_size // ranks}")


def check_data(params: Params, backend) -> None:
    """--validate_only opens the shards the run would read (manifests, shapes, tokenizer and
    max_seq_length against the params; not every shard's checksum). Sections still to be prepared
    on first use have nothing to check yet."""
    from modelzoo.trainer import Trainer
    sections = [params.train_input, params.eval_input]
    if any(s is not None and s.prepare is not None and not Path(s.data_dir).is_dir() for s in sections):
        return
    Trainer(params, backend, Path(params.runconfig.model_dir)).open_datasets(params.runconfig.mode, verify=False)


def make_backend(device: str, params: Params, only_plan: bool = False):
    """The backend of this rank. ``only_plan`` (--validate_only, --compile_only): nothing runs, so
    no process group is joined and a GPU plan needs no GPU."""
    if device == "CSX":
        from modelzoo.backends.csx import csx_backend
        return csx_backend(params)
    from modelzoo.backends.resident import ResidentBackend, cpu_backend, gpu_backend
    recompute, sharding = params.runconfig.activation_checkpointing, params.runconfig.sharding
    if only_plan:
        return ResidentBackend("cuda" if device == "GPU" else "cpu", recompute, sharding)
    return gpu_backend(recompute, sharding) if device == "GPU" else cpu_backend(recompute, sharding)


def summary(params: Params, model, backend, compile_only: bool, ranks: int = 1,
            precision_note: str | None = None) -> str:
    n = sum(p.numel() for p in model.parameters())
    lines = [f"params OK: {params.model.name}, {n:,} parameters ({n * 4 / 2**20:.1f} MiB fp32), "
             f"backend {backend.describe()}", *params.notes]
    if precision_note:
        lines.append(precision_note)
    plan = backend.plan(model, params, ranks) if compile_only else None
    if plan:
        lines.append(plan)
    verdict = plan.splitlines()[-1] if plan else ""
    if verdict.startswith(RESIDENT_PLAN_DOES_NOT_FIT):
        # as CSX refuses a stage its wafer cannot hold: the plan is shown, the run refused in one line
        print("\n".join(lines))
        raise ConfigError(f"--compile_only: {verdict}")
    return "\n".join(lines)


@contextlib.contextmanager
def model_dir_errors(model_dir: Path):
    try:
        yield
    except OSError as e:
            raise ConfigError(f"runconfig.model_dir: cannot write to {model_dir} ({e.strerror or e})") from None


def execute(params: Params, model, backend, precision_note: str | None = None) -> int:
    from modelzoo.training.metrics import close_logging
    try:
        return _execute(params, model, backend, precision_note)
    finally:
        close_logging()  # run.log closed: a caller (a notebook, a test) may start another run


def _execute(params: Params, model, backend, precision_note: str | None) -> int:
    from modelzoo.training.metrics import setup_logging
    from modelzoo.trainer import Trainer
    from modelzoo.backends.base import rank_and_world
    from modelzoo.backends.precision import as_run

    rank, _ = rank_and_world()
    model_dir = Path(params.runconfig.model_dir)
    mode = params.runconfig.mode
    # Read everything the run needs before writing anything: bad shards or a bad checkpoint end
    # the run with model_dir untouched (not even created). An existing model_dir's run.log does
    # record which checkpoint was skipped or resumed from.
    resuming = model_dir.is_dir()
    with model_dir_errors(model_dir):
        setup_logging(model_dir if resuming else None, rank)
    for note in params.notes:  # what reading the params decided (a Model Zoo file's ignored keys, ...)
        log.info(note)
    if precision_note:
        log.info(precision_note)
    trainer = Trainer(params, backend, model_dir)
    trainer.open_datasets(mode)
    training = mode in ("train", "train_and_eval")
    backend.setup(model, params.optimizer if training else None, params.sparsity if training else None)
    trainer.load_starting_checkpoint(mode)
    with model_dir_errors(model_dir):
        if rank == 0:
            model_dir.mkdir(parents=True, exist_ok=True)
            # the params as given, and what their precision 'auto's were decided as on this device
            (model_dir / f"params_{mode}.yaml").write_text(params.to_yaml() + as_run(model.config))
        if not resuming:
            setup_logging(model_dir, rank)
    try:
        if mode == "train":
            trainer.train()
        elif mode == "train_and_eval":
            trainer.train(evaluate_every=params.runconfig.eval_frequency)
            trainer.evaluate()
        elif mode == "eval":
            trainer.evaluate()  # of the checkpoint load_starting_checkpoint loaded
        else:
            trainer.eval_all()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":  # how run.py's --num_workers_per_node / --num_csx ranks start
    from modelzoo.distributed import exit_process
    exit_process(main())
