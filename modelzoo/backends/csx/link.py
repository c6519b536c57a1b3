"""The link between MemoryX (host RAM or disk) and the wafer's device (runconfig.csx.wafer_device).

On a CPU wafer it does nothing: the wafer computes on the tensors MemoryX reads, and gradients
reach MemoryX as the wafer makes them. On a CUDA wafer weights stream in and gradients stream
out over PCIe on CUDA streams of their own, overlapped with compute (as the Cerebras wafer and
single-GPU systems that stream layers from host memory do):

- in (in the prefetch thread, ``prefetch_depth`` stages ahead): the stage's weights, already in
  the compute dtype and broadcast by SwarmX, are copied from pinned host memory to the device
  on the inbound stream and an event recorded; ``ready`` (the wafer's thread) makes the compute
  stream wait for that event, and ``record_stream`` keeps the allocator from reusing their memory
  before the compute reading them is done;
- out: ``to_host`` queues a stage's gradients into pinned host memory on the outbound stream
  once the compute stream has made them, and returns what waits for them; the backend collects
  them one stage later (``in_flight``), so the copy runs while the next stage computes.

Everything else (the wafer, MemoryX, SwarmX over gloo) is one code path for both devices.
"""

from __future__ import annotations

from typing import Callable

import torch

from modelzoo.errors import ConfigError


def check_wafer_device(wafer_device: str, systems_here: int) -> None:
    """One line when a CUDA wafer is asked for and this machine cannot give each local system
    its own device."""
    if wafer_device != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError("runconfig.csx.wafer_device: cuda, but no CUDA device is visible "
                          "(torch.cuda.is_available() is False); use wafer_device: cpu")
    count = torch.cuda.device_count()
    if systems_here > count:
        raise ConfigError(f"runconfig.csx.wafer_device: cuda: {systems_here} systems on this machine need "
                          f"{systems_here} CUDA devices but {count} are visible; lower --num_csx")


class Link:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.in_flight = 1 if self.cuda else 0  # stages whose gradients may still be on their way out
        self.inbound = torch.cuda.Stream(device) if self.cuda else None
        self.outbound = torch.cuda.Stream(device) if self.cuda else None

    def batch(self, batch: dict) -> dict:
        if not self.cuda:
            return batch
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    def to_wafer(self, weights: dict[str, torch.Tensor]):
        """Start moving a stage's weights to the wafer (any thread); ``ready`` hands them over."""
        if not self.cuda:
            return weights, None
        with torch.cuda.stream(self.inbound):
            moved = {n: t.pin_memory().to(self.device, non_blocking=True) for n, t in weights.items()}
            arrived = torch.cuda.Event()
            arrived.record(self.inbound)
        return moved, arrived

    def ready(self, sent) -> dict[str, torch.Tensor]:
        """The weights ``to_wafer`` sent, usable by what the wafer's thread queues next."""
        weights, arrived = sent
        if arrived is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(arrived)
            for t in weights.values():
                t.record_stream(compute)
        return weights

    def to_host(self, grads: dict[str, torch.Tensor | None]) -> Callable[[], dict]:
        """Start moving a stage's gradients to host memory; the returned call waits for them."""
        if not self.cuda:
            return lambda: grads
        self.outbound.wait_stream(torch.cuda.current_stream(self.device))
        host = {}
        with torch.cuda.stream(self.outbound):
            for name, grad in grads.items():
                if grad is not None:
                    host[name] = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
                    host[name].copy_(grad, non_blocking=True)
                    grad.record_stream(self.outbound)
                else:
                    host[name] = None
            arrived = torch.cuda.Event()
            arrived.record(self.outbound)

        def wait() -> dict:
            arrived.synchronize()
            return host
        return wait
