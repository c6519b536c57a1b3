"""MemoryX: the fp32 master weights, gradient accumulators and optimizer state of the stages
this system owns, and the optimizer update applied to them.

The update is the resident backends' own: the optimizer comes from ``training.optim`` (same
torch.optim class, parameter groups and weight-decay rule) and the step from ``training.step``
(unscale, mask, norm, finite check, clip, update, re-mask), which every backend calls. What
differs is only where tensors live: every parameter has a handle ``nn.Parameter`` the optimizer
knows; its data, gradient and state are loaded from the store just for the update of its stage
and written back after (a no-op in RAM, explicit file I/O on disk).

Clipping needs the global norm, i.e. every gradient, before any update, and so does the rule
that a non-finite gradient is never applied (the fp16 loss scaler skips such steps): per-tensor
norms are taken as each gradient becomes final, the gradients wait in MemoryX until the
backward pass has finished, then the stages are updated one by one. This is exact: the same
norm, clip coefficient and optimizer arithmetic as one resident step.

The update runs in a thread of its own, beside the next step's forward pass: stages are updated
in forward order, and a weight read (``read``, what the wafer streams in) waits only for the
update of its own stage, so the next step's stage 0 computes while later stages still update.
Everything else that touches the state (gradients, checkpoints, loading) waits for the whole
update (``wait``); an update that fails is raised by every later read or wait.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch
from torch import nn

from modelzoo.backends.csx.store import release_pages
from modelzoo.config import OptimizerConfig
from modelzoo.training import optim
from modelzoo.training.loss_scale import DynamicLossScaler
from modelzoo.training.sparsity import Sparsifier
from modelzoo.training.step import OptimizerStep

_ZERO = torch.zeros(())


def _run_now(fn, *args) -> Future:
    """``fn(*args)`` done on the spot, as a finished Future (RAM needs no background I/O)."""
    done = Future()
    done.set_result(fn(*args))
    return done


class UpdateCancelled(Exception):
    """The update stopped between stages because MemoryX is closing after a failure (its files go)."""


def _released(shape: torch.Size) -> torch.Tensor:
    """Data of a disk-backed handle between updates: its shape (the optimizer groups parameters
    by it) without its memory (a broadcast scalar)."""
    return _ZERO.expand(shape)


class MemoryX:
    def __init__(self, masters, store, optimizer_cfg: OptimizerConfig | None, frozen: frozenset[str] = frozenset(),
                 loss_scaler: DynamicLossScaler | None = None, sparsity: Sparsifier | None = None):
        """``masters``: name -> weight, as a dict or as (name, weight) pairs, which a disk store
        writes out one by one as they come (e.g. from deferred_init's replay). ``frozen``: names
        that never train (e.g. the base weights under LoRA): held and streamed, but no optimizer
        state (and the wafer sends no gradient for them). ``loss_scaler`` and ``sparsity``: what
        the optimizer step unscales and masks with (training only)."""
        self.store = store
        self.handles: dict[str, nn.Parameter] = {}
        for name, tensor in (masters.items() if isinstance(masters, dict) else masters):
            master = tensor.detach().float()  # in RAM this aliases the model's tensor: no copy
            self.store.put(f"w/{name}", master)
            self.handles[name] = nn.Parameter(master if self.store.resident else _released(master.shape),
                                              requires_grad=name not in frozen)
            del master, tensor
        self.optimizer_cfg = optimizer_cfg
        self.optimizer = None
        if optimizer_cfg is not None and any(h.requires_grad for h in self.handles.values()):
            self.optimizer = optim.build_optimizer(self.handles.items(), optimizer_cfg)
        self._state_keys: dict[str, list[str]] = {}  # optimizer state tensors kept in the store
        self._scalars: dict[str, dict] = {}  # small state (e.g. Adam's step), kept in RAM
        self.norms: dict[str, torch.Tensor] = {}  # per-tensor gradient norms of this step
        # the optimizer step over this optimizer, run per stage as gradients arrive
        self.step = OptimizerStep(self.optimizer, optimizer_cfg, loss_scaler, sparsity) \
            if optimizer_cfg is not None else None
        # the update in the background: names it has not written yet, when each was written
        # (perf_counter), its failure, and its total running time (seconds, over all steps)
        self._updated = threading.Condition()
        self._updating: set[str] = set()
        self._ready_at: dict[str, float] = {}
        self._failure: BaseException | None = None
        self._cancelled = False
        self._running: Future | None = None
        self._worker: ThreadPoolExecutor | None = None
        self.update_seconds = 0.0

    def owns(self, name: str) -> bool:
        return name in self.handles

    def read(self, name: str) -> torch.Tensor:
        """The fp32 master weight (in RAM: the master itself; on disk: a fresh copy), once the
        update in flight has written it."""
        self._wait_for(name)
        return self.store.get(f"w/{name}")

    # ------------------------------------------------------------ gradients

    def add_gradient(self, name: str, grad: torch.Tensor) -> None:
        self._wait_for(name)  # the last update has read and dropped the previous gradient
        key = f"g/{name}"
        if key in self.store:
            total = self.store.get(key)
            total.add_(grad)
        else:  # MemoryX owns its accumulator: never a tensor autograd may still hand elsewhere
            total = grad.to(torch.float32, copy=True)
        self.store.put(key, total)

    def finalize(self, name: str) -> None:
        """The gradient of ``name`` is complete for this step: the first part of the optimizer
        step (unscale, mask) and its norm, for the global norm."""
        key = f"g/{name}"
        if key in self.store:
            grad = self.store.get(key)
            self.norms[name], = self.step.finish_gradients([(name, grad)])
            if self.step.modifies(name):
                self.store.put(key, grad)

    # ------------------------------------------------------------ the update

    def start_update(self, stages: list[list[str]], lr: float, norm: torch.Tensor) -> None:
        """The rest of the optimizer step (clip with the global ``norm``, update, re-mask) over the
        parameters of each stage in turn (those with a gradient, each once however many stages
        list it, with the first), started in the background; gradients are dropped as each stage
        is written. ``stages`` in the order the next forward pass streams them in: ``read``
        of a weight waits for its own stage only.

        On disk the update is a pipeline: while one stage steps, the next stage's weights,
        gradients and state are read and the previous stage's are written back, each in a
        background thread (file I/O and torch's foreach kernels release the GIL), so the
        optimizer costs about max(read, step, write) per stage rather than their sum."""
        self.wait()
        seen: set[str] = set()
        stages = [[n for n in names if not (n in seen or seen.add(n))] for names in stages]
        self.norms.clear()
        with self._updated:
            self._updating = set(seen)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="memoryx-optimizer")
        self._running = self._worker.submit(self._update, stages, lr, norm)

    def _update(self, stages: list[list[str]], lr: float, norm: torch.Tensor) -> None:
        start = time.perf_counter()
        try:
            background = not self.store.resident
            with ThreadPoolExecutor(2, thread_name_prefix="memoryx-update") if background else nullcontext() as pool:
                submit = pool.submit if background else _run_now
                reading = submit(self._read_stage, stages[0]) if stages else None
                writing = None
                for k in range(len(stages)):
                    loaded = reading.result()
                    if self._cancelled:
                        raise UpdateCancelled("MemoryX closed during its update")
                    if k + 1 < len(stages):
                        reading = submit(self._read_stage, stages[k + 1])
                    updated = self._step_stage(loaded, lr, norm)
                    if writing is not None:
                        writing.result()  # at most one stage waits to be written: RAM stays bounded
                    writing = submit(self._write_stage, updated, stages[k])
                if writing is not None:
                    writing.result()
        except BaseException as e:  # noqa: B036 - kept for whoever reads next, never lost
            with self._updated:
                self._failure = e
                self._updated.notify_all()
        finally:
            self.update_seconds += time.perf_counter() - start

    def _wait_for(self, name: str) -> None:
        """Until the update in flight has written ``name`` (at once when it is not updating)."""
        with self._updated:
            while name in self._updating and self._failure is None:
                self._updated.wait()
            if self._failure is not None:
                raise self._failure

    def ready_at(self, names: list[str]) -> float:
        """When the last update wrote the latest of ``names`` (time.perf_counter; 0 if never)."""
        return max((self._ready_at.get(n, 0.0) for n in names), default=0.0)

    def wait(self) -> None:
        """Until the update in flight has finished; raises its failure (and so does every later
        call: MemoryX holds a half-updated state then)."""
        running = self._running
        if running is not None:
            running.exception()  # _update keeps its failure itself
            self._running = None
        if self._failure is not None:
            raise self._failure

    def discard_gradients(self) -> None:
        """A step whose update does not apply (non-finite gradients): drop its gradients."""
        self.wait()
        self.norms.clear()
        for name in self.handles:
            self.store.pop(f"g/{name}")

    def close(self, failed: bool = False) -> None:
        """Stop the update thread before the store goes: an update in flight finishes (with
        ``failed`` it stops after the stage it is on: the files are about to be removed), and
        without ``failed`` its failure is raised here."""
        self._cancelled = failed
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True)
        if not failed:
            self.wait()

    def _read_stage(self, names: list[str]) -> list[tuple]:
        """(name, master or None in RAM, gradient, optimizer state tensors) of each parameter
        of the stage with a gradient (an unused parameter has none: the optimizer skips it)."""
        loaded = []
        for name in names:
            if f"g/{name}" not in self.store:
                continue
            master = None if self.store.resident else self.store.get(f"w/{name}")
            state = {k: self.store.get(f"s/{name}/{k}") for k in self._state_keys.get(name, ())}
            loaded.append((name, master, self.store.get(f"g/{name}"), state))
        return loaded

    def _step_stage(self, loaded: list[tuple], lr: float, norm: torch.Tensor) -> list[tuple]:
        """The optimizer step on loaded tensors; returns (name, master, state tensors) to store."""
        params = []
        for name, master, grad, state in loaded:
            handle = self.handles[name]
            if master is not None:
                handle.data = master
            handle.grad = grad
            state = {**self._scalars.get(name, {}), **state}
            if state:
                self.optimizer.state[handle] = state
            params.append((name, handle))
        if not params:
            return []
        self.step.update(params, lr, norm)
        updated = []
        for name, handle in params:
            handle.grad = None
            updated.append((name, handle.data, self._unload_state(name, handle)))
            if not self.store.resident:
                handle.data = _released(handle.shape)
        return updated

    def _write_stage(self, updated: list[tuple], names: list[str]) -> None:
        """Store a stage's updated tensors; then its ``names`` may be read (a gradient left
        over, which should not happen, must not leak into the next step either)."""
        for name, master, tensors in updated:
            self.store.put(f"w/{name}", master)
            for k, v in tensors.items():
                self.store.put(f"s/{name}/{k}", v)
        for name in names:
            self.store.pop(f"g/{name}")
        now = time.perf_counter()
        with self._updated:
            for name in names:
                self._ready_at[name] = now
            self._updating.difference_update(names)
            self._updated.notify_all()

    def _unload_state(self, name: str, handle: nn.Parameter) -> dict[str, torch.Tensor]:
        """Take the parameter's optimizer state out of the optimizer: small values stay in RAM,
        the tensors it returns belong in the store (under s/name/key)."""
        state = self.optimizer.state.pop(handle, {})
        tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and v.ndim > 0}
        self._scalars[name] = {k: v for k, v in state.items() if k not in tensors}
        self._state_keys[name] = list(tensors)
        return tensors

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """{'model': name -> fp32 master, 'optimizer': optim.optimizer_state_by_name format}.

        On disk the tensors are snapshots (``DiskStore.snapshot``): lazily mapped, read-only in
        spirit, never loaded unless touched; ``snapshots()`` lists them for a streamed save."""
        self.wait()
        take = (lambda key: self.store.get(key)) if self.store.resident else self._snapshot
        self._taken: list = []
        state = {"model": {name: take(f"w/{name}") for name in self.handles}}
        if self.optimizer is not None:
            by_name = {}
            for name in self.handles:
                values = {k: take(f"s/{name}/{k}") for k in self._state_keys.get(name, ())}
                values.update(self._scalars.get(name, {}))
                if values:
                    by_name[name] = values
            state["optimizer"] = {"type": type(self.optimizer).__name__, "state": by_name}
        return state

    def _snapshot(self, key: str) -> torch.Tensor:
        snap = self.store.snapshot(key)
        self._taken.append(snap)
        return snap.tensor

    def snapshots(self) -> list:
        """The disk snapshots behind the tensors of the last state_dict(), handed over: they (and
        the old file versions they keep) go when the caller drops them."""
        taken, self._taken = getattr(self, "_taken", []), []
        return taken

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.wait()
        for name, value in weights.items():
            if self.store.resident:
                self.read(name).copy_(value)  # keeps the handle and the store aliased
            else:
                self.store.put(f"w/{name}", value.detach().float().contiguous())
                release_pages(value)  # a tensor mapped from a checkpoint: let its pages go

    def load_optimizer(self, saved: dict) -> None:
        """Load a state in optim.optimizer_state_by_name format (this system's parameters only),
        one parameter at a time (a checkpoint larger than RAM arrives memory-mapped)."""
        if self.optimizer is None:
            return
        self.wait()
        for name, handle in self.handles.items():
            self.optimizer.state.pop(handle, None)
            for k in self._state_keys.pop(name, ()):
                self.store.pop(f"s/{name}/{k}")
            self._scalars.pop(name, None)
        mine = {n: v for n, v in saved.get("state", {}).items()
                if n in self.handles and self.handles[n].requires_grad}  # frozen (LoRA) weights keep none
        for name, values in mine.items():
            handle = self.handles[name]
            optim.load_optimizer_state_by_name(self.optimizer, {**saved, "state": {name: values}}, self.handles)
            self.optimizer.state[handle] = {k: (v.clone() if torch.is_tensor(v) else v)
                                            for k, v in self.optimizer.state[handle].items()}
            for k, v in self._unload_state(name, handle).items():
                self.store.put(f"s/{name}/{k}", v)
            for v in values.values():
                if torch.is_tensor(v):
                    release_pages(v)
