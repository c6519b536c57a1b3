"""Our checkpoints <-> HuggingFace transformers directories (config.json + model.safetensors +
a tokenizer that ``PreTrainedTokenizerFast`` loads).

Each model's spec (``SPEC.hf`` in its file) has one table pairing each of our tensors with its
transformers name(s) and layout, and both directions walk the same table, so export and import
cannot drift apart. Layout differences: GPT-2's ``Conv1D`` stores weights transposed; GPT-J and
BERT keep q, k and v as three Linear layers where we keep one fused ``qkv``; GPT-NeoX fuses them
head by head; tied weights are stored once.

transformers is an optional dependency (``pip install -e ".[hf]"``): only the export needs it (to
write a complete config.json); import reads config.json and safetensors directly.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from modelzoo.config import ModelConfig
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.files import output_dir
from modelzoo.models import MODELS, spec_of
from modelzoo.models.spec import HEADWISE_QKV, SPLIT_QKV, TRANSPOSED

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors transformers files may hold that carry no weights of ours: causal-mask and position
# buffers of older versions, and second copies of tied weights (each spec lists its own).
IGNORED_SUFFIXES = tuple(sorted({suffix for spec in MODELS.values() for suffix in spec.hf.buffers}))


def architecture(cfg: ModelConfig) -> str:
    return spec_of(cfg).hf.architecture(cfg)


# ---------------------------------------------------------------- tensors

def _headwise(tensor: torch.Tensor, heads: int, to_hf: bool) -> torch.Tensor:
    """NeoX's fused q/k/v rows go head by head ([q k v] of head 0, then head 1, ...); ours are
    [all q; all k; all v]. The same permutation both ways, with the two leading axes swapped."""
    shape = (3, heads, -1) if to_hf else (heads, 3, -1)
    return tensor.unflatten(0, shape).transpose(0, 1).flatten(0, 2).contiguous()


def to_hf_state(cfg: ModelConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, theirs, kind in spec_of(cfg).hf.table(cfg):
        tensor = ours[name]
        if kind == TRANSPOSED:
            out[theirs] = tensor.t().contiguous()
        elif kind == HEADWISE_QKV:
            out[theirs] = _headwise(tensor, cfg.num_heads, to_hf=True)
        elif kind == SPLIT_QKV:
            # safetensors refuses tensors that share storage, so each third is its own copy
            for hf_name, part in zip(theirs, tensor.chunk(3, dim=0)):
                out[hf_name] = part.clone()
        else:
            out[theirs] = tensor.contiguous()
    return out


def from_hf_state(cfg: ModelConfig, theirs: dict[str, torch.Tensor],
                  source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our model state (fp32) from a transformers state; also the transformers tensors not used."""
    spec = spec_of(cfg)
    ours, used = {}, set()

    def get(name: str) -> torch.Tensor:
        if name not in theirs:
            raise CheckpointError(f"{source}: no tensor {name!r} (is it a {architecture(cfg)}?)")
        used.add(name)
        return theirs[name].to(torch.float32)

    for name, hf_name, kind in spec.hf.table(cfg):
        if kind == TRANSPOSED:
            ours[name] = get(hf_name).t().contiguous()
        elif kind == HEADWISE_QKV:
            ours[name] = _headwise(get(hf_name), cfg.num_heads, to_hf=False)
        elif kind == SPLIT_QKV:
            ours[name] = torch.cat([get(n) for n in hf_name], dim=0)
        else:
            ours[name] = get(hf_name)
    for alias, target in spec.hf.tied.items():
        ours[alias] = ours[target]
    unused = sorted(k for k in theirs if k not in used and not k.endswith(spec.hf.buffers))
    return ours, unused


# ---------------------------------------------------------------- configs

def hf_config(cfg: ModelConfig, label_names: list[str] | None = None):
    """The transformers config object of the twin of ``cfg``."""
    transformers = require_transformers()
    common = dict(vocab_size=cfg.vocab_size, initializer_range=cfg.initializer_range,
                  pad_token_id=CodonTokenizer().pad_id, bos_token_id=None, eos_token_id=None,
                  architectures=[architecture(cfg)])
    return spec_of(cfg).hf.config(transformers, cfg, common, label_names)


def model_fields_from_hf(hf: dict, source: str) -> dict:
    """Our model keys implied by a transformers config.json (refusing variants we do not build)."""
    kind = hf.get("model_type")

    def get(key):
        if key not in hf:
            raise ConfigError(f"{source}: no {key!r} (not a complete {kind} config)")
        return hf[key]

    def need(key, allowed):
        if hf.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"{source}: {key} {hf.get(key)!r} is not supported (need {allowed[0]!r})")

    for spec in MODELS.values():
        if spec.hf.model_type == kind:
            return spec.hf.fields(hf, get, need)
    convertible = ", ".join(spec.hf.model_type for spec in MODELS.values())
    raise ConfigError(f"{source}: model_type {kind!r} is not supported; convertible: {convertible}")


def check_matches(cfg: ModelConfig, fields: dict, source: str) -> None:
    """The params' model section must describe the same network as the transformers config."""
    try:
        theirs_cfg = ModelConfig.model_validate(fields)
    except ValueError as e:
        raise ConfigError(f"{source}: describes a network this toolkit cannot build ({e})") from None
    keys = spec_of(cfg).hf.keys
    ours, theirs = keys(cfg), keys(theirs_cfg)
    for key, value in theirs.items():
        same = math.isclose(ours[key], value, rel_tol=1e-9) if isinstance(value, float) else ours[key] == value
        if not same:
            raise ConfigError(f"{source}: {key} is {value!r} but the params say model.{key}: {ours[key]!r}")


# ---------------------------------------------------------------- directories

EXPORT_TOOL = "modelzoo.tools.convert_checkpoint --to hf"  # the owner named in its OWNER_MARKER


def save_hf(out_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
            label_names: list[str] | None = None, overwrite: bool = False, inputs=()) -> None:
    """Write config.json, model.safetensors and tokenizer files; out_dir appears whole or not at
    all. A non-empty out_dir is refused (``UserError``), and with ``overwrite`` replaced only
    when it is an earlier export (``modelzoo.files.output_dir``), never when it holds anything
    else or one of ``inputs``."""
    from safetensors.torch import save_file

    config = hf_config(cfg, label_names)
    with output_dir(out_dir, EXPORT_TOOL, overwrite, inputs) as tmp:
        config.save_pretrained(tmp)
        save_file(to_hf_state(cfg, state), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only
        write_tokenizer(tmp, cfg.max_position_embeddings)


def write_tokenizer(out_dir: Path, max_length: int) -> None:
    tok = CodonTokenizer()
    shutil.copyfile(tok.json_path, out_dir / "tokenizer.json")
    specials = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "mask_token": "[MASK]"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, **specials}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def read_hf(in_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and all weights (single or sharded safetensors) of a transformers directory."""
    from safetensors.torch import load_file

    in_dir = Path(in_dir)
    config_path = in_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{in_dir}: no config.json (not a transformers model directory)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
    if (in_dir / WEIGHTS_FILE).is_file():
        files = [in_dir / WEIGHTS_FILE]
    elif (in_dir / INDEX_FILE).is_file():
        index = json.loads((in_dir / INDEX_FILE).read_text())
        files = [in_dir / f for f in sorted(set(index["weight_map"].values()))]
    else:
        raise CheckpointError(f"{in_dir}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are read)")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return config, state


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError('exporting to transformers needs the hf extra: pip install -e ".[hf]"') from None
    return transformers
