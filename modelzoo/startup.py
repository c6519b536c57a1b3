"""A run's start-up, in one order: validate the params against the device and the ranks, join the
process group, make the backend, decide precision, build the model. ``Trainer.from_params`` calls
these in that order (then loads and runs); the command line only turns argv into params.

Every check here runs before anything is built or written, and each refuses in one line.
"""

from __future__ import annotations

import torch

from modelzoo.backends.precision import decide
from modelzoo.config import Params
from modelzoo.distributed import init_process_group, launched_local_world_size, launched_world_size
from modelzoo.errors import ConfigError


def validate(params: Params, device: str, source: str, only_plan: str | None = None) -> int:
    """The data-parallel ranks this machine runs (``ranks_requested``), after every start-up check:
    flags against the device and the devices there are (``check_device_flags``), CSX's MemoryX
    against this host, the ranks a launcher started, and the batch split over all ranks. A plan
    (``only_plan``: 'validate' or 'compile') runs nothing: no devices or batch split are checked,
    and only 'compile' (which plans MemoryX) checks MemoryX."""
    check_device_flags(device, params, check_devices=not only_plan)
    ranks = ranks_requested(device, params)
    if device == "CSX" and only_plan != "validate":  # --compile_only and a run refuse alike
        from modelzoo.backends.memory_plan import check_memoryx_fits
        here = launched_local_world_size() if launched_world_size() > 1 else ranks  # the systems of this host
        check_memoryx_fits(params, source, here)
    if launched_world_size() > 1:
        check_launched_ranks(device, params, ranks)
    if not only_plan:
        check_batch_split(source, params, max(ranks, launched_world_size()))
    return ranks


def compute_device(device: str, params: Params) -> str:
    """Where the run's math happens: 'cuda' for GPU and for a CSX wafer on a GPU, else 'cpu'."""
    on_gpu = device == "GPU" or (device == "CSX" and params.runconfig.csx.wafer_device == "cuda")
    return "cuda" if on_gpu else "cpu"


def ranks_requested(device: str, params: Params) -> int:
    """Data-parallel ranks to start on this machine: --num_csx systems on CSX, --num_workers_per_node
    processes on CPU/GPU (default 1)."""
    run = params.runconfig
    return run.num_csx if device == "CSX" else run.num_workers_per_node or 1


def check_device_flags(device: str, params: Params, check_devices: bool = True) -> None:
    """The runconfig flags the device takes, and (``check_devices``) the devices its ranks need
    on this machine: a CUDA wafer per CSX system, a GPU per GPU worker."""
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
        return
    sparsity = params.sparsity if run.mode in ("train", "train_and_eval") else None
    if run.sharding == "fsdp" and sparsity is not None and sparsity.algorithm != "static":
        raise ConfigError(f"sparsity.algorithm: {sparsity.algorithm} changes masks from whole tensors, which "
                          f"runconfig.sharding: fsdp does not hold; use static sparsity, sharding: none, or CSX")
    if run.num_csx != 1:
        raise ConfigError("--num_csx applies to the CSX device only; CPU and GPU take --num_workers_per_node")
    if device == "GPU" and check_devices:
        from modelzoo.backends.resident import check_cuda_devices
        check_cuda_devices(ranks_requested(device, params))


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
    """Each rank gets batch_size / ranks sequences, in grad_accum_steps micro-batches: the one
    place this is checked, before any rank starts (the ranks re-read the same params and pass)."""
    mode = params.runconfig.mode
    used = [name for name, needed in (("train_input", mode in ("train", "train_and_eval")),
                                      ("eval_input", mode != "train")) if needed]
    used = [name for name in used if getattr(params, name) is not None]
    for name in used:
        batch = getattr(params, name).batch_size
        if batch % ranks:
            raise ConfigError(f"{source}: {name}.batch_size: {batch} is not divisible by the {ranks} "
                              f"data-parallel ranks")
    if "train_input" in used and (params.train_input.batch_size // ranks) % params.optimizer.grad_accum_steps:
        raise ConfigError(f"{source}: optimizer.grad_accum_steps: {params.optimizer.grad_accum_steps} does not "
                          f"divide the per-rank batch size {params.train_input.batch_size // ranks}")


def join(device: str) -> None:
    """This rank joins the launcher's process group (gloo on CPU and CSX, NCCL beside gloo on
    GPU, after taking its device: NCCL binds to the current one). Nothing when not launched."""
    if device == "GPU":
        from modelzoo.backends.resident import take_cuda_device
        take_cuda_device()
    init_process_group("cuda" if device == "GPU" else "cpu")


def make_backend(device: str, params: Params, only_plan: bool = False):
    """The backend of this rank; joins nothing (``join`` does, first). ``only_plan``
    (--validate_only, --compile_only): nothing runs, so a GPU plan needs no GPU."""
    if device == "CSX":
        from modelzoo.backends.csx import CSXBackend
        return CSXBackend(params)
    from modelzoo.backends.resident import ResidentBackend, gpu_backend
    recompute, sharding = params.runconfig.activation_checkpointing, params.runconfig.sharding
    if device == "GPU" and not only_plan:
        return gpu_backend(recompute, sharding)
    return ResidentBackend("cuda" if device == "GPU" else "cpu", recompute, sharding)


def build(params: Params, device: str, backend, only_plan: bool = False):
    """The model under the params' seed, built with the config it computes in on this device (every
    precision 'auto' decided), and the line the run logs about that decision. A plan builds shapes
    only (the meta device: 25B plans instantly)."""
    from modelzoo.models import build_model
    torch.manual_seed(params.runconfig.seed)
    model_cfg, precision_note = decide(params.model, compute_device(device, params))
    if only_plan:
        with torch.device("meta"):
            return build_model(model_cfg), precision_note
    return backend.build_model(build_model, model_cfg), precision_note
