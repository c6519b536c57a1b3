"""GenSLM's checkpoints in and out: files holding a transformers ``GPTNeoXForCausalLM`` (4.x key
names) in any of the layouts GenSLM users have, and the file GenSLM's own loader reads back.

Layouts (told apart by their keys, ``LAYOUTS``): GenSLM's Lightning checkpoints (``state_dict``
with the model under ``model.``, also what Lightning's DeepSpeed conversion writes); the
unprefixed ``state_dict`` that GenSLM's ``GenSLM`` class loads (into a bare GPTNeoXForCausalLM);
DeepSpeed's consolidated fp32 state dict (``zero_to_fp32``: a bare dict under Lightning's wrapper,
``_forward_module.model.`` or ``module.model.``, or ``module.``) and its model-states file (the
same under ``module``); and any of these re-saved from a newer transformers, which calls the LM
head ``lm_head`` instead of ``embed_out``.

Those files are pickles, and a pickle may name any Python callable to run while it loads. This
reader never imports or calls one: the unpickler builds tensors through an explicit allowlist of
torch's rebuild functions and dtypes and turns every other name into an inert stand-in that only
records what it was given (no attribute is looked up on any module, so no lazy import runs);
BUILD (set an object's state) applies only to those stand-ins; and the archive may not expand
beyond its own size (``modelzoo.torch_zip``). Only the tensors are kept.
"""

from __future__ import annotations

import collections
import math
import pickle
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from modelzoo.errors import CheckpointError
from modelzoo.models.hf import RENAMED_HEADS, model_fields_from_hf
from modelzoo.torch_zip import check_expansion

# What torch.save writes for tensors, sizes and dtypes: rebuilt for real.
_REAL = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    **{("torch", name): getattr(torch, name) for name in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")},
}
# Buffers of transformers 4.x's GPT-NeoX attention (causal mask, masking value, rotary table): no
# weights, recomputed from the config (GenSLM strips the first with remove_neox_attention_bias).
BUFFER_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
EMBED_IN = "gpt_neox.embed_in.weight"


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


def _load_build(self) -> None:
    """BUILD: only a stand-in takes the state. A fresh OrderedDict's state (a module's state_dict
    carries ``_metadata``) is dropped; anything else, such as a real function whose defaults the
    state would replace, is refused."""
    state, target = self.stack.pop(), self.stack[-1]
    if isinstance(target, _Inert):
        target.__setstate__(state)
    elif type(target) is not collections.OrderedDict:
        raise pickle.UnpicklingError(f"BUILD on {getattr(target, '__qualname__', type(target).__name__)} refused "
                                     f"(only stand-ins take state)")


class _InertUnpickler(pickle._Unpickler):
    """Python's own unpickler (the C one cannot be told what BUILD may touch); the pickle of a
    torch.save file holds only the structure, the tensor bytes are separate records."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str):
        return _REAL[module, name] if (module, name) in _REAL else _inert_class(module, name)


_INERT_PICKLE = types.SimpleNamespace(Unpickler=_InertUnpickler, __name__="modelzoo_inert_pickle",
                                      load=lambda f, **kw: _InertUnpickler(f, **kw).load())


def read_pickled(path: str | Path):
    """The content of a torch.save file, every object but tensors, plain data and OrderedDicts
    an inert stand-in, read without running any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    check_expansion(path)
    try:
        # weights_only=False only lets torch take our pickle module, which imports nothing.
        return torch.load(path, map_location="cpu", pickle_module=_INERT_PICKLE, weights_only=False, mmap=True)
    except Exception as e:  # not a torch zip file, truncated, a refused BUILD, ...
        why = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {why})") from None


# ---------------------------------------------------------------- layouts

@dataclass(frozen=True)
class Layout:
    container: str | None  # the top-level key holding the tensors, or None: the file is the state dict
    prefix: str  # before each transformers name

    @property
    def name(self) -> str:
        return f"{_PREFIXES[self.prefix]} in {_CONTAINERS[self.container]}"

    def describe(self) -> str:
        return f"{self.name} (keys '{self.prefix}gpt_neox...')"


# Where the tensors are (Lightning's checkpoint dict; DeepSpeed's model-states file; the file
# itself, as zero_to_fp32 and torch.save(model.state_dict()) write it) ...
_CONTAINERS = {"state_dict": "a Lightning checkpoint's state_dict", "module": "a DeepSpeed model-states file",
               None: "a bare state dict"}
# ... and what wraps the GPTNeoXForCausalLM there: GenSLM's LightningModule (self.model), nothing
# (GenSLM's own loader, transformers), Lightning's DeepSpeed wrapper (>= 1.8 and before), DeepSpeed.
_PREFIXES = {"model.": "GenSLM's LightningModule", "": "unprefixed GPT-NeoX",
             "_forward_module.model.": "Lightning >= 1.8 DeepSpeed", "module.model.": "Lightning < 1.8 DeepSpeed",
             "module.": "DeepSpeed"}
LAYOUTS = tuple(Layout(container, prefix) for container in _CONTAINERS for prefix in _PREFIXES)


@dataclass
class GenSLMState:
    tensors: dict[str, torch.Tensor]  # transformers 4.x names, no buffers
    layout: Layout
    path: Path

    def require(self, names) -> None:
        """Refuse, naming the first one as the file spells it, a state missing any of ``names``."""
        renamed = {old: new for new, old in RENAMED_HEADS.items()}
        for name in names:
            if name not in self.tensors:
                key = self.layout.prefix + name + (f" (or {renamed[name]})" if name in renamed else "")
                raise CheckpointError(f"{self.path}: no tensor {key!r} in this {self.layout.describe()}: "
                                      f"checkpoint and architecture file differ")


def _layout_of(content) -> tuple[Layout, dict] | None:
    for layout in LAYOUTS:
        holder = content.get(layout.container) if layout.container else content
        if isinstance(holder, dict) and layout.prefix + EMBED_IN in holder:
            return layout, holder
    return None


def read_checkpoint(path: str | Path) -> GenSLMState:
    """The transformers GPT-NeoX state inside a GenSLM-shaped file (any of ``LAYOUTS``; prefix
    removed, ``lm_head`` named ``embed_out``, attention buffers dropped)."""
    path = Path(path)
    content = read_pickled(path)
    found = _layout_of(content) if isinstance(content, dict) else None
    if found is None:
        containers = ", ".join(_CONTAINERS.values())
        prefixes = ", ".join(repr(prefix + "gpt_neox...") for prefix in _PREFIXES)
        raise CheckpointError(f"{path}: no tensor {EMBED_IN!r} under any layout this reader knows (not a GenSLM "
                              f"GPT-NeoX checkpoint): keys {prefixes} in {containers}")
    layout, holder = found
    tensors = {}
    for key, value in holder.items():
        if isinstance(key, str) and key.startswith(layout.prefix) and isinstance(value, torch.Tensor):
            name = key[len(layout.prefix):]
            if not name.endswith(BUFFER_SUFFIXES):
                tensors[RENAMED_HEADS.get(name, name)] = value
    return GenSLMState(tensors, layout, path)


# ---------------------------------------------------------------- architecture files

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
    _check_heads_divide(config, path)
    return config


def _check_heads_divide(arch: dict, path: Path) -> None:
    """GenSLM's 25B file says hidden_size 8196 with 64 heads: transformers builds 8196-wide
    tensors, but its attention splits them into 64 heads of 8196 // 64 = 128 and cannot run.
    Say so, and which width the heads do divide, rather than guess what the weights are."""
    hidden, heads = arch.get("hidden_size"), arch.get("num_attention_heads")
    if not (isinstance(hidden, int) and isinstance(heads, int) and heads > 0) or hidden % heads == 0:
        return
    nearest = max(heads, round(hidden / heads) * heads)
    raise CheckpointError(
        f"{path}: hidden_size {hidden} is not a multiple of its {heads} heads ({hidden / heads:g} per head), so "
        f"no GPT-NeoX (transformers' included) can run this architecture; the nearest valid one is hidden_size "
        f"{nearest} ({heads} heads of {nearest // heads}, as configs/genslm/neox_25B_msl2048.yaml): if the "
        f"checkpoint's gpt_neox.embed_in.weight is {nearest} wide, pass a copy of this file with that hidden_size")


def params_of(arch: dict, source: str, model_dir: str | Path):
    """Params (model section and model_dir) describing the network of a GenSLM architecture file.
    Dropout is 0 whatever the file says: GenSLM's transformers fork has no dropout layers in
    GPT-NeoX, so its models were trained, and are fine-tuned, without any."""
    from modelzoo.config import validate_params

    fields = model_fields_from_hf(arch, source)
    fields.update(dropout_rate=0.0, attention_dropout_rate=0.0)
    return validate_params({"model": fields, "runconfig": {"model_dir": str(model_dir)}}, source, check_paths=False)


def check_width(arch: dict, state: GenSLMState, config_path) -> None:
    """A checkpoint of another width than its architecture file: one line naming both."""
    embed = state.tensors[EMBED_IN]
    if embed.ndim == 2 and embed.shape[1] != arch.get("hidden_size"):
        raise CheckpointError(f"{state.path}: {state.layout.prefix}{EMBED_IN} is {embed.shape[1]} wide but "
                              f"{config_path} says hidden_size {arch.get('hidden_size')}")


# ---------------------------------------------------------------- export

def genslm_state(cfg, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What GenSLM's loader (a transformers 4.x GPTNeoXForCausalLM, ``load_state_dict(...,
    strict=False)``) reads: the tensors under their 4.x names, unprefixed, plus each layer's
    ``masked_bias`` and rotary ``inv_freq`` buffers as transformers 4.x computes them. The causal
    mask ``attention.bias`` is left out, as in GenSLM's released files (``*_bias_removed.pt``): it
    is a max_positions-squared constant that transformers rebuilds, and leaving it out is what
    lets GenSLM fine-tune at another length."""
    from modelzoo.models.gpt_neox import rotary_dims_of

    rotary = rotary_dims_of(cfg)
    inv_freq = 1.0 / (cfg.rotary_emb_base ** (torch.arange(0, rotary, 2).float() / rotary))
    state = dict(hf_state)
    for i in range(cfg.num_hidden_layers):
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    return state


def architecture_json(cfg) -> dict:
    """The architecture file of ``cfg`` in GenSLM's format (transformers 4.21 keys)."""
    from modelzoo.models.gpt_neox import rotary_dims_of
    return {"architectures": ["GPTNeoXForCausalLM"], "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_hidden_layers,
            "intermediate_size": cfg.ffn_size, "max_position_embeddings": cfg.max_position_embeddings,
            "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu_fast",
            "initializer_range": cfg.initializer_range, "layer_norm_eps": cfg.layer_norm_epsilon,
            "model_type": "gpt_neox", "rotary_emb_base": _plain_number(cfg.rotary_emb_base),
            "rotary_pct": rotary_dims_of(cfg) / cfg.head_dim, "tie_word_embeddings": False,
            "use_cache": True, "vocab_size": cfg.vocab_size}


def _plain_number(x: float):
    return int(x) if float(x).is_integer() and math.isfinite(x) else x
