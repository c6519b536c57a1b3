"""CPU and GPU backends: the whole model resident on one device, data parallel across ranks.

With several ranks (``--num_workers_per_node`` or an outer ``torchrun``) the model is wrapped in
DistributedDataParallel: gloo on CPU, NCCL on CUDA. Everything else is one code path for both
devices; the CUDA-only parts are the device choice, TF32 and pinned non-blocking copies.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from modelzoo.backends import fsdp
from modelzoo.backends.base import Backend, Recomputed, frozen_note, loss_weights, rank_and_world, token_metrics
from modelzoo.backends.precision import autocast
from modelzoo.backends.csx.sparse_stream import sum_over_systems
from modelzoo.config import OptimizerConfig
from modelzoo.distributed import local_rank
from modelzoo.errors import ConfigError
from modelzoo.models.base import StagedModel
from modelzoo.training import optim
from modelzoo.training.checkpoint import check_model_state
from modelzoo.training.loss_scale import DynamicLossScaler, needs_loss_scaling
from modelzoo.training.sparsity import build_sparsifier
from modelzoo.training.step import OptimizerStep, total_norm


def cpu_backend(activation_checkpointing: bool = False, sharding: str = "none") -> "ResidentBackend":
    return ResidentBackend("cpu", activation_checkpointing, sharding)


def check_cuda_devices(needed: int) -> None:
    """One clear line when this machine cannot give each local rank its own CUDA device."""
    if not torch.cuda.is_available():
        raise ConfigError("GPU: no CUDA device is visible (torch.cuda.is_available() is False); use CPU")
    count = torch.cuda.device_count()
    if needed > count:
        raise ConfigError(f"GPU: {needed} workers on this machine need {needed} CUDA devices but {count} "
                          f"are visible; lower --num_workers_per_node")


def take_cuda_device() -> torch.device:
    """The CUDA device of this rank (LOCAL_RANK) made current, TF32 matmuls on. A run takes it
    before joining its process group: NCCL binds to the current device."""
    index = local_rank()
    check_cuda_devices(index + 1)
    torch.cuda.set_device(index)
    # fp32 matmuls and convolutions may use TF32 tensor cores (10-bit mantissa, fp32 range).
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    return torch.device("cuda", index)


def gpu_backend(activation_checkpointing: bool = False, sharding: str = "none") -> "ResidentBackend":
    """The CUDA device of this rank (``take_cuda_device``); data parallel over the process group
    the run joined (startup.join), if any."""
    return ResidentBackend(take_cuda_device(), activation_checkpointing, sharding)


def _sum_gradients(process_group, bucket):
    """DDP communication hook: SUM gradients over ranks instead of DDP's default average.

    ``loss_weights`` already weights every rank's loss by its share of the global batch's tokens,
    so the per-rank gradients add up to the global-batch gradient; averaging would divide it by
    the world size.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class ResidentBackend(Backend):
    def __init__(self, device: str | torch.device = "cpu", activation_checkpointing: bool = False,
                 sharding: str = "none"):
        self.device = torch.device(device)
        self.activation_checkpointing = activation_checkpointing
        self.sharding = sharding  # runconfig.sharding: fsdp shards when there are several ranks
        self.sharded = False  # FSDP units are in place (fsdp and world > 1)
        self.model: StagedModel | None = None  # the bare model: state dicts and evaluation
        self.runner: torch.nn.Module | None = None  # what training calls: the DDP wrapper or FSDP root
        self.optimizer = None
        self.optimizer_cfg: OptimizerConfig | None = None
        self.loss_scaler: DynamicLossScaler | None = None
        self.sparsity = None  # training.sparsity.Sparsifier when params.sparsity is set
        self.step: OptimizerStep | None = None  # unscale, mask, norm, finite check, clip, update, re-mask
        self._deferred = None  # FSDP: the model's initialisation, replayed into the shards

    def describe(self) -> str:
        _, world = rank_and_world()
        how = "fully sharded (FSDP)" if self.sharding == "fsdp" else "data parallel"
        parallel = f", {how} over {world} ranks ({dist.get_backend()})" if world > 1 else ""
        cfg = self.model.config if self.model is not None else None
        precision = f", {cfg.fp16_type} autocast" if cfg is not None and cfg.mixed_precision else ""
        scaling = ", dynamic loss scaling" if self.loss_scaler is not None else ""
        recompute = ", activation checkpointing" if self.activation_checkpointing else ""
        return f"resident on {self.device}{parallel}{precision}{scaling}{recompute}{frozen_note(self.model)}"

    def plan(self, model, params, ranks):
        from modelzoo.backends.memory_plan import resident_plan_text
        return resident_plan_text(model, params, ranks, self.device)

    def _shards(self) -> bool:
        return self.sharding == "fsdp" and rank_and_world()[1] > 1

    def build_model(self, build, model_cfg):
        """FSDP: on the meta device, its initialisation replayed one tensor at a time into this
        rank's shards (csx.deferred_init), so no rank ever holds the whole model."""
        if not self._shards():
            return build(model_cfg)
        from modelzoo.backends.csx.deferred_init import build_deferred
        model, self._deferred = build_deferred(build, model_cfg)
        return model

    def setup(self, model, optimizer_cfg, sparsity=None):
        self.sharded = self._shards()
        deferred = self._deferred if self._deferred is not None and self._deferred.model is model else None
        self._deferred = None
        training = optimizer_cfg is not None
        if deferred is not None and training and sparsity is not None:
            deferred.materialize()  # masks start from whole weights (magnitude: their top k)
            deferred = None
        self.model = model if self.sharded else model.to(self.device)
        # activation checkpointing: the training forward recomputes each stage in backward
        self.runner = Recomputed(self.model) if self.activation_checkpointing and training else self.model
        self.optimizer_cfg = optimizer_cfg
        if training:
            reduce = sum_over_systems if self.sharded else None  # FSDP ranks hold chunks of every mask
            self.sparsity = build_sparsifier(sparsity, self.model.named_parameters(), reduce)
            if self.sparsity is not None:
                weights = dict(self.model.named_parameters())
                self.sparsity.initialize(weights)
                self.sparsity.apply(weights)
        if self.sharded:
            self._shard(deferred)
        if not training:
            return
        self.optimizer = optim.build_optimizer(self.model.named_parameters(), optimizer_cfg)
        if needs_loss_scaling(model.config):
            self.loss_scaler = DynamicLossScaler.from_config(optimizer_cfg)
        global_norm = partial(fsdp.total_norm_over_ranks, device=self.device) if self.sharded else total_norm
        self.step = OptimizerStep(self.optimizer, optimizer_cfg, self.loss_scaler, self.sparsity, global_norm)
        if rank_and_world()[1] > 1 and not self.sharded:
            # DDP starts by broadcasting rank 0's weights, so every rank begins identical.
            on_cuda = self.device.type == "cuda"
            self.runner = DistributedDataParallel(self.runner, device_ids=[self.device.index] if on_cuda else None)
            self.runner.register_comm_hook(None, _sum_gradients)

    def _shard(self, deferred) -> None:
        """FSDP units over the model; a model built on the meta device gets its values from the
        replayed initialisation (every rank replays it all and keeps its chunks), a model built
        in RAM is cut up as it is (every rank built the same one from the same seed)."""
        cfg = self.model.config
        fsdp.shard(self.model, self.runner, self.device, cfg.compute_dtype if cfg.mixed_precision else None)
        params = dict(self.model.named_parameters())
        if deferred is not None:
            self.model.to_empty(device=self.device)
            for name, value in deferred.replay():
                fsdp.load_(params[name], value)
        if self.sparsity is not None:
            masks = self.sparsity.masks
            self.sparsity.masks = {name: fsdp.shard_of(mask, params[name]) for name, mask in masks.items()}

    def _to_device(self, batch: dict) -> dict:
        if self.device.type != "cuda":
            return batch
        # Page-locked host memory lets the copy run asynchronously with the compute queued before it.
        return {k: (v if v.is_pinned() else v.pin_memory()).to(self.device, non_blocking=True)
                for k, v in batch.items()}

    def _gradient_sync(self, last_micro_batch: bool):
        """Inside a global step only the last micro-batch's backward all-reduces the gradients."""
        if isinstance(self.runner, DistributedDataParallel) and not last_micro_batch:
            return self.runner.no_sync()
        return contextlib.nullcontext()

    def train_step(self, micro_batches, lr):
        self.runner.train()
        total = torch.zeros((), device=self.device)
        weights = loss_weights(micro_batches)
        for i, (mb, weight) in enumerate(zip(micro_batches, weights)):
            mb = self._to_device(mb)
            with self._gradient_sync(i == len(micro_batches) - 1):
                with autocast(self.device.type, self.model.config):
                    loss = self.runner(mb)["loss"] * weight
                (self.loss_scaler.scale_loss(loss) if self.loss_scaler else loss).backward()
            total += loss.detach()
        _, world = rank_and_world()
        if world > 1:
            dist.all_reduce(total)  # each rank holds its share of the global-batch mean
        # Gradients are identical on every rank after the all-reduce, so all ranks decide alike.
        return {"loss": float(total), **self.step(self.model.named_parameters(), lr)}

    @torch.no_grad()
    def eval_step(self, batch):
        module = self.runner if self.sharded else self.model  # FSDP: through its root, which gathers
        module.eval()
        batch = self._to_device(batch)
        with autocast(self.device.type, self.model.config):
            out = module(batch)
        return token_metrics(out, batch["labels"])

    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    def state_dict(self):
        # From the bare model, never the DDP wrapper: names stay free of a 'module.' prefix.
        if self.sharded:
            return self._gathered_state_dict()
        state = {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}
        if self.optimizer is not None:
            state["optimizer"] = optim.optimizer_state_by_name(self.optimizer, self._names())
        if self.loss_scaler is not None:
            state["loss_scale"] = self.loss_scaler.state_dict()
        if self.sparsity is not None:
            state["sparsity"] = self.sparsity.state_dict()
        return state

    def _gathered_state_dict(self) -> dict:
        """FSDP: the same state as unsharded, every tensor whole on the writer (rank 0), gathered
        one at a time (every rank joins each all-gather; only the writer keeps a CPU copy). The
        other ranks get their own shards as the model's values: enough for what they do with it."""
        keep = rank_and_world()[0] == 0
        full: dict[int, torch.Tensor] = {}  # a tied weight is gathered once
        model = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if id(value) not in full:
                full[id(value)] = fsdp.gather(value, keep)
            model[key] = full[id(value)] if keep else value.detach()
        state = {"model": model}
        if self.optimizer is not None:
            saved = optim.optimizer_state_by_name(self.optimizer, self._names())
            saved["state"] = {name: {k: fsdp.gather(v, keep) for k, v in values.items()}
                              for name, values in saved["state"].items()}
            state["optimizer"] = saved
        if self.loss_scaler is not None:
            state["loss_scale"] = self.loss_scaler.state_dict()
        if self.sparsity is not None:
            params = dict(self.model.named_parameters())
            masks = {name: fsdp.gather_mask(mask, params[name], keep) for name, mask in self.sparsity.masks.items()}
            state["sparsity"] = {**self.sparsity.state_dict(), "masks": masks}
        return state

    def _release(self, failed):
        # the DDP wrapper (its gradient buckets and hooks on the process group) and the optimizer
        # state; the model itself is the caller's
        if self.sharded and not failed:
            fsdp.quiesce()
        self.runner = self.optimizer = self.sparsity = self.step = None

    def load_state_dict(self, state, states):
        if "model" in states:
            live = self.model.state_dict(keep_vars=True)
            check_model_state("checkpoint", state["model"], {k: v.shape for k, v in live.items()})
            if self.sharded:  # each rank takes its chunk of every tensor
                for key, target in live.items():
                    fsdp.load_(target, state["model"][key])
            else:
                self.model.load_state_dict(state["model"])
            if self.sparsity is not None:
                self._load_masks(state, with_step="scheduler" in states)
        if "optimizer" in states and self.optimizer is not None and "optimizer" in state:
            params = dict(self.model.named_parameters())
            saved = state["optimizer"]
            if self.sharded:
                saved = {**saved, "state": {name: {k: fsdp.sharded_like(v, params[name]) for k, v in values.items()}
                                            for name, values in saved["state"].items()}}
            optim.load_optimizer_state_by_name(self.optimizer, saved, params)
        if "optimizer" in states and self.loss_scaler is not None and "loss_scale" in state:
            self.loss_scaler.load_state_dict(state["loss_scale"])

    def _load_masks(self, state: dict, with_step: bool) -> None:
        """Masks from the checkpoint (or fresh ones from its weights), then the weights masked.
        FSDP: each mask from the whole tensor, one at a time, then cut to this rank's chunk."""
        weights = dict(self.model.named_parameters())
        if not self.sharded:
            self.sparsity.load_state_dict(state.get("sparsity"), weights, with_step=with_step)
        else:
            for name, param in weights.items():
                self.sparsity.load_state_dict(state.get("sparsity"), {name: state["model"][name]}, with_step=with_step)
                if name in self.sparsity.masks:
                    self.sparsity.masks[name] = fsdp.shard_of(self.sparsity.masks[name], param)
            weights = {name: p.to_local() for name, p in weights.items()}
        self.sparsity.apply(weights)
