"""The wafer: runs a StagedModel one stage at a time on weights streamed in from MemoryX.

It holds a weight-less skeleton of the model (parameters on the meta device, buffers kept) and
binds a stage's streamed weights only while that stage runs (``torch.func.functional_call``).
Training one micro-batch:

- forward, stages 0..n-2 without autograd, keeping only each stage's input (the boundary
  activation) and the RNG state it started from;
- the last stage (head and loss) runs with autograd and is differentiated at once;
- backward, stages n-2..0: weights stream in again, the stage's forward is recomputed from its
  boundary activation under the RNG state it first ran with (so dropout masks are the same, as
  in ``torch.utils.checkpoint``), and ``torch.autograd.grad`` gives the gradients of its input
  activation and of its weights, which stream out to MemoryX.

With ``keep_activations`` the stages 0..n-2 instead run forward with autograd and keep their
graphs (the activations autograd saved), as the real wafer keeps activations: no recompute.
Their weights still leave the wafer after the forward pass (the storage of each bound weight
is released, as FSDP does) and stream in again for backward, refilled in place before the
stage's graph is differentiated.

The global RNG ends where a resident forward/backward would leave it, so dropout draws match
the resident backends step for step. Nothing here knows which model it runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten

from modelzoo.backends.precision import autocast
from modelzoo.models.base import StagedModel

GradientSink = Callable[[int, dict[str, torch.Tensor | None]], None]


class Wafer:
    def __init__(self, model: StagedModel, keep_activations: bool = False, device: torch.device | str = "cpu"):
        """``device``: where the stages compute (the weights, batches and buffers it is handed
        are there: csx.link moves them)."""
        self.model = model
        self.keep_activations = keep_activations
        self.device = torch.device(device)
        self.stages = model.stages()
        names = {id(p): n for n, p in model.named_parameters()}
        # stage -> [(name inside the stage, MemoryX name)]; a tied weight appears in several stages
        self.bindings = [[(local, names[id(p)]) for local, p in stage.named_parameters()]
                         for stage in self.stages]
        self.shapes = {n: p.shape for n, p in model.named_parameters()}
        # what gets a gradient: frozen weights (LoRA's base) stream in but none leaves the wafer
        self.trained = {n for n, p in model.named_parameters() if p.requires_grad}

    def stage_names(self, i: int) -> list[str]:
        return [name for _, name in self.bindings[i]]

    def strip_weights(self) -> None:
        """Replace every parameter by a meta tensor: the wafer holds no weights between stages."""
        meta: dict[int, nn.Parameter] = {}
        for module in self.model.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    if id(p) not in meta:
                        meta[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                    module._parameters[key] = meta[id(p)]
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = b.to(self.device)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def run(self, i: int, weights: dict[str, torch.Tensor], hidden, batch: dict):
        bound = {local: weights[name] for local, name in self.bindings[i]}
        with autocast(self.device.type, self.model.config):
            return functional_call(self.stages[i], bound, (hidden, batch))

    # ------------------------------------------------------------ execution

    def forward(self, batch: dict, weights: Iterator[dict]) -> dict:
        """Inference over all stages (weights in stage order)."""
        hidden = None
        with torch.no_grad():
            for i in range(len(self.stages)):
                hidden = self.run(i, next(weights), hidden, batch)
        return hidden

    @staticmethod
    def train_order(n: int) -> list[int]:
        """The order stages' weights stream in for one micro-batch."""
        return list(range(n)) + list(range(n - 2, -1, -1))

    def forward_backward(self, batch: dict, loss_weight: float, weights: Iterator[dict],
                         gradients_out: GradientSink, loss_scale: float | None = None) -> float:
        """Loss x loss_weight of one micro-batch; hands each stage's weight gradients to
        ``gradients_out(stage, {name: grad or None})`` as the backward pass produces them
        (gradients of the loss times loss_scale when an fp16 loss scale is given)."""
        if self.keep_activations:
            return self._forward_backward_kept(batch, loss_weight, weights, gradients_out, loss_scale)
        last = len(self.stages) - 1
        boundary, rng_states = [], []
        hidden = None
        with torch.no_grad():
            for i in range(last):
                boundary.append(hidden)
                rng_states.append(_rng_state(self.device))
                hidden = self.run(i, next(weights), hidden, batch)

        loss, grad_hidden = self._differentiate(last, next(weights), hidden, batch, None,
                                                (loss_weight, loss_scale), gradients_out)
        for i in range(last - 1, -1, -1):
            with _rng_restored(self.device, rng_states[i]):
                _, grad_hidden = self._differentiate(i, next(weights), boundary[i], batch, grad_hidden,
                                                     None, gradients_out)
            boundary[i] = None  # the wafer frees each boundary activation once it is used
        return loss

    def _forward_backward_kept(self, batch, loss_weight, weights, gradients_out, loss_scale) -> float:
        last = len(self.stages) - 1
        graphs, hidden = [], None
        for i in range(last):
            # own copies: in RAM MemoryX streams fp32 masters themselves, whose storage must live on
            streamed = next(weights)
            leaves = {name: streamed[name].detach().clone().requires_grad_(name in self.trained)
                      for name in self.stage_names(i)}
            hidden, inputs = _differentiable(hidden)
            with torch.enable_grad():
                hidden = self.run(i, leaves, hidden, batch)
            outputs = _differentiable_outputs(hidden)
            for leaf in leaves.values():
                leaf.untyped_storage().resize_(0)  # the weights leave the wafer; the graph stays
            graphs.append((inputs, outputs, leaves))
        loss, grad_hidden = self._differentiate(last, next(weights), hidden, batch, None,
                                                (loss_weight, loss_scale), gradients_out)
        for i in range(last - 1, -1, -1):
            inputs, outputs, leaves = graphs[i]
            graphs[i] = None  # the wafer frees each stage's activations once they are used
            streamed = next(weights)
            for name, leaf in leaves.items():  # back in place: autograd's saved views of it see them
                leaf.untyped_storage().resize_(leaf.numel() * leaf.element_size())
                leaf.data.copy_(streamed[name])  # through .data: not an in-place change autograd checks
            grad_hidden = _backward(i, outputs, grad_hidden, inputs, leaves, gradients_out)
        return loss

    def _differentiate(self, i, weights, hidden, batch, grad_out, loss_scaling, gradients_out):
        """(Re)compute stage i with autograd and differentiate it: returns (loss or None, the
        gradient of its input activation)."""
        leaves = {name: weights[name].detach().requires_grad_(name in self.trained) for name in self.stage_names(i)}
        hidden, inputs = _differentiable(hidden)
        with torch.enable_grad():
            out = self.run(i, leaves, hidden, batch)
            if grad_out is None:  # the last stage: its output holds the loss
                weight, scale = loss_scaling
                scaled = out["loss"] * weight
                loss = float(scaled.detach())
                outputs, grad_outputs = [scaled if scale is None else scaled * scale], None
            else:
                outputs, grad_outputs, loss = _differentiable_outputs(out), grad_out, None
        return loss, _backward(i, outputs, grad_outputs, inputs, leaves, gradients_out)


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator dropout on ``device`` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextmanager
def _rng_restored(device: torch.device, state: torch.Tensor):
    """Run with the generator of ``device`` at ``state``; it is left as it was before."""
    on_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_cuda else [], device_type="cuda"):
        if on_cuda:
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


def _differentiable_outputs(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if torch.is_tensor(t) and t.requires_grad]


def _backward(i: int, outputs, grad_outputs, inputs: list[torch.Tensor], leaves: dict[str, torch.Tensor],
              gradients_out: GradientSink) -> list[torch.Tensor]:
    """Differentiate stage i's outputs: its weight gradients go to ``gradients_out`` (None for a
    frozen weight, which is not differentiated); returns the gradient of each of its input
    activations (zeros where the output did not depend on one)."""
    trained = [name for name, leaf in leaves.items() if leaf.requires_grad]
    wrt = inputs + [leaves[name] for name in trained]
    grads = torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True) if wrt and outputs \
        else [None] * len(wrt)
    gradients_out(i, {**dict.fromkeys(leaves), **dict(zip(trained, grads[len(inputs):]))})
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads[:len(inputs)])]


def _differentiable(hidden):
    """A copy of the boundary activation whose floating tensors are fresh autograd leaves."""
    leaves, spec = tree_flatten(hidden)
    fresh = [t.detach().requires_grad_() if torch.is_tensor(t) and t.is_floating_point() else t for t in leaves]
    return tree_unflatten(fresh, spec), [t for t in fresh if torch.is_tensor(t) and t.requires_grad]
