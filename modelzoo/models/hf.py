"""Our checkpoints <-> HuggingFace transformers directories (config.json + model.safetensors +
a tokenizer that ``PreTrainedTokenizerFast`` loads).

One table per architecture pairs each of our tensors with its transformers name(s) and says how
the layout differs, and both directions walk the same table, so export and import cannot drift
apart. Layout differences: GPT-2's ``Conv1D`` stores weights transposed; GPT-J and BERT keep
q, k and v as three Linear layers where we keep one fused ``qkv``; tied weights are stored once.

transformers is an optional dependency (``pip install -e ".[hf]"``): only the export needs it (to
write a complete config.json); import reads config.json and safetensors directly.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Iterator

import torch

from modelzoo.config import ModelConfig
from modelzoo.data.tokenizer import CodonTokenizer
from modelzoo.errors import CheckpointError, ConfigError
from modelzoo.files import output_dir
from modelzoo.models.bert import TYPE_VOCAB_SIZE
from modelzoo.models.gptj import rotary_dim_of

SAME, TRANSPOSED, SPLIT_QKV = "same", "transposed", "split_qkv"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors transformers files may hold that carry no weights of ours: causal-mask and position
# buffers of older versions, and second copies of tied weights.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "embeddings.position_ids", "embeddings.token_type_ids",
                    "lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def architecture(cfg: ModelConfig) -> str:
    if cfg.name == "bert":
        return "BertForSequenceClassification" if cfg.num_labels else "BertForMaskedLM"
    return {"gpt2": "GPT2LMHeadModel", "gptj": "GPTJForCausalLM"}[cfg.name]


# ---------------------------------------------------------------- the tensor tables

def _linear(ours: str, theirs, kind: str = SAME, bias: bool = True) -> Iterator[tuple]:
    """A Linear layer: the weight (in the given layout) and, if present, its bias."""
    yield f"{ours}.weight", _suffixed(theirs, ".weight"), kind
    if bias:
        yield f"{ours}.bias", _suffixed(theirs, ".bias"), SPLIT_QKV if kind == SPLIT_QKV else SAME


def _norm(ours: str, theirs: str) -> Iterator[tuple]:
    yield from _linear(ours, theirs)


def _suffixed(theirs, suffix: str):
    return tuple(t + suffix for t in theirs) if isinstance(theirs, tuple) else theirs + suffix


def _gpt2(cfg: ModelConfig) -> Iterator[tuple]:
    yield "embeddings.tokens.weight", "transformer.wte.weight", SAME
    yield "embeddings.positions.weight", "transformer.wpe.weight", SAME
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        yield from _norm(ours + "ln_1", theirs + "ln_1")
        yield from _linear(ours + "attn.qkv", theirs + "attn.c_attn", TRANSPOSED)
        yield from _linear(ours + "attn.out", theirs + "attn.c_proj", TRANSPOSED)
        yield from _norm(ours + "ln_2", theirs + "ln_2")
        yield from _linear(ours + "mlp.fc_in", theirs + "mlp.c_fc", TRANSPOSED)
        yield from _linear(ours + "mlp.fc_out", theirs + "mlp.c_proj", TRANSPOSED)
    yield from _norm("head.ln_f", "transformer.ln_f")


def _gptj(cfg: ModelConfig) -> Iterator[tuple]:
    yield "embeddings.tokens.weight", "transformer.wte.weight", SAME
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        yield from _norm(ours + "ln_1", theirs + "ln_1")
        qkv = tuple(theirs + f"attn.{x}_proj" for x in "qkv")
        yield from _linear(ours + "attn.qkv", qkv, SPLIT_QKV, bias=False)
        yield from _linear(ours + "attn.out", theirs + "attn.out_proj", bias=False)
        yield from _linear(ours + "mlp.fc_in", theirs + "mlp.fc_in")
        yield from _linear(ours + "mlp.fc_out", theirs + "mlp.fc_out")
    yield from _norm("head.ln_f", "transformer.ln_f")
    yield from _linear("head.lm_head", "lm_head")


def _bert(cfg: ModelConfig) -> Iterator[tuple]:
    emb = "bert.embeddings."
    yield "embeddings.tokens.weight", emb + "word_embeddings.weight", SAME
    yield "embeddings.positions.weight", emb + "position_embeddings.weight", SAME
    yield "embeddings.token_types.weight", emb + "token_type_embeddings.weight", SAME
    yield from _norm("embeddings.norm", emb + "LayerNorm")
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        qkv = tuple(theirs + f"attention.self.{x}" for x in ("query", "key", "value"))
        yield from _linear(ours + "attn.qkv", qkv, SPLIT_QKV)
        yield from _linear(ours + "attn.out", theirs + "attention.output.dense")
        yield from _norm(ours + "ln_attn", theirs + "attention.output.LayerNorm")
        yield from _linear(ours + "mlp.fc_in", theirs + "intermediate.dense")
        yield from _linear(ours + "mlp.fc_out", theirs + "output.dense")
        yield from _norm(ours + "ln_mlp", theirs + "output.LayerNorm")
    if cfg.num_labels:
        yield from _linear("head.pooler", "bert.pooler.dense")
        yield from _linear("head.classifier", "classifier")
    else:
        yield from _linear("head.transform", "cls.predictions.transform.dense")
        yield from _norm("head.norm", "cls.predictions.transform.LayerNorm")
        yield "head.bias", "cls.predictions.bias", SAME


TABLES = {"gpt2": _gpt2, "gptj": _gptj, "bert": _bert}
# Our second name of a tied Parameter -> the name it is stored under.
TIED = {"gpt2": {"head.tokens.weight": "embeddings.tokens.weight"},
        "bert": {"head.tokens.weight": "embeddings.tokens.weight"}}


def to_hf_state(cfg: ModelConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, theirs, kind in TABLES[cfg.name](cfg):
        tensor = ours[name]
        if kind == TRANSPOSED:
            out[theirs] = tensor.t().contiguous()
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
    ours, used = {}, set()

    def get(name: str) -> torch.Tensor:
        if name not in theirs:
            raise CheckpointError(f"{source}: no tensor {name!r} (is it a {architecture(cfg)}?)")
        used.add(name)
        return theirs[name].to(torch.float32)

    for name, hf_name, kind in TABLES[cfg.name](cfg):
        if kind == TRANSPOSED:
            ours[name] = get(hf_name).t().contiguous()
        elif kind == SPLIT_QKV:
            ours[name] = torch.cat([get(n) for n in hf_name], dim=0)
        else:
            ours[name] = get(hf_name)
    for alias, target in TIED.get(cfg.name, {}).items():
        ours[alias] = ours[target]
    unused = sorted(k for k in theirs if k not in used and not k.endswith(IGNORED_SUFFIXES))
    return ours, unused


# ---------------------------------------------------------------- configs

def hf_config(cfg: ModelConfig, label_names: list[str] | None = None):
    """The transformers config object of the twin of ``cfg``."""
    transformers = require_transformers()
    pad_id = CodonTokenizer().pad_id
    common = dict(vocab_size=cfg.vocab_size, initializer_range=cfg.initializer_range, pad_token_id=pad_id,
                  bos_token_id=None, eos_token_id=None, architectures=[architecture(cfg)])
    if cfg.name in ("gpt2", "gptj"):
        common.update(n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                      n_layer=cfg.num_hidden_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size,
                      activation_function="gelu_new", resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate,
                      attn_pdrop=cfg.attention_dropout_rate, layer_norm_epsilon=cfg.layer_norm_epsilon)
        if cfg.name == "gpt2":
            return transformers.GPT2Config(tie_word_embeddings=True, **common)
        return transformers.GPTJConfig(rotary_dim=rotary_dim_of(cfg), tie_word_embeddings=False, **common)
    labels = {}
    if cfg.num_labels:
        names = label_names or [f"LABEL_{i}" for i in range(cfg.num_labels)]
        labels = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    return transformers.BertConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size, hidden_act="gelu", hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate, max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=TYPE_VOCAB_SIZE, layer_norm_eps=cfg.layer_norm_epsilon,
        tie_word_embeddings=True, **common, **labels)


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

    if kind in ("gpt2", "gptj"):
        need("activation_function", ("gelu_new", "gelu_pytorch_tanh"))
        need("tie_word_embeddings", (kind == "gpt2",))  # GPT-2 ties its LM head, GPT-J does not
        if kind == "gpt2":
            need("scale_attn_weights", (True,))
            need("scale_attn_by_inverse_layer_idx", (False,))
        heads, hidden = get("n_head"), get("n_embd")
        fields = dict(name=kind, vocab_size=get("vocab_size"), hidden_size=hidden,
                      num_hidden_layers=get("n_layer"), num_heads=heads,
                      filter_size=hf.get("n_inner") or 4 * hidden,
                      max_position_embeddings=get("n_positions"), layer_norm_epsilon=get("layer_norm_epsilon"))
        if kind == "gptj":
            fields["rotary_dim"] = hf.get("rotary_dim") or hidden // heads
        return fields
    if kind == "bert":
        need("hidden_act", ("gelu",))
        need("position_embedding_type", ("absolute",))
        need("type_vocab_size", (TYPE_VOCAB_SIZE,))
        need("tie_word_embeddings", (True,))
        is_classifier = any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or [])
        fields = dict(name="bert", vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                      num_hidden_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                      filter_size=get("intermediate_size"), max_position_embeddings=get("max_position_embeddings"),
                      layer_norm_epsilon=get("layer_norm_eps"))
        fields["num_labels"] = len(hf.get("id2label") or {}) if is_classifier else None
        return fields
    raise ConfigError(f"{source}: model_type {kind!r} is not supported; convertible: gpt2, gptj, bert")


def check_matches(cfg: ModelConfig, fields: dict, source: str) -> None:
    """The params' model section must describe the same network as the transformers config."""
    ours = {key: getattr(cfg, key) for key in fields}
    ours["filter_size"] = cfg.ffn_size
    if cfg.name == "gptj":
        ours["rotary_dim"] = rotary_dim_of(cfg)
        del fields["max_position_embeddings"]  # rotary positions: no tensor depends on the length
    for key, value in fields.items():
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
