"""The one table: what each Cerebras Model Zoo key becomes here (mapped, noted or refused), and
the small conversions of values whose spelling differs. docs/modelzoo.md is printed from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from modelzoo.config import CODON_VOCAB_SIZE


class Refused(Exception):
    """A value this toolkit cannot honour; the message says why, in one line."""


@dataclass(frozen=True)
class Rule:
    fate: str                          # mapped | noted | refused
    ours: str = ""                     # our key (section.key), for the docs and did-you-mean hints
    meaning: str = ""                  # the docs' text: how the value carries over, or why ignored/refused
    convert: Callable | None = None    # value, context -> our value (raise Refused); None: as it is


def mapped(ours: str, meaning: str = "same meaning", convert: Callable | None = None) -> Rule:
    return Rule("mapped", ours, meaning, convert)


def noted(meaning: str) -> Rule:
    return Rule("noted", "", meaning)


def refused(meaning: str) -> Rule:
    return Rule("refused", "", meaning)


HARDWARE = "Cerebras system setting; nothing to set on this emulation"
TEXT_DATA = "text data processor setting; codon shards carry their own tokenizer and windows"


def _lower(value, ctx=None) -> str:
    return str(value).lower()


def _optimizer_type(value, ctx) -> str:
    names = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
    if _lower(value) not in names:
        raise Refused(f"{value!r} is not an optimizer of this toolkit (AdamW, Adam or SGD, any case)")
    return names[_lower(value)]


def _fp16_type(value, ctx) -> str:
    kinds = {"bfloat16": "bfloat16", "float16": "float16", "cbfloat16": "bfloat16"}
    if _lower(value) not in kinds:
        raise Refused(f"{value!r}: give bfloat16, float16 or cbfloat16")
    if _lower(value) == "cbfloat16":
        ctx.notes.append("fp16_type cbfloat16 (Cerebras' own 16-bit float) computes in bfloat16 here")
    return kinds[_lower(value)]


class Several(dict):
    """A conversion's value that sets several of our keys (of the same section)."""


def _betas(value, ctx) -> Several:
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise Refused(f"{value!r}: expected [beta1, beta2]")
    return Several(beta1=value[0], beta2=value[1])


def _loss_scaling_factor(value, ctx) -> Several:
    """'dynamic' is our fp16 default; a number is a static scale: initial = min = max."""
    if value == "dynamic":
        return Several()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return Several(initial_loss_scale=float(value), min_loss_scale=float(value), max_loss_scale=float(value))
    raise Refused(f"{value!r}: expected 'dynamic' or a positive number")


def _drop_fraction(value, ctx) -> Several:
    """A number, or the Model Zoo's {type: cosine, init: F, half_period: N}: F decaying to 0 at N
    on a cosine, which is our rigl/set drop fraction with end_step N."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Several(drop_fraction=value)
    if isinstance(value, dict) and value.get("type", "cosine") == "cosine" and set(value) <= {"type", "init",
                                                                                            "half_period"}:
        out = Several(drop_fraction=value.get("init"))
        if "half_period" in value:
            out["end_step"] = value["half_period"]
        return out
    raise Refused(f"{value!r}: expected a number or {{type: cosine, init: F, half_period: N}}")


def _update(value, ctx) -> Several:
    """{freq: N, start: S, stop: E} -> update_frequency N, start_step S, end_step E."""
    names = {"freq": "update_frequency", "start": "start_step", "stop": "end_step"}
    if not isinstance(value, dict) or not set(value) <= set(names):
        raise Refused(f"{value!r}: expected {{freq: N, start: S, stop: E}}")
    return Several({names[k]: v for k, v in value.items()})


def _true_only(what: str):
    def check(value, ctx):
        if value is not True:
            raise Refused(f"{value!r}: {what}")
    return check


def _equal_to(expected, what: str):
    def check(value, ctx):
        if value != expected:
            raise Refused(f"{value!r}: {what}")
    return check


def _nonlinearity(value, ctx):
    """GELU only; the GPT models compute its tanh form (gelu_new), BERT the exact one (gelu)."""
    if _lower(value) not in ("gelu", "gelu_new"):
        raise Refused(f"{value!r}: the models compute GELU (gelu or gelu_new)")
    computed = "gelu" if ctx.model_name == "bert" else "gelu_new"
    if _lower(value) != computed:
        ctx.notes.append(f"{value}: {ctx.model_name} computes {computed} (GELU's "
                         f"{'exact' if computed == 'gelu' else 'tanh'} form, as transformers), within 1e-3 of {value}")


def _attention_type(value, ctx):
    if _lower(value) != "scaled_dot_product":
        raise Refused(f"{value!r}: attention scores are scaled by 1/sqrt(head_dim) (scaled_dot_product)")


def _initializer(value, ctx):
    """The model draws N(0, initializer_range); a normal or truncated normal around 0 carries its std."""
    if not isinstance(value, dict) or value.get("name", "normal") not in ("normal", "truncated_normal") \
            or value.get("mean", 0.0) != 0.0 or not isinstance(value.get("std"), (int, float)):
        raise Refused(f"{value!r}: only {{name: normal | truncated_normal, mean: 0, std: S}} maps "
                      f"(to initializer_range S)")
    if value.get("name") == "truncated_normal":
        ctx.notes.append(f"initializer truncated_normal(std {value['std']}) is drawn untruncated: "
                         f"N(0, {value['std']})")
    return float(value["std"])


def _data_dir(value, ctx):
    if isinstance(value, list):
        if len(value) != 1:
            raise Refused(f"{len(value)} directories: a run reads one shard directory (prepare_genomes writes all "
                          f"records of a split into one)")
        value = value[0]
    return value


def _vocab_size(value, ctx):
    if value != CODON_VOCAB_SIZE:
        ctx.notes.append(f"vocab_size {value} -> {CODON_VOCAB_SIZE}: the codon tokenizer's ids")
    return CODON_VOCAB_SIZE


def _sparsity_level(value, ctx):
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise Refused(f"{value!r}: a fraction of weights pruned, in [0, 1)")
    return round(1.0 - float(value), 12)


# Model Zoo's lora_params.target_modules name module classes, every one of which must be on a
# layer's path (its ancestors' classes and its own); ours name layers. The classes' layers here:
_BLOCK_PARTS = {"attn": ["attn.qkv", "attn.out"], "mlp": ["mlp.fc_in", "mlp.fc_out"]}
_LORA_CLASSES = {"MultiheadAttention": {"attn"}, "FeedForwardNetwork": {"mlp"}, "SingleFeedForwardLayer": {"mlp"},
                 **dict.fromkeys(("TransformerDecoderLayer", "TransformerEncoderLayer", "TransformerDecoder",
                                  "TransformerEncoder"), {"attn", "mlp"}),
                 "Linear": {"attn", "mlp", "head"}}
_LORA_KEYS = {"r", "alpha", "dropout", "target_modules", "merge_weights", "fan_in_fan_out"}


def _lora_params(value, ctx):
    """One Model Zoo LoraConfig -> model.lora (its defaults r 0, alpha 1 spelt out: ours differ)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, list):
        raise Refused(f"{len(value)} groups: model.lora trains one kind of adapter on all its targets")
    if not isinstance(value, dict) or not set(value) <= _LORA_KEYS:
        raise Refused(f"{value!r:.80}: expected {{{', '.join(sorted(_LORA_KEYS))}}}")
    if value.get("fan_in_fan_out"):
        raise Refused("fan_in_fan_out: true is for transposed (Conv1D) weights; every weight here is (out, in)")
    rank = value.get("r", 0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise Refused(f"r {rank!r}: adapters need a rank of at least 1 (r 0 trains none: leave lora_params out)")
    classes = value.get("target_modules")
    if classes is None:
        ctx.notes.append("lora_params without target_modules: adapters on every Linear layer; the Model Zoo's "
                         "would also adapt the embeddings, which stay frozen here")
        targets = ["*"]
    else:
        unknown = [c for c in (classes if isinstance(classes, list) else [classes]) if c not in _LORA_CLASSES]
        if unknown or not isinstance(classes, list) or not classes:
            raise Refused(f"target_modules {classes!r:.80}: give module classes among {', '.join(_LORA_CLASSES)} "
                          f"(adapters on Embedding are not implemented)")
        parts = set.intersection(*(_LORA_CLASSES[c] for c in classes))
        targets = ["*"] if "head" in parts else [t for part in sorted(parts) for t in _BLOCK_PARTS[part]]
    if value.get("merge_weights"):
        ctx.notes.append("lora_params.merge_weights: adapters stay apart; fold them into the weights with "
                         "python -m modelzoo.tools.convert_checkpoint --merge_lora")
    return {"rank": rank, "alpha": float(value.get("alpha", 1)), "dropout": value.get("dropout", 0.0),
            "targets": targets}


def load_states(value, ctx):
    return ",".join(map(str, value)) if isinstance(value, list) else value


# What each Model Zoo key becomes. Sections: 'input' is train_input/eval_input and the 2.4
# dataloaders; 'model', 'optimizer', 'runconfig', 'sparsity' as named; 'trainer.init...' the 2.4
# layout's own parts. Keys of ours not listed here pass through unchanged.
RULES: dict[tuple[str, str], Rule] = {
    # -------- data
    ("input", "data_dir"): mapped("data_dir", "a list of one directory is that directory; a list of several is "
                                  "refused (one shard directory per split)", _data_dir),
    ("input", "batch_size"): mapped("batch_size"),
    ("input", "max_sequence_length"): mapped("max_seq_length", "same meaning; when absent (GPT files) it is read "
                                             "from the shards' manifest"),
    ("input", "shuffle"): mapped("shuffle"),
    ("input", "shuffle_seed"): mapped("shuffle_seed"),
    ("input", "num_workers"): mapped("num_workers"),
    ("input", "masked_lm_prob"): mapped("mlm_probability", "same meaning (BERT)"),
    ("input", "mlm_probability"): mapped("mlm_probability", "same meaning (BERT)"),
    ("input", "data_processor"): noted(TEXT_DATA),
    ("input", "vocab_file"): noted(TEXT_DATA),
    ("input", "tokenizer_file"): noted(TEXT_DATA),
    ("input", "do_lower"): noted(TEXT_DATA),
    ("input", "max_predictions_per_seq"): noted("BERT text masking cap; codon masking selects mlm_probability of "
                                                "the codons, uncapped"),
    ("input", "whole_word_masking"): noted(TEXT_DATA),
    ("input", "mask_whole_word"): noted(TEXT_DATA),
    ("input", "prefetch_factor"): noted("DataLoader tuning; shards are memory-mapped"),
    ("input", "persistent_workers"): noted("DataLoader tuning; shards are memory-mapped"),
    ("input", "use_worker_cache"): noted(HARDWARE),
    ("input", "shuffle_buffer"): noted("streaming shuffle buffer; shards are shuffled whole by shuffle_seed"),
    ("input", "micro_batch_size"): noted("Cerebras compiler setting; set optimizer.grad_accum_steps to accumulate"),
    ("input", "use_vsl"): noted(HARDWARE),
    ("input", "repeat"): noted("the data repeats epoch after epoch until max_steps"),
    ("input", "pad_id"): noted(TEXT_DATA),
    ("input", "mixed_precision"): noted("precision is the model's setting"),
    ("input", "n_parallel_reads"): noted("DataLoader tuning; shards are memory-mapped"),
    ("input", "num_examples"): noted("the shards' manifest holds the number of windows"),
    ("input", "vocab_size"): noted(TEXT_DATA),
    ("input", "label_vocab_file"): noted(TEXT_DATA),
    ("input", "use_multiple_workers"): noted("DataLoader tuning; shards are memory-mapped"),
    ("input", "is_training"): noted("train_input is read for training, eval_input for evaluation"),
    # -------- model
    ("model", "name"): mapped("name", "gpt2 and gpt3 (GPT-2's architecture) -> gpt2; gptj -> gptj, or gpt_neox "
                              "with use_untied_layer_norm: true (the Model Zoo's GPT-NeoX); gpt_neox; bert, "
                              "bert/classifier -> bert. Absent (sectioned files): rotary positions give gptj "
                              "(gpt_neox with use_untied_layer_norm), BERT-only keys give bert, else gpt2"),
    ("model", "vocab_size"): mapped("vocab_size", "set to 69, the codon tokenizer's ids (noted when it differs)",
                                    _vocab_size),
    ("model", "hidden_size"): mapped("hidden_size"),
    ("model", "num_hidden_layers"): mapped("num_hidden_layers"),
    ("model", "num_heads"): mapped("num_heads"),
    ("model", "filter_size"): mapped("filter_size"),
    ("model", "max_position_embeddings"): mapped("max_position_embeddings"),
    ("model", "layer_norm_epsilon"): mapped("layer_norm_epsilon"),
    ("model", "initializer_range"): mapped("initializer_range"),
    ("model", "initializer"): mapped("initializer_range", "{name: normal | truncated_normal, mean: 0, std: S} -> "
                                     "S (drawn untruncated; noted); other initializers refused", _initializer),
    ("model", "embedding_initializer"): noted("initial weights only: embeddings start as N(0, initializer_range)"),
    ("model", "output_layer_initializer"): noted("initial weights only: GPT-2 scales its residual output "
                                                 "projections by 1/sqrt(2 x layers), the others use "
                                                 "initializer_range"),
    ("model", "mixed_precision"): mapped("mixed_precision"),
    ("model", "fp16_type"): mapped("fp16_type", "bfloat16, float16; cbfloat16 -> bfloat16 (noted)", _fp16_type),
    ("model", "dropout_rate"): mapped("dropout_rate", "one rate for embeddings, residual branches and MLP: "
                                      "dropout_rate, embedding_dropout_rate, residual_dropout_rate and task_dropout "
                                      "must agree where given (else refused)"),
    ("model", "embedding_dropout_rate"): mapped("dropout_rate", "see dropout_rate"),
    ("model", "residual_dropout_rate"): mapped("dropout_rate", "see dropout_rate"),
    ("model", "task_dropout"): mapped("dropout_rate", "BERT classifier's dropout before its classifier; see "
                                      "dropout_rate"),
    ("model", "attention_dropout_rate"): mapped("attention_dropout_rate"),
    ("model", "rotary_dim"): mapped("rotary_dim", "gptj: rotary_dim; gpt_neox: rotary_pct = rotary_dim / head_dim"),
    ("model", "rope_theta"): mapped("rotary_emb_base"),
    ("model", "rotary_emb_base"): mapped("rotary_emb_base"),
    ("model", "num_labels"): mapped("num_labels", "BERT classifier (then labels_file and label_column are "
                                    "needed in the inputs)"),
    ("model", "attention_softmax_fp32"): mapped("attention_in_fp32", "true: attention (scores, softmax, weighted "
                                                "values) in fp32 with mixed precision; false: in fp16_type"),
    ("model", "position_embedding_type"): mapped("", "selects the architecture: learned (gpt2, bert), rotary "
                                                 "(gptj, gpt_neox); another value is refused"),
    ("model", "share_embedding_weights"): mapped("", "selects the architecture: true for gpt2 and bert (tied "
                                                 "head), false for gptj and gpt_neox"),
    ("model", "use_untied_layer_norm"): mapped("", "selects the architecture: true with gptj is GPT-NeoX (two "
                                               "LayerNorms per block)"),
    ("model", "use_projection_bias_in_attention"): mapped("", "must match the model: true except gptj"),
    ("model", "use_ffn_bias_in_attention"): mapped("", "must match the model: true except gptj"),
    ("model", "use_ffn_bias"): mapped("", "must be true (every model's MLP has biases)"),
    ("model", "use_bias_in_output"): mapped("", "must match the model: true for gptj only"),
    ("model", "nonlinearity"): mapped("", "gelu or gelu_new: the model's GELU (GPT models compute the tanh form, "
                                      "gelu_new, as transformers; gelu is noted); others refused", _nonlinearity),
    ("model", "encoder_nonlinearity"): mapped("", "gelu or gelu_new: BERT's exact GELU (gelu_new is noted); others "
                                              "refused", _nonlinearity),
    ("model", "use_bfloat16"): mapped("fp16_type", "true -> bfloat16, false -> float16 (1.x name)",
                                      lambda v, c: "bfloat16" if v is True else "float16"),
    ("model", "use_position_embedding"): mapped("", "selects the architecture: true for gpt2 and bert, false for "
                                                "gptj and gpt_neox (rotary)"),
    ("model", "include_padding_in_loss"): mapped("", "must be false: [PAD] positions never count in the loss",
                                                 _equal_to(False, "[PAD] positions never count in the loss")),
    ("model", "mask_padding_in_positional_embed"): noted("[PAD] positions never count in the loss"),
    ("model", "use_cls_bias"): noted("BERT's next-sentence head: BERT here has none (codon records have no "
                                     "sentence pairs)"),
    ("model", "attention_type"): mapped("", "scaled_dot_product only", _attention_type),
    ("model", "pooler_nonlinearity"): mapped("", "tanh only (BERT's pooler)", _equal_to("tanh", "BERT's pooler is "
                                                                                              "tanh")),
    ("model", "mlm_nonlinearity"): mapped("", "gelu or gelu_new: BERT's MLM transform's exact GELU",
                                          _nonlinearity),
    ("model", "norm_type"): mapped("", "layernorm only", _equal_to("layernorm", "the models use LayerNorm")),
    ("model", "problem_type"): mapped("", "single_label_classification only (BERT classifier)",
                                      _equal_to("single_label_classification", "the classifier predicts one class "
                                                                               "per sequence")),
    ("model", "loss_scaling"): noted("the loss is the mean over predicted codons either way"),
    ("model", "loss_weight"): noted("the loss is the mean over predicted codons either way"),
    ("model", "mlm_loss_weight"): noted("the loss is the mean over masked codons"),
    ("model", "mlm_loss_scaling"): noted("the loss is the mean over masked codons"),
    ("model", "disable_nsp"): noted("BERT trains masked-codon prediction only: codon records have no sentence "
                                    "pairs"),
    ("model", "compute_eval_metrics"): noted("evaluation reports loss and perplexity"),
    ("model", "boundary_casting"): noted(HARDWARE),
    ("model", "tf_summary"): noted(HARDWARE),
    ("model", "attention_kernel"): noted(HARDWARE),
    ("model", "precision_opt_level"): noted(HARDWARE),
    ("model", "use_final_layer_norm"): mapped("", "must be true (every model ends with a LayerNorm)",
                                              _true_only("every model ends with a LayerNorm")),
    ("model", "embeddings_scale"): mapped("", "must be 1.0", _equal_to(1.0, "embeddings are not scaled")),
    ("model", "output_logits_scale"): refused("muP logit scaling is not implemented"),
    ("model", "output_logits_alpha"): refused("muP logit scaling is not implemented"),
    ("model", "attention_logits_alpha"): refused("muP attention scaling is not implemented"),
    ("model", "scale_qk_dot_by_d"): refused("muP attention scaling is not implemented"),
    ("model", "mup_base_hidden_size"): refused("muP is not implemented"),
    ("model", "mup_base_filter_size"): refused("muP is not implemented"),
    ("model", "num_kv_groups"): refused("grouped-query attention is not implemented"),
    ("model", "fixed_sparse_attention"): refused("sparse attention patterns are not implemented"),
    ("model", "attention_sliding_window_length"): refused("sliding-window attention is not implemented"),
    ("model", "alibi_trainable_slopes"): refused("ALiBi positions are not implemented"),
    ("model", "pos_scaling_factor"): mapped("", "must be 1.0", _equal_to(1.0, "position scaling is not "
                                                                              "implemented")),
    ("model", "lora_params"): mapped("lora", "one group: r -> rank, alpha, dropout; target_modules (module "
                                             "classes) -> the layers they hold, unset -> every Linear layer "
                                             "(embeddings stay frozen); merge_weights noted (convert_checkpoint "
                                             "--merge_lora folds); fan_in_fan_out true refused", _lora_params),
    # -------- optimizer
    ("optimizer", "optimizer_type"): mapped("optimizer_type", "adamw, adam, sgd in any case; others refused",
                                            _optimizer_type),
    ("optimizer", "learning_rate"): mapped("learning_rate", "a number, or phases: Constant, Linear, CosineDecay, "
                                           "Exponential, InverseSquareRootDecay, Step, Polynomial (1.x `steps` or "
                                           "`decay_steps` as total_iters), MultiStep and PiecewiseConstant (as "
                                           "Constant phases); others refused", None),
    ("optimizer", "betas"): mapped("beta1, beta2", "[b1, b2] -> beta1, beta2", _betas),
    ("optimizer", "beta1"): mapped("beta1"),
    ("optimizer", "beta2"): mapped("beta2"),
    ("optimizer", "eps"): mapped("eps"),
    ("optimizer", "weight_decay"): mapped("weight_decay"),
    ("optimizer", "weight_decay_rate"): mapped("weight_decay", "same meaning (1.x name)"),
    ("optimizer", "momentum"): mapped("momentum"),
    ("optimizer", "max_gradient_norm"): mapped("max_gradient_norm"),
    ("optimizer", "grad_accum_steps"): mapped("grad_accum_steps"),
    ("optimizer", "loss_scaling_factor"): mapped("initial_loss_scale, min_loss_scale, max_loss_scale", "dynamic: dynamic loss scaling (used with "
                                                 "fp16_type float16); a number S: a static scale (initial = min = "
                                                 "max = S)", _loss_scaling_factor),
    ("optimizer", "initial_loss_scale"): mapped("initial_loss_scale"),
    ("optimizer", "min_loss_scale"): mapped("min_loss_scale"),
    ("optimizer", "max_loss_scale"): mapped("max_loss_scale"),
    ("optimizer", "steps_per_increase"): mapped("steps_per_increase"),
    ("optimizer", "correct_bias"): mapped("", "must be true (torch's Adam corrects its bias)",
                                          _true_only("torch's Adam always corrects its bias")),
    ("optimizer", "epsilon"): mapped("eps", "same meaning (1.x name)"),
    ("optimizer", "disable_lr_steps_reset"): noted("schedule phases count steps from the run's start"),
    ("optimizer", "ws_summary"): noted(HARDWARE),
    ("optimizer", "log_summaries"): noted("TensorBoard gets loss, learning rate and gradient norm"),
    ("optimizer", "max_gradient_value"): refused("clipping by value is not implemented; use max_gradient_norm"),
    ("optimizer", "adjust_learning_rate"): refused("muP per-layer learning rates are not implemented"),
    ("optimizer", "amsgrad"): mapped("", "must be false", _equal_to(False, "AMSGrad is not implemented")),
    ("optimizer", "nesterov"): mapped("", "must be false", _equal_to(False, "Nesterov momentum is not "
                                                                              "implemented")),
    ("optimizer", "dampening"): mapped("", "must be 0", _equal_to(0, "SGD dampening is not implemented")),
    ("optimizer", "use_bias_correction"): mapped("", "must be true",
                                                 _true_only("torch's Adam always corrects its bias")),
    # -------- runconfig
    ("runconfig", "max_steps"): mapped("max_steps"),
    ("runconfig", "num_steps"): mapped("num_steps"),
    ("runconfig", "log_steps"): mapped("log_steps"),
    ("runconfig", "checkpoint_steps"): mapped("checkpoint_steps"),
    ("runconfig", "max_checkpoints"): mapped("max_checkpoints"),
    ("runconfig", "keep_checkpoint_max"): mapped("max_checkpoints", "same meaning (1.x name)"),
    ("runconfig", "eval_steps"): mapped("eval_steps"),
    ("runconfig", "eval_frequency"): mapped("eval_frequency"),
    ("runconfig", "seed"): mapped("seed"),
    ("runconfig", "model_dir"): mapped("model_dir"),
    ("runconfig", "mode"): mapped("mode"),
    ("runconfig", "checkpoint_path"): mapped("checkpoint_path"),
    ("runconfig", "load_checkpoint_states"): mapped("load_checkpoint_states", "a list or comma string",
                                                    load_states),
    ("runconfig", "num_csx"): mapped("num_csx"),
    ("runconfig", "save_initial_checkpoint"): noted("checkpoints are written every checkpoint_steps and at the end"),
    ("runconfig", "autoload_last_checkpoint"): noted("a run always resumes from model_dir's newest checkpoint"),
    ("runconfig", "disable_strict_checkpoint_loading"): noted("checkpoints load strictly"),
    ("runconfig", "use_cs_grad_accum"): noted(HARDWARE),
    ("runconfig", "enable_distributed"): noted("ranks are started by run.py (--num_workers_per_node, --num_csx)"),
    ("runconfig", "precision_opt_level"): noted(HARDWARE),
    ("runconfig", "num_wgt_servers"): noted(HARDWARE),
    ("runconfig", "num_act_servers"): noted(HARDWARE),
    ("runconfig", "num_workers_per_csx"): noted(HARDWARE),
    ("runconfig", "execute_crd_memory_gi"): noted(HARDWARE),
    ("runconfig", "compile_crd_memory_gi"): noted(HARDWARE),
    ("runconfig", "compile_dir"): noted(HARDWARE),
    ("runconfig", "mgmt_address"): noted(HARDWARE),
    ("runconfig", "credentials_path"): noted(HARDWARE),
    ("runconfig", "mount_dirs"): noted(HARDWARE),
    ("runconfig", "python_paths"): noted(HARDWARE),
    ("runconfig", "job_labels"): noted(HARDWARE),
    ("runconfig", "transfer_processes"): noted(HARDWARE),
    ("runconfig", "log_summaries"): noted("TensorBoard gets loss, learning rate and gradient norm"),
    ("runconfig", "log_input_summaries"): noted("TensorBoard gets loss, learning rate and gradient norm"),
    ("runconfig", "dist_backend"): noted("gloo on CPU, NCCL on GPU"),
    ("runconfig", "validate_only"): noted("a command-line flag here: run.py ... --validate_only"),
    ("runconfig", "compile_only"): noted("a command-line flag here: run.py ... --compile_only"),
    ("runconfig", "target_device"): noted("the device is run.py's first argument"),
    ("runconfig", "save_losses"): noted("losses go to model_dir's TensorBoard events and run log"),
    ("runconfig", "use_appliance_data"): noted(HARDWARE),
    ("runconfig", "show_debug_metrics"): noted(HARDWARE),
    # -------- sparsity (Model Zoo: fraction pruned; ours: fraction kept)
    ("sparsity", "sparsity"): mapped("density", "density = 1 - sparsity", _sparsity_level),
    ("sparsity", "type"): mapped("algorithm", "static, gmp, set, rigl", _lower),
    ("sparsity", "algorithm"): mapped("algorithm", "static, gmp, set, rigl", _lower),
    ("sparsity", "seed"): mapped("seed"),
    ("sparsity", "init_method"): mapped("init_method", "random; topk -> magnitude",
                                        lambda v, c: {"topk": "magnitude"}.get(v, v)),
    ("sparsity", "param_filter"): noted("the Model Zoo's module names: here density applies to every weight "
                                        "matrix (attention and MLP projections, an untied LM head); embeddings, "
                                        "norms and biases stay dense. Other selections: sparsity.groups"),
    ("sparsity", "update"): mapped("update_frequency, start_step, end_step", "{freq, start, stop} -> "
                                   "update_frequency, start_step, end_step", _update),
    ("sparsity", "drop_fraction"): mapped("drop_fraction, end_step", "a number; or {type: cosine, init: F, "
                                          "half_period: N} -> drop_fraction F, end_step N", _drop_fraction),
    # -------- the 2.4+ trainer layout
    ("trainer", "init"): mapped("", "the run's settings (below)"),
    ("trainer", "fit"): mapped("", "train_dataloader -> train_input, val_dataloader -> eval_input, ckpt_path -> "
                               "runconfig.checkpoint_path"),
    ("trainer", "validate"): noted("val_dataloader: used as eval_input when fit has none"),
    ("trainer", "validate_all"): noted("val_dataloaders: used as eval_input when fit and validate have none"),
    ("trainer.init", "backend"): noted("the device is run.py's first argument (CPU, GPU, CSX)"),
    ("trainer.init", "model_dir"): mapped("runconfig.model_dir"),
    ("trainer.init", "seed"): mapped("runconfig.seed"),
    ("trainer.init", "model"): mapped("model", "as the sectioned model section"),
    ("trainer.init", "optimizer"): mapped("optimizer", "{Name: {...}} -> optimizer_type Name and its keys as "
                                          "the sectioned optimizer section"),
    ("trainer.init", "schedulers"): mapped("optimizer.learning_rate", "one scheduler or SequentialLR of "
                                           "ConstantLR, LinearLR, CosineDecayLR, ExponentialLR, "
                                           "InverseSquareRootDecayLR, StepLR, PolynomialLR, MultiStepLR, "
                                           "PiecewiseConstantLR -> phases"),
    ("trainer.init", "precision"): mapped("", "see trainer.init.precision"),
    ("trainer.init", "loop"): mapped("", "see trainer.init.loop"),
    ("trainer.init", "checkpoint"): mapped("", "see trainer.init.checkpoint"),
    ("trainer.init", "logging"): mapped("", "see trainer.init.logging"),
    ("trainer.init", "callbacks"): mapped("", "LoadCheckpointStates -> runconfig.load_checkpoint_states; the "
                                          "others (ComputeNorm, ...) are noted"),
    ("trainer.init", "sparsity"): mapped("sparsity", "as the sectioned sparsity section"),
    ("trainer.init", "loggers"): noted("TensorBoard events are written to model_dir"),
    ("trainer.init.precision", "enabled"): mapped("model.mixed_precision"),
    ("trainer.init.precision", "fp16_type"): mapped("model.fp16_type", "bfloat16, float16; cbfloat16 -> bfloat16 "
                                                    "(noted)", _fp16_type),
    ("trainer.init.precision", "loss_scaling_factor"): mapped("optimizer.initial_loss_scale, "
                                                              "optimizer.min_loss_scale, optimizer.max_loss_scale",
                                                              "as optimizer.loss_scaling_factor",
                                                              _loss_scaling_factor),
    ("trainer.init.precision", "initial_loss_scale"): mapped("optimizer.initial_loss_scale"),
    ("trainer.init.precision", "max_loss_scale"): mapped("optimizer.max_loss_scale"),
    ("trainer.init.precision", "min_loss_scale"): mapped("optimizer.min_loss_scale"),
    ("trainer.init.precision", "steps_per_increase"): mapped("optimizer.steps_per_increase"),
    ("trainer.init.precision", "max_gradient_norm"): mapped("optimizer.max_gradient_norm"),
    ("trainer.init.precision", "max_gradient_value"): refused("clipping by value is not implemented; use "
                                                              "max_gradient_norm"),
    ("trainer.init.precision", "precision_opt_level"): noted(HARDWARE),
    ("trainer.init.precision", "log_loss_scale"): noted("the loss scale is logged when it is used (float16)"),
    ("trainer.init.loop", "max_steps"): mapped("runconfig.max_steps"),
    ("trainer.init.loop", "num_steps"): mapped("runconfig.num_steps"),
    ("trainer.init.loop", "eval_frequency"): mapped("runconfig.eval_frequency"),
    ("trainer.init.loop", "eval_steps"): mapped("runconfig.eval_steps"),
    ("trainer.init.loop", "grad_accum_steps"): mapped("optimizer.grad_accum_steps"),
    ("trainer.init.checkpoint", "steps"): mapped("runconfig.checkpoint_steps"),
    ("trainer.init.checkpoint", "max_checkpoints"): mapped("runconfig.max_checkpoints"),
    ("trainer.init.checkpoint", "save_initial_checkpoint"): noted("checkpoints are written every "
                                                                  "checkpoint_steps and at the end"),
    ("trainer.init.checkpoint", "autoload_last_checkpoint"): noted("a run always resumes from model_dir's newest "
                                                                   "checkpoint"),
    ("trainer.init.checkpoint", "disable_strict_checkpoint_loading"): noted("checkpoints load strictly"),
    ("trainer.init.logging", "log_steps"): mapped("runconfig.log_steps"),
    ("trainer.init.logging", "log_level"): noted("the run log is at INFO"),
    ("trainer.init.logging", "enable_act_frequency"): noted(HARDWARE),
    ("trainer.fit", "train_dataloader"): mapped("train_input", "as the sectioned train_input"),
    ("trainer.fit", "val_dataloader"): mapped("eval_input", "as the sectioned eval_input (a list: one only)"),
    ("trainer.fit", "ckpt_path"): mapped("runconfig.checkpoint_path"),
}

# 2.4 scheduler names -> our phase names (the 1.x names are ours already).
SCHEDULER_NAMES = {"ConstantLR": "Constant", "LinearLR": "Linear", "CosineDecayLR": "CosineDecay",
                   "ExponentialLR": "Exponential", "InverseSquareRootDecayLR": "InverseSquareRootDecay",
                   "StepLR": "Step", "PolynomialLR": "Polynomial", "MultiStepLR": "MultiStep",
                   "PiecewiseConstantLR": "PiecewiseConstant"}
BERT_ONLY = ("encoder_nonlinearity", "pooler_nonlinearity", "mlm_loss_weight", "disable_nsp", "num_labels",
             "task_dropout", "mlm_nonlinearity", "num_segments", "problem_type")
# What each of our models is, in the Model Zoo's architecture flags.
ARCHITECTURES = {
    "gpt2": {"position_embedding_type": "learned", "use_position_embedding": True, "share_embedding_weights": True,
             "use_untied_layer_norm": False,
             "use_projection_bias_in_attention": True, "use_ffn_bias_in_attention": True, "use_ffn_bias": True,
             "use_bias_in_output": False},
    "gptj": {"position_embedding_type": "rotary", "use_position_embedding": False, "share_embedding_weights": False,
             "use_untied_layer_norm": False,
             "use_projection_bias_in_attention": False, "use_ffn_bias_in_attention": False, "use_ffn_bias": True,
             "use_bias_in_output": True},
    "gpt_neox": {"position_embedding_type": "rotary", "use_position_embedding": False, "share_embedding_weights": False,
                 "use_untied_layer_norm": True, "use_projection_bias_in_attention": True,
                 "use_ffn_bias_in_attention": True, "use_ffn_bias": True, "use_bias_in_output": False},
    "bert": {"position_embedding_type": "learned", "use_position_embedding": True, "share_embedding_weights": True,
             "use_projection_bias_in_attention": True, "use_ffn_bias_in_attention": True, "use_ffn_bias": True},
}
DROPOUTS = ("dropout_rate", "embedding_dropout_rate", "residual_dropout_rate", "task_dropout")


