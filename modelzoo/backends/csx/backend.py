"""The CSX backend: emulated Cerebras weight streaming, MemoryX <-> wafer, SwarmX over N systems.

Per step: weights stream from MemoryX to the wafer stage by stage (cast to the compute dtype,
prefetched in the background), the wafer keeps every stage's activations when its plan fits
(csx.keep_activations auto; else only boundary activations, recomputing each stage in backward),
gradients stream back (summed over systems by SwarmX) and accumulate in fp32 in MemoryX,
which applies the optimizer per stage. See wafer.py, memoryx.py, swarmx.py.
The wafer computes on the CPU or on this system's GPU (csx.wafer_device); link.py moves weights
and gradients between it and MemoryX, which stays in host RAM or on disk either way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from modelzoo.backends.base import Backend, frozen_note, loss_weights, token_metrics
from modelzoo.backends.csx.deferred_init import build_deferred
from modelzoo.backends.csx.gradients import GradientRoute
from modelzoo.backends.csx.link import Link, check_wafer_device
from modelzoo.backends.csx.memoryx import MemoryX
from modelzoo.backends.csx.phases import PhaseTimes
from modelzoo.backends.csx.plan import Plan, check_fits, format_plan, make_plan
from modelzoo.backends.csx.prefetch import Prefetcher
from modelzoo.backends.csx.sparse_stream import SparseStream, plan_lines, sum_over_systems
from modelzoo.backends.csx.sharded_checkpoint import ShardedCheckpoint
from modelzoo.backends.csx.store import DiskStore, RamStore, remove_stale_dirs, unwritable
from modelzoo.backends.csx.streamed_state import StreamedState
from modelzoo.backends.csx.swarmx import CHECKPOINT_WAIT, SwarmX
from modelzoo.backends.csx.wafer import Wafer
from modelzoo.config import Params
from modelzoo.distributed import local_rank
from modelzoo.errors import ConfigError
from modelzoo.models.base import StagedModel
from modelzoo.training.checkpoint import check_model_state
from modelzoo.training.loss_scale import DynamicLossScaler, needs_loss_scaling
from modelzoo.training.sparsity import build_sparsifier, merge_states

log = logging.getLogger("modelzoo")


class CSXBackend(Backend):
    def __init__(self, params: Params):
        self.cfg = params.runconfig.csx
        self.systems = params.runconfig.num_csx
        self.memoryx_dir = Path(self.cfg.memoryx_dir or Path(params.runconfig.model_dir) / "memoryx")
        data = params.train_input or params.eval_input
        self.micro_batches = params.optimizer.grad_accum_steps if params.optimizer else 1
        if data is not None:
            per_system = max(data.batch_size // self.systems, 1)
            self.micro_batch = (max(per_system // self.micro_batches, 1), data.max_seq_length)
        else:
            self.micro_batch = (1, params.model.max_position_embeddings)
        self.training = params.runconfig.mode in ("train", "train_and_eval")
        self.optimizer_cfg = params.optimizer
        self.sparsity_cfg = params.sparsity if self.training else None
        self.sparsity = self.sparse_stream = None
        self._deferred = None
        self.store = self.prefetcher = self.memoryx = None  # what close() releases, once setup() made them
        # where the wafer computes: the CPU, or this system's GPU (MemoryX stays in host RAM or on disk)
        self.device = torch.device("cuda", local_rank()) if self.cfg.wafer_device == "cuda" else torch.device("cpu")
        self.link: Link | None = None
        self._session: ShardedCheckpoint | None = None  # a sharded checkpoint the writer may still stream
        self._checkpointed = False  # a state_dict() every system joined, not yet waited for
        # made by setup()
        self.model: StagedModel | None = None
        self.compiled: Plan | None = None  # the plan the wafer runs (whether it keeps activations, and why)
        self.wafer: Wafer | None = None
        self.swarm: SwarmX | None = None
        self.route: GradientRoute | None = None
        self.param_keys: dict[str, str] = {}  # checkpoint key -> MemoryX name (tied weights have several keys)
        self.expected: dict[str, torch.Size] = {}  # checkpoint key -> shape
        self.times = PhaseTimes()
        self.loss_scaler: DynamicLossScaler | None = None
        self.step = None  # MemoryX's OptimizerStep when training

    def build_model(self, build, model_cfg):
        """The model to hand to setup(): built on the meta device, its weights initialised there
        straight into MemoryX one tensor at a time (deferred_init.py), with the values building it
        in RAM would give; in RAM when its construction cannot be replayed."""
        model, self._deferred = build_deferred(build, model_cfg)
        return model

    def describe(self) -> str:
        where = "RAM" if self.cfg.memoryx == "ram" else f"disk ({self.memoryx_dir})"
        wafer = f", wafer on {self.device}" if self.device.type != "cpu" else ""
        # once setup() has made the plan: whether the wafer keeps activations, and why
        activations = f"; {self.activations}" if self.activations else ""
        return (f"CSX weight streaming: {self.systems} system(s){wafer}, MemoryX in {where}, "
                f"prefetch depth {self.cfg.prefetch_depth}{activations}{frozen_note(self.model)}")

    @property
    def activations(self) -> str:
        """What the plan setup() made does with activations, and why ('' before setup)."""
        return self.compiled.activations if self.compiled is not None else ""

    @property
    def phase_seconds(self) -> dict[str, float]:
        return self.times.seconds

    def compile(self, model: StagedModel, optimizer_cfg=None) -> Plan:
        """The compile-time plan, a value; raises ConfigError naming a stage that cannot fit the wafer."""
        plan = self._make_plan(model, optimizer_cfg)
        check_fits(plan, self.cfg.wafer_memory_gb)
        return plan

    def _make_plan(self, model: StagedModel, optimizer_cfg) -> Plan:
        return make_plan(model, self.micro_batch, self.micro_batches, self.cfg.prefetch_depth, self.systems,
                         optimizer_cfg or self.optimizer_cfg, training=self.training,
                         keep_activations=self.cfg.keep_activations, wafer_memory_gb=self.cfg.wafer_memory_gb,
                         device_memory=self._device_memory())

    def plan(self, model: StagedModel, params=None, ranks=None, optimizer_cfg=None) -> str:
        """The --compile_only query: the plan as text; raises ConfigError naming a stage that
        cannot fit the wafer (after the text is made, so the caller may show it)."""
        plan = self._make_plan(model, optimizer_cfg)
        text = format_plan(plan, self.cfg.wafer_memory_gb, self.cfg.memoryx)
        if self.sparsity_cfg is not None:
            text += "\n" + plan_lines(plan, model, build_sparsifier(self.sparsity_cfg, model.named_parameters()),
                                      self.training)
        check_fits(plan, self.cfg.wafer_memory_gb)
        return text

    def _device_memory(self) -> tuple[str, float] | None:
        """(name, GiB) of the memory the wafer's activations live in: this host's RAM for a CPU
        wafer (the emulated wafer may be configured larger than it), the GPU's for a CUDA one."""
        from modelzoo.backends.memory_plan import device_memory_bytes  # it imports csx.plan, hence csx
        total = device_memory_bytes(self.device, None)
        name = "RAM" if self.device.type == "cpu" else f"{self.device} memory"
        return None if total is None else (name, total / 2 ** 30)

    # ------------------------------------------------------------ setup

    def setup(self, model, optimizer_cfg, sparsity=None):
        deferred = self._deferred if self._deferred is not None and self._deferred.model is model else None
        self._deferred = None
        self.model = model if deferred is not None else model.to("cpu")
        self.optimizer_cfg = optimizer_cfg
        self.sparsity_cfg = sparsity if optimizer_cfg is not None else None
        # refuse a model that cannot fit before touching anything; the wafer runs the plan made here
        self.compiled = self.compile(model, optimizer_cfg)
        if self.device.type == "cuda":
            check_wafer_device("cuda", self.device.index + 1)
            torch.cuda.set_device(self.device)
        self.link = Link(self.device)
        self.wafer = Wafer(model, keep_activations=self.compiled.keep_activations, device=self.device)
        n = len(self.wafer.stages)
        stage_names = [self.wafer.stage_names(i) for i in range(n)]
        self.swarm = SwarmX(stage_names)
        # checkpoint keys -> MemoryX names (tied weights have several keys), taken before stripping
        names = {id(p): name for name, p in model.named_parameters()}
        live = model.state_dict(keep_vars=True)
        self.param_keys = {k: names[id(v)] for k, v in live.items() if isinstance(v, torch.nn.Parameter)}
        self.expected = {k: v.shape for k, v in live.items()}
        self.store = store = self._open_store()
        if deferred is not None and self.sparsity_cfg is None:
            # every system replays the whole initialisation (the RNG must advance as in the eager
            # build) and keeps what it owns
            owned = ((name, t) for name, t in deferred.replay() if self.swarm.owns(name))
            self.sparsity = None
        else:
            if deferred is not None:
                deferred.materialize()
            owned = {name: p for name, p in model.named_parameters() if self.swarm.owns(name)}
            self._setup_sparsity(model, owned)
        frozen = frozenset(name for name, p in model.named_parameters() if not p.requires_grad)  # LoRA's base
        if optimizer_cfg is not None and needs_loss_scaling(model.config):
            self.loss_scaler = DynamicLossScaler.from_config(optimizer_cfg)
        # MemoryX runs the optimizer step per stage; the global norm is over every system's stages
        self.memoryx = MemoryX(owned, store, optimizer_cfg, frozen, self.loss_scaler, self.sparsity)
        self.step = self.memoryx.step
        del owned, live
        self.wafer.strip_weights()
        self.route = GradientRoute(stage_names, self.link, self.swarm, self.memoryx, self.times)
        self.prefetcher = Prefetcher(self._fetch, self.cfg.prefetch_depth)

    def _open_store(self):
        """RAM, or this system's private directory under memoryx_dir, after removing the ones
        of runs on this host that were killed before they could (see store.remove_stale_dirs).
        An unusable memoryx_dir is a one-line ConfigError, raised before anything is written."""
        if self.cfg.memoryx == "ram":
            return RamStore()
        key = "runconfig.csx.memoryx_dir" + ("" if self.cfg.memoryx_dir else " (not set: model_dir/memoryx)")
        problem = unwritable(self.memoryx_dir)
        if problem is None:
            for directory, marker in remove_stale_dirs(self.memoryx_dir):
                log.info("removed %s: disk MemoryX of process %d, which ended without removing it", directory,
                         marker["pid"])
            try:
                return DiskStore(self.memoryx_dir, prefix=f"rank{self.swarm.rank}-")
            except OSError as e:
                problem = e.strerror or str(e)
        raise ConfigError(f"{key}: cannot write disk MemoryX files to {self.memoryx_dir} ({problem})")

    def _setup_sparsity(self, model, owned: dict[str, torch.Tensor]) -> None:
        """Masks of the weights this system owns, applied before MemoryX takes them."""
        self.sparsity = build_sparsifier(self.sparsity_cfg, model.named_parameters(), reduce=sum_over_systems)
        if self.sparsity is not None:
            self.sparsity.initialize(owned)
            self.sparsity.apply(owned)
            self.sparse_stream = SparseStream(self.sparsity)

    def _fetch(self, stage: int) -> dict[str, torch.Tensor]:
        """Runs in the prefetch thread: the stage's weights as the wafer receives them."""
        dtype = self.model.config.compute_dtype
        read = lambda name: self.memoryx.read(name).to(dtype)  # noqa: E731
        if self.sparse_stream is not None:  # masked weights cross as kept values + occupancy map
            read = self.sparse_stream.wrap(read)
        start = time.perf_counter()
        weights = self.swarm.broadcast_weights(self.wafer.stage_names(stage), read, self.wafer.shapes, dtype)
        sent = self.link.to_wafer(weights)  # a CUDA wafer: the copy starts on the inbound stream
        self.times.read_weights(time.perf_counter() - start)
        return sent

    # ------------------------------------------------------------ steps

    def _wait_for_checkpoint_writer(self) -> None:
        """After a state_dict() every system waits here for the writer (rank 0): a sharded disk
        checkpoint's owners serve it their tensors, then all wait until it has finished."""
        session, self._session = self._session, None
        if session is not None:
            session.finish()
        if self._checkpointed and self.swarm.world > 1:
            dist.monitored_barrier(timeout=CHECKPOINT_WAIT)
        self._checkpointed = False

    def train_step(self, micro_batches, lr):
        self._wait_for_checkpoint_writer()
        self.wafer.train()
        n = len(self.wafer.stages)
        weights = loss_weights(micro_batches)
        scale = self.loss_scaler.scale if self.loss_scaler else None
        self.times.begin_step(self.memoryx.update_seconds)
        order = Wafer.train_order(n) * len(micro_batches)
        raw = self.prefetcher.stream(order)
        stream = self.times.timed(raw, order, self.link.ready, self._updated_at)
        total = 0.0
        for k, (mb, weight) in enumerate(zip(micro_batches, weights)):
            self.route.begin_micro_batch(final=k == len(micro_batches) - 1)
            total += self.wafer.forward_backward(self.link.batch(mb), weight, stream, self.route.out, scale)
            self.route.collect()
        stream.close()
        raw.close()
        optimizer_start = time.perf_counter()
        # Every gradient is in MemoryX (unscaled and masked as it arrived): the global norm over
        # every system's stages decides clipping and whether the update may apply at all (a
        # non-finite one never does), then the stages are updated one by one, in the background
        # and in forward order: the next step's forward of stage k waits only for stage k's update.
        norm, apply = self.step.decide(self.swarm.global_norms(self.memoryx.norms))
        if apply:
            self.memoryx.start_update([self._owned(self.wafer.stage_names(i)) for i in range(n)], lr, norm)
            if self.sparsity is not None:
                self.memoryx.wait()  # new masks and the sparsity schedule (step.end) follow the whole update
        else:
            self.memoryx.discard_gradients()
        self.times.end_step(optimizer_start, self.memoryx.update_seconds)
        return {"loss": self.swarm.sum(total), "grad_norm": float(norm),
                "overflow": self.loss_scaler is not None and not apply, **self.step.end(apply)}

    def _owned(self, names: list[str]) -> list[str]:
        return [n for n in names if self.memoryx.owns(n)]

    def _updated_at(self, stage: int) -> float:
        """When the optimizer update running in the background wrote the weights of ``stage``."""
        return self.memoryx.ready_at(self._owned(self.wafer.stage_names(stage)))

    @torch.no_grad()
    def eval_step(self, batch):
        self._wait_for_checkpoint_writer()
        self.wafer.train(False)
        stream = self.prefetcher.stream(range(len(self.wafer.stages)))
        batch = self.link.batch(batch)
        out = self.wafer.forward(batch, map(self.link.ready, stream))
        stream.close()
        return token_metrics(out, batch["labels"])

    # ------------------------------------------------------------ checkpoints

    def state_dict(self):
        """Every system calls it; rank 0 writes the result. With disk MemoryX its tensors are
        lazily mapped snapshots, written by ``write_to`` (checkpoint.save_checkpoint calls it),
        and with several systems the other systems' tensors are placeholders that read as zeros
        until write_to streams them from their owners: only their owner may read them."""
        self._wait_for_checkpoint_writer()  # an earlier state_dict()'s, if no step came between
        self._checkpointed = True  # every system joins a save; rank 0 then writes it
        local = self.memoryx.state_dict()
        snapshots = self.memoryx.snapshots()
        if not self.memoryx.store.resident and self.swarm.world > 1:
            # the other systems' tensors stream to the writer one at a time when it writes
            self._session = ShardedCheckpoint(local, snapshots, self.swarm, self.store.directory)
            gathered = self._session.parts
        else:
            gathered = self.swarm.gather(local)
        masters, optimizer = {}, None
        for part in gathered:
            masters.update(part["model"])
            if "optimizer" in part:
                optimizer = optimizer or {"type": part["optimizer"]["type"], "state": {}}
                optimizer["state"].update(part["optimizer"]["state"])
        buffers = self.model.state_dict()
        state = {"model": {k: (masters[self.param_keys[k]] if k in self.param_keys else buffers[k].detach().cpu())
                           for k in self.expected}}
        if optimizer is not None:
            state["optimizer"] = optimizer
        if self.loss_scaler is not None:
            state["loss_scale"] = self.loss_scaler.state_dict()
        if self.sparsity is not None:
            state["sparsity"] = merge_states(self.swarm.gather(self.sparsity.state_dict()))
        if self._session is not None:
            return StreamedState(state, self._session.sources, after_write=self._session.finish)
        if not self.memoryx.store.resident:
            # disk MemoryX may be larger than RAM: the tensors are lazily mapped snapshots and the
            # checkpoint streams them to its file one at a time (see streamed_state.py)
            return StreamedState(state, snapshots)
        return state

    def load_state_dict(self, state, states):
        if "model" in states:
            check_model_state("checkpoint", state["model"], self.expected)
            weights = {name: state["model"][k] for k, name in self.param_keys.items() if self.memoryx.owns(name)}
            if self.sparsity is not None:
                self.sparsity.load_state_dict(state.get("sparsity"), weights, with_step="scheduler" in states)
                weights = self.sparsity.masked(weights)
            self.memoryx.load_weights(weights)
            buffers = {k: v for k, v in state["model"].items() if k not in self.param_keys}
            if buffers:
                self.model.load_state_dict(buffers, strict=False)
        if "optimizer" in states and "optimizer" in state:
            self.memoryx.load_optimizer(state["optimizer"])
        if "optimizer" in states and self.loss_scaler is not None and "loss_scale" in state:
            self.loss_scaler.load_state_dict(state["loss_scale"])

    def _release(self, failed):
        """Serve a checkpoint the writer still streams (unless failing), stop the prefetch thread
        and MemoryX's update thread (which write into and read from the store), then remove the
        disk MemoryX directory; each step runs whatever the ones before raise."""
        with contextlib.ExitStack() as steps:  # callbacks run last to first
            if self.store is not None:
                steps.callback(self.store.close)
            if self.memoryx is not None:
                steps.callback(self.memoryx.close, failed)
            if self.prefetcher is not None:
                steps.callback(self.prefetcher.close, wait=not failed)
            if not failed:
                self._wait_for_checkpoint_writer()
            elif self._session is not None:
                self._session.finish(failed=True)

