"""The CSX backend: emulated Cerebras weight streaming, MemoryX <-> wafer, SwarmX over N systems.

Per step: weights stream from MemoryX to the wafer stage by stage (cast to the compute dtype,
prefetched in the background), the wafer keeps only boundary activations and recomputes each
stage for its backward, gradients stream back (summed over systems by SwarmX) and accumulate in
fp32 in MemoryX, which applies the optimizer per stage. See wafer.py, memoryx.py, swarmx.py.
The wafer computes on the CPU or on this system's GPU (csx.wafer_device); link.py moves weights
and gradients between it and MemoryX, which stays in host RAM or on disk either way.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from modelzoo.backends.base import Backend, frozen_note, loss_weights, token_metrics
from modelzoo.backends.csx.deferred_init import build_deferred
from modelzoo.backends.csx.link import Link, check_wafer_device
from modelzoo.backends.csx.memoryx import MemoryX
from modelzoo.backends.csx.plan import check_fits, format_plan, make_plan
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
from modelzoo.training.step import OptimizerStep

log = logging.getLogger("modelzoo")
PHASES = ("compute", "weights_wait", "gradients_out", "optimizer", "weights_read", "optimizer_update")


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
        self.keep_activations, self.activations = False, ""  # the plan's choice (csx.keep_activations)
        self._session: ShardedCheckpoint | None = None  # a sharded checkpoint the writer may still stream

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
                f"prefetch depth {self.cfg.prefetch_depth}{activations}{frozen_note(getattr(self, 'model', None))}")

    def plan(self, model: StagedModel, params=None, ranks=None, optimizer_cfg=None) -> str:
        """The compile-time plan; raises ConfigError naming a stage that cannot fit the wafer."""
        plan = make_plan(model, self.micro_batch, self.micro_batches, self.cfg.prefetch_depth, self.systems,
                         optimizer_cfg or self.optimizer_cfg, training=self.training,
                         keep_activations=self.cfg.keep_activations, wafer_memory_gb=self.cfg.wafer_memory_gb,
                         device_memory=self._device_memory())
        self.keep_activations, self.activations = plan.keep_activations, plan.activations
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
        self.plan(model, optimizer_cfg=optimizer_cfg)  # refuse a model that cannot fit before touching anything
        if self.device.type == "cuda":
            check_wafer_device("cuda", self.device.index + 1)
            torch.cuda.set_device(self.device)
        self.link = Link(self.device)
        self._outbox: deque = deque()  # gradients on their way to host memory (link.to_host)
        self.wafer = Wafer(model, keep_activations=self.keep_activations, device=self.device)
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
        self.memoryx = MemoryX(owned, store, optimizer_cfg, frozen)
        del owned, live
        self.wafer.strip_weights()
        self.uses = {}
        for names_of_stage in stage_names:
            for name in names_of_stage:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.prefetcher = Prefetcher(self._fetch, self.cfg.prefetch_depth)
        # Seconds per phase, summed over steps: compute on the wafer, waiting for weights that the
        # prefetch did not hide, writing gradients into MemoryX, waiting for the optimizer (the
        # global norm, and the next forward waiting for an update still running), and, overlapped
        # with the rest, reading weights out of MemoryX (prefetch thread) and the optimizer update
        # (MemoryX's thread; counted in the step during which it finished).
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self.timed_steps = 0
        self.loss_scaler = self.step = None
        if optimizer_cfg is not None:
            if needs_loss_scaling(model.config):
                self.loss_scaler = DynamicLossScaler.from_config(optimizer_cfg)
            # MemoryX runs the step per stage; the global norm is over every system's stages
            self.step = self.memoryx.step = OptimizerStep(self.memoryx.optimizer, optimizer_cfg, self.loss_scaler,
                                                          self.sparsity)

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
        self.phase_seconds["weights_read"] += time.perf_counter() - start
        return sent

    def _timed(self, stream, order: list[int]):
        """The weight stream of stages ``order``, counting the time the wafer waits for it: as
        optimizer while the update of the stage's weights (started by the previous step) was
        still running, as weights_wait after."""
        for stage in order:
            start = time.perf_counter()
            try:
                weights = self.link.ready(next(stream))
            finally:
                waited = time.perf_counter() - start
                updated = self.memoryx.ready_at(self._owned(self.wafer.stage_names(stage)))
                stalled = min(max(updated - start, 0.0), waited)
                self._step_phases["optimizer"] += stalled
                self._step_phases["weights_wait"] += waited - stalled
            yield weights

    # ------------------------------------------------------------ steps

    def _wait_for_checkpoint_writer(self) -> None:
        """After a state_dict() every system waits here for the writer (rank 0): a sharded disk
        checkpoint's owners serve it their tensors, then all wait until it has finished."""
        session, self._session = self._session, None
        if session is not None:
            session.finish()
        if getattr(self, "_checkpointed", False) and self.swarm.world > 1:
            dist.monitored_barrier(timeout=CHECKPOINT_WAIT)
        self._checkpointed = False

    def train_step(self, micro_batches, lr):
        self._wait_for_checkpoint_writer()
        self.wafer.train()
        n = len(self.wafer.stages)
        weights = loss_weights(micro_batches)
        scale = self.loss_scaler.scale if self.loss_scaler else None
        step_start = time.perf_counter()
        self._step_phases = dict.fromkeys(PHASES, 0.0)
        before = self.phase_seconds["weights_read"], self.memoryx.update_seconds
        order = Wafer.train_order(n) * len(micro_batches)
        raw = self.prefetcher.stream(order)
        stream = self._timed(raw, order)
        total = 0.0
        for k, (mb, weight) in enumerate(zip(micro_batches, weights)):
            self._final = k == len(micro_batches) - 1
            self._uses_left = dict(self.uses)
            self._pending: dict[str, torch.Tensor] = {}
            total += self.wafer.forward_backward(self.link.batch(mb), weight, stream, self._gradients_out, scale)
            self._collect_gradients()
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
        self._account(step_start, optimizer_start, *before)
        return {"loss": self.swarm.sum(total), "grad_norm": float(norm),
                "overflow": self.loss_scaler is not None and not apply, **self.step.end(apply)}

    def _account(self, step_start: float, optimizer_start: float, read_before: float, update_before: float) -> None:
        now = time.perf_counter()
        phases = self._step_phases
        stalled = phases["optimizer"]  # so far: the wafer waiting for weights the update had not written
        phases["compute"] = optimizer_start - step_start - phases["weights_wait"] - phases["gradients_out"] - stalled
        phases["optimizer"] = stalled + now - optimizer_start
        phases["weights_read"] = self.phase_seconds["weights_read"] - read_before
        phases["optimizer_update"] = self.memoryx.update_seconds - update_before
        for k in ("compute", "weights_wait", "gradients_out", "optimizer", "optimizer_update"):
            self.phase_seconds[k] += phases[k]
        self.timed_steps += 1
        # a line per step where steps take long enough for it to matter (large models)
        log.log(logging.INFO if now - step_start >= 10 else logging.DEBUG,
                "CSX step %.1f s: %s", now - step_start, describe_phases(phases))

    def _owned(self, names: list[str]) -> list[str]:
        return [n for n in names if self.memoryx.owns(n)]

    def _gradients_out(self, stage: int, grads: dict[str, torch.Tensor | None]) -> None:
        """Gradients leaving the wafer. On a CUDA wafer they reach host memory on a stream of
        their own and are taken in one stage later, while the next stage computes."""
        start = time.perf_counter()
        self._outbox.append(self.link.to_host(grads))
        while len(self._outbox) > self.link.in_flight:
            self._arrive(self._outbox.popleft()())
        self._step_phases["gradients_out"] += time.perf_counter() - start

    def _collect_gradients(self) -> None:
        """The gradients still on their way out when a micro-batch's backward pass ends."""
        start = time.perf_counter()
        while self._outbox:
            self._arrive(self._outbox.popleft()())
        self._step_phases["gradients_out"] += time.perf_counter() - start

    def _arrive(self, grads: dict[str, torch.Tensor | None]) -> None:
        """A stage's gradients in host memory: a tied weight's uses are summed per micro-batch
        (as autograd does in one backward pass), then reduced over systems into MemoryX."""
        ready = {}
        for name, grad in grads.items():
            if grad is not None:
                grad = grad.float()
                self._pending[name] = grad if name not in self._pending else self._pending[name] + grad
            self._uses_left[name] -= 1
            if self._uses_left[name] == 0 and name in self._pending:
                ready[name] = self._pending.pop(name)
        for name, grad in self.swarm.reduce_gradients(ready).items():
            self.memoryx.add_gradient(name, grad)
        if self._final:
            for name in self._owned(list(ready)):
                self.memoryx.finalize(name)

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


def describe_phases(phases: dict[str, float]) -> str:
    return (f"compute {phases['compute']:.1f} s, waiting for weights {phases['weights_wait']:.1f} s, "
            f"gradients to MemoryX {phases['gradients_out']:.1f} s, optimizer {phases['optimizer']:.1f} s "
            f"(weights read from MemoryX {phases['weights_read']:.1f} s, optimizer update "
            f"{phases['optimizer_update']:.1f} s, overlapped with compute)")
