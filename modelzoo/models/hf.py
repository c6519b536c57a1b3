"""Our checkpoints <-> HuggingFace transformers directories (config.json + model.safetensors +
a tokenizer that ``PreTrainedTokenizerFast`` loads).

Each model's spec (``SPEC.hf`` in its file) has one table pairing each of our tensors with its
transformers name(s) and layout, and both directions walk the same table, so export and import
cannot drift apart. Layout differences: GPT-2's ``Conv1D`` stores weights transposed; GPT-J and
BERT keep q, k and v as three Linear layers where we keep one fused ``qkv``; GPT-NeoX fuses them
head by head; tied weights are stored once.

transformers is an optional dependency (``pip install -e ".[hf]"``): only the export needs it (to
write a complete config.json); import reads config.json and the weights directly (safetensors, or
``pytorch_model.bin`` through torch's weights-only loader; single or sharded with an index).

transformers 4.x reads config.json keys that 5.x moved (GPT-NeoX's ``rotary_pct`` and
``rotary_emb_base`` now live in ``rope_parameters``) and silently takes its defaults when they are
missing, so the export writes both spellings (``LEGACY_KEYS``), and ``pytorch_model.bin`` on request
for code that reads no safetensors (GenSLM's transformers fork).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from pydantic import ValidationError

from modelzoo.config import ModelConfig, describe_validation_error
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.files import output_dir
from modelzoo.models import MODELS, spec_of
from modelzoo.models.spec import HEADWISE_QKV, SPLIT_QKV, TRANSPOSED

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
# config.json keys of transformers 4.x that 5.x writes elsewhere: model_type -> {4.x key: 5.x path}
LEGACY_KEYS = {"gpt_neox": {"rotary_pct": ("rope_parameters", "partial_rotary_factor"),
                            "rotary_emb_base": ("rope_parameters", "rope_theta")}}
# transformers 5.x's in-memory name of an LM head that 4.x files call otherwise (a state dict
# saved from a 5.x model, rather than through save_pretrained, carries it)
RENAMED_HEADS = {"lm_head.weight": "embed_out.weight"}
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


def hf_names(cfg: ModelConfig) -> list[str]:
    """The transformers names of every tensor ``from_hf_state`` reads, in table order."""
    return [n for _, names, _ in spec_of(cfg).hf.table(cfg) for n in (names if isinstance(names, tuple) else (names,))]


def from_hf_state(cfg: ModelConfig, theirs: dict[str, torch.Tensor],
                  source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our model state (fp32) from a transformers state; also the transformers tensors not used."""
    spec = spec_of(cfg)
    ours, used = {}, set()
    table_names = set(hf_names(cfg))
    for new, old in RENAMED_HEADS.items():
        if new in theirs and old in table_names and old not in theirs:
            theirs = {(old if k == new else k): v for k, v in theirs.items()}

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
            try:
                return spec.hf.fields(hf, get, need)
            except (TypeError, AttributeError, ValueError) as e:  # a key of the wrong type, e.g. a list
                raise ConfigError(f"{source}: malformed {kind} config ({type(e).__name__}: {e})") from None
    convertible = ", ".join(spec.hf.model_type for spec in MODELS.values())
    raise ConfigError(f"{source}: model_type {kind!r} is not supported; convertible: {convertible}")


def check_matches(cfg: ModelConfig, fields: dict, source: str) -> None:
    """The params' model section must describe the same network as the transformers config."""
    try:
        theirs_cfg = ModelConfig.model_validate(fields)
    except ValidationError as e:  # one line, naming each of our keys its values give (model.num_heads: ...)
        problems = [line.removeprefix(f"{source}: ") for line in
                    describe_validation_error(e, source, ("model",)).splitlines()]
        raise ConfigError(f"{source}: describes a network this toolkit cannot build: {'; '.join(problems)}") from None
    keys = spec_of(cfg).hf.keys
    ours, theirs = keys(cfg), keys(theirs_cfg)
    for key, value in theirs.items():
        same = math.isclose(ours[key], value, rel_tol=1e-9) if isinstance(value, float) else ours[key] == value
        if not same:
            raise ConfigError(f"{source}: {key} is {value!r} but the params say model.{key}: {ours[key]!r}")


# ---------------------------------------------------------------- directories

EXPORT_TOOL = "modelzoo.tools.convert_checkpoint --to hf"  # the owner named in its OWNER_MARKER


def save_hf(out_dir: Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
            label_names: list[str] | None = None, overwrite: bool = False, inputs=(),
            pytorch_bin: bool = False) -> None:
    """Write config.json (with ``LEGACY_KEYS``), model.safetensors (and pytorch_model.bin with
    ``pytorch_bin``) and tokenizer files; out_dir appears whole or not at all. A non-empty out_dir
    is refused (``UserError``), and with ``overwrite`` replaced only when it is an earlier export
    (``modelzoo.files.output_dir``), never when it holds anything else or one of ``inputs``."""
    from safetensors.torch import save_file

    config = hf_config(cfg, label_names)
    weights = to_hf_state(cfg, state)
    with output_dir(out_dir, EXPORT_TOOL, overwrite, inputs) as tmp:
        config.save_pretrained(tmp)
        _add_legacy_keys(tmp / "config.json")
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only
        if pytorch_bin:
            torch.save(weights, tmp / BIN_FILE)
        write_tokenizer(tmp, cfg.max_position_embeddings)


def _add_legacy_keys(path: Path) -> None:
    config = json.loads(path.read_text())
    for key, (section, name) in LEGACY_KEYS.get(config.get("model_type"), {}).items():
        value = (config.get(section) or {}).get(name)
        if value is not None:
            config.setdefault(key, value)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tokenizer(out_dir: Path, max_length: int) -> None:
    tok = CodonTokenizer()
    shutil.copyfile(tok.json_path, out_dir / "tokenizer.json")
    specials = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "mask_token": "[MASK]"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, **specials}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def read_hf(in_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and all weights (safetensors, else pytorch_model.bin; single or sharded) of a
    transformers directory."""
    in_dir = Path(in_dir)
    config_path = in_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{in_dir}: no config.json (not a transformers model directory)")
    config = _read_json(config_path, "config.json")
    for single, index in ((WEIGHTS_FILE, INDEX_FILE), (BIN_FILE, BIN_INDEX_FILE)):
        if (in_dir / single).is_file():
            files = [in_dir / single]
            break
        if (in_dir / index).is_file():
            files = _indexed_files(in_dir, index)
            break
    else:
        raise CheckpointError(f"{in_dir}: no {WEIGHTS_FILE}, {BIN_FILE} or their index files")
    state = {}
    for f in files:
        state.update(_read_weights(f))
    return config, state


def _read_json(path: Path, what: str) -> dict:
    """A JSON object, or one line saying why the file is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, not a {type(value).__name__}")
    return value


def _indexed_files(in_dir: Path, index_name: str) -> list[Path]:
    """The shard files an index's weight_map names: each a plain file name inside in_dir."""
    path = in_dir / index_name
    weight_map = _read_json(path, index_name).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: no 'weight_map' object of tensor names to shard files")
    for name in weight_map.values():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: weight_map names {name!r}, not a file name in {in_dir}")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not (in_dir / name).is_file():
            raise CheckpointError(f"{path}: weight_map names {name}, which {in_dir} lacks")
    return [in_dir / name for name in names]


def _read_weights(f: Path) -> dict[str, torch.Tensor]:
    """One weights file: safetensors, or a torch.save file of tensors only (weights_only, its
    zip bounded by its size)."""
    from safetensors.torch import load_file

    if f.suffix == ".safetensors":
        try:
            return load_file(str(f))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{f}: cannot read safetensors ({str(e).splitlines()[0][:200]})") from None
    from modelzoo.torch_zip import check_expansion
    check_expansion(f)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # refused by weights_only, truncated, not a torch file
        raise CheckpointError(f"{f}: cannot be read as tensors ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{f}: not a state dict of tensors")
    return state


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError('exporting to transformers needs the hf extra: pip install -e ".[hf]"') from None
    return transformers
