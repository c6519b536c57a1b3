"""Build a model without its weights, then initialise them one tensor at a time.

A GenSLM-2.5B model is 10 GB of fp32 weights: building it in RAM only to hand it to a disk MemoryX
would cost the RAM that MemoryX exists to save. So the CSX backend builds the model on the meta
device (shapes only) while ``InitRecorder`` records every in-place initialisation call the
constructors make (``nn.init.normal_``, ``kaiming_uniform_``, ``fill_``, ``zero_``...). ``replay``
then runs the same calls, in the same order and from the same RNG state, on real tensors,
handing each parameter out as soon as its last initialisation is done, so only a few tensors are
in RAM at a time and every value equals what building the model in RAM would have given
(calls on tensors the model later dropped, e.g. a head weight replaced by a tied one, still run
on scratch tensors: they consume the RNG as the eager build did).

Nothing here knows the model: a model whose construction cannot be replayed this way (buffers
computed at build time, initialisation through views or from other tensors) is reported by
``replayable`` and the backend builds it in RAM as before.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


# in-place initialisations that set every element whatever the tensor held before
_OVERWRITING = {"normal_", "uniform_", "fill_", "zero_", "ones_", "zeros_", "constant_", "kaiming_uniform_",
                "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "trunc_normal_", "orthogonal_", "eye_",
                "random_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_"}


class InitRecorder(TorchFunctionMode):
    """Records in-place calls (name ending in ``_``) whose target is a meta tensor."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.unsupported: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and name != "requires_grad_":
            target, where = _target(args, kwargs)
            if target is not None and target.is_meta:
                others = [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a) and a is not target]
                if target._base is not None or others:
                    self.unsupported = self.unsupported or f"{name} on a view or from another tensor"
                self.calls.append((func, args, kwargs, where))
        return func(*args, **kwargs)


def _target(args, kwargs):
    if args and torch.is_tensor(args[0]):
        return args[0], 0
    if torch.is_tensor(kwargs.get("tensor")):  # nn.init.* dispatch with tensor=...
        return kwargs["tensor"], "tensor"
    return None, None


def build_deferred(build, *build_args) -> tuple[nn.Module, "DeferredInit | None"]:
    """``build(*build_args)`` on the meta device, recorded. Returns the model and its DeferredInit,
    or (the model built in RAM, None) when the recording cannot be replayed exactly."""
    rng = torch.get_rng_state()
    recorder = InitRecorder()
    with torch.device("meta"), recorder:
        model = build(*build_args)
    problem = recorder.unsupported or ("buffers computed at build time" if list(model.buffers()) else None)
    if problem is None:
        return model, DeferredInit(model, recorder.calls, rng)
    torch.set_rng_state(rng)
    return build(*build_args), None


class DeferredInit:
    def __init__(self, model: nn.Module, calls: list[tuple], rng_state: torch.Tensor):
        self.model = model
        self.calls = calls
        self.rng_state = rng_state
        # the parameters as built (held: the recorded calls name them by identity), even once a
        # backend has replaced them (FSDP's sharded parameters)
        self.params = dict(model.named_parameters())

    def replay(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, initialised tensor) for every parameter of the model, each as soon as it is
        final. Leaves the global RNG where the eager build would have left it."""
        names = {id(p): n for n, p in self.params.items()}
        # A parameter's values are made by its calls from its last overwriting one on (modules
        # initialise in their constructors, the model often again after): earlier calls only
        # need to consume the RNG, on scratch tensors, so a parameter is in RAM briefly.
        first_call, last_call = {}, {}
        for i, (func, args, kwargs, where) in enumerate(self.calls):
            target = args[0] if where == 0 else kwargs[where]
            if id(target) in names:
                name = names[id(target)]
                last_call[name] = i
                if name not in first_call or func.__name__ in _OVERWRITING:
                    first_call[name] = i
        for name, p in self.params.items():  # never initialised: zeros rather than garbage
            if name not in last_call:
                yield name, torch.zeros(p.shape, dtype=p.dtype)
        torch.set_rng_state(self.rng_state)
        live: dict[int, torch.Tensor] = {}
        self.peak_live = 0  # most parameters in RAM at once (a stage's worth for stage-ordered inits)
        for i, (func, args, kwargs, where) in enumerate(self.calls):
            target = args[0] if where == 0 else kwargs[where]
            name = names.get(id(target))
            real = live.get(id(target))
            if real is None:
                real = torch.empty(target.shape, dtype=target.dtype)
                if name is not None and first_call[name] <= i:
                    live[id(target)] = real
                    self.peak_live = max(self.peak_live, len(live))
            with torch.no_grad():
                if where == 0:
                    func(real, *args[1:], **kwargs)
                else:
                    func(*args, **{**kwargs, where: real})
            if name is not None and last_call[name] == i:
                yield name, live.pop(id(target))

    def materialize(self) -> None:
        """Give the model real, initialised weights in RAM (for what needs them all at once)."""
        values = dict(self.replay())
        self.model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(values.pop(name))
