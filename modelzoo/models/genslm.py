"""Read GenSLM's released checkpoints: PyTorch Lightning files whose ``state_dict`` holds a
transformers ``GPTNeoXForCausalLM`` under ``model.``, beside Lightning's own objects
(hyper-parameters, callbacks, optimizer and loop states).

Those files are pickles, and a pickle may name any Python callable to run while it loads. This
reader never imports or calls one: the unpickler builds tensors through torch's own rebuild
functions (the ones ``torch.load(weights_only=True)`` allows) and turns every other name into an
inert stand-in that only records what it was given. Only the ``state_dict`` tensors are kept, so
whatever the file's other objects would have done, nothing runs.
"""

from __future__ import annotations

import collections
import pickle
import types
from pathlib import Path

import torch

from modelzoo.errors import CheckpointError

# What torch.save writes for tensors, sizes and dtypes: rebuilt for real (the same set weights_only allows).
_REAL = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
}
PREFIX = "model."  # GenSLM's LightningModule holds the transformers model as self.model
# Buffers of older transformers' GPT-NeoX attention (causal mask, masking value, rotary table):
# no weights, recomputed from the config (GenSLM strips the first two with remove_neox_attention_bias).
BUFFER_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


class _Inert:
    """Stands in for any object the pickle names: accepts every construction step, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.state, self.items = args, None, []

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # e.g. what getattr(cls, name) would have returned
        return _Inert(*args, **kwargs)

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)


def _inert_class(module: str, name: str) -> type:
    return type(f"Inert[{module}.{name}]", (_Inert,), {})


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        real = _REAL.get((module, name))
        if real is not None:
            return real
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _inert_class(module, name)


_INERT_PICKLE = types.SimpleNamespace(Unpickler=_InertUnpickler, __name__="modelzoo_inert_pickle",
                                      load=lambda f, **kw: _InertUnpickler(f, **kw).load())


def read_lightning_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The transformers state dict inside a GenSLM Lightning checkpoint (``model.`` prefix removed,
    attention buffers dropped), read without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # weights_only=False only lets torch take our pickle module, which imports nothing.
        content = torch.load(path, map_location="cpu", pickle_module=_INERT_PICKLE, weights_only=False, mmap=True)
    except Exception as e:  # not a torch zip file, truncated, ...
        why = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {why})") from None
    state = content.get("state_dict") if isinstance(content, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'state_dict' (not a PyTorch Lightning checkpoint of GenSLM)")
    tensors = {k[len(PREFIX):]: v for k, v in state.items()
               if isinstance(k, str) and k.startswith(PREFIX) and isinstance(v, torch.Tensor)}
    if "gpt_neox.embed_in.weight" not in tensors:
        raise CheckpointError(f"{path}: state_dict has no model.gpt_neox.embed_in.weight "
                              f"(not a GenSLM GPT-NeoX checkpoint)")
    return {k: v for k, v in tensors.items() if not k.endswith(BUFFER_SUFFIXES)}


def read_architecture(path: str | Path) -> dict:
    """A GenSLM architecture file (a transformers config.json). GenSLM's 25B file writes Python's
    ``True``, which JSON lacks; YAML, a superset of JSON, reads it as true."""
    import yaml
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read architecture file ({e.strerror or e})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a JSON architecture file ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or config.get("model_type") != "gpt_neox":
        raise CheckpointError(f"{path}: not a GPT-NeoX config (model_type {config.get('model_type')!r})"
                              if isinstance(config, dict) else f"{path}: not a JSON object")
    return config


def params_of(arch: dict, source: str, model_dir: str | Path):
    """Params (model section and model_dir) describing the network of a GenSLM architecture file,
    its dropout included."""
    from modelzoo.config import validate_params
    from modelzoo.models import hf

    fields = hf.model_fields_from_hf(arch, source)
    fields.update(dropout_rate=float(arch.get("hidden_dropout_prob", arch.get("hidden_dropout", 0.0))),
                  attention_dropout_rate=float(arch.get("attention_probs_dropout_prob",
                                                        arch.get("attention_dropout", 0.0))))
    return validate_params({"model": fields, "runconfig": {"model_dir": str(model_dir)}}, source, check_paths=False)
