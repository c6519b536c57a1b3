"""The params schema: one strict, typed description of a run.

A params yaml has the sections ``train_input``, ``eval_input``, ``model``, ``optimizer`` and
``runconfig`` (Cerebras Model Zoo layout). Everything is validated here once; the rest of the
code only sees the typed objects. Unknown keys are errors (with the closest valid key), never
warnings: a misspelt ``learning_rte`` silently falling back to a default wastes a cluster run.

``python -m modelzoo.config`` prints the reference of every key (docs/params.md is generated
from it and a test keeps the two equal).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic_core import PydanticCustomError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from modelzoo.errors import ConfigError

MODES = ("train", "eval", "train_and_eval", "eval_all")
# What a checkpoint holds, each loadable on its own (runconfig.load_checkpoint_states).
CHECKPOINT_STATES = frozenset({"model", "optimizer", "scheduler", "dataloader", "rng"})
# Ids of the codon tokenizer (modelzoo/data/codon_wordlevel_69vocab.json; a test keeps them equal).
CODON_VOCAB_SIZE = 69
# Bounds on the model's sizes, far above any model this toolkit could train (GenSLM's 25B: width
# 8192, 64 blocks, 10,240 tokens), so that every weight's element count stays a 64-bit integer and
# building a model never runs for ever: a size past them is a typo, refused in one line.
MAX_WIDTH, MAX_LAYERS = 2**16, 2**10
# A seed every generator takes as it is: numpy's legacy seed and torch's both accept [0, 2**32).
SEED_RANGE = {"ge": 0, "le": 2**32 - 1}


def _no_nul(path: str) -> str:
    if "\0" in path:  # the OS cannot open it; caught here rather than as a traceback deep in a run
        raise ValueError("a path cannot contain a NUL byte")
    return path


Path_ = Annotated[str, AfterValidator(_no_nul)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PrepareSpec(Section):
    input: list[Path_] = Field(min_length=1, description="FASTA/GenBank files (plain or .gz) to prepare.")
    split: list[float] = Field([0.9, 0.05, 0.05], min_length=3, max_length=3,
                               description="train, val, test fractions of the records.")
    seed: int = Field(0, **SEED_RANGE, description="Seed of the record split.")
    features: Optional[str] = Field(None, description="GenBank feature to extract (e.g. CDS); default whole records.")
    rename_duplicate_ids: bool = Field(False, description="Suffix repeated record ids with #2, #3... instead of "
                                                          "failing (e.g. genes listed once per start site).")


class DataInput(Section):
    data_dir: Path_ = Field(description="Shard directory written by data_preparation.prepare_genomes "
                                      "(e.g. data/x/train). Relative paths are read from the current directory.")
    batch_size: int = Field(gt=0, description="Global batch size (sequences per optimizer step, "
                                              "split evenly over all systems / ranks).")
    max_seq_length: int = Field(gt=1, description="Tokens per sequence; must equal the shards' "
                                                  "max_seq_length and be <= model.max_position_embeddings.")
    shuffle: bool = Field(True, description="Shuffle sequences every epoch (deterministic from shuffle_seed).")
    shuffle_seed: int = Field(0, **SEED_RANGE, description="Seed of the per-epoch shuffle.")
    num_workers: int = Field(0, ge=0, description="torch DataLoader worker processes (0 = read in the main process).")
    prepare: Optional[PrepareSpec] = Field(
        None, description="Build data_dir on first use: data_dir must be <output_dir>/{train,val,test} and is "
                          "prepared from these genomes with prepare_genomes at this section's max_seq_length.")
    pack_sequences: bool = Field(False, description="The shards hold packed windows (prepare_genomes "
                                                    "--pack_sequences): whole records back to back, each closed by "
                                                    "[SEP], then [PAD]; a record longer than a window gets windows "
                                                    "of its own. Must match the shards' manifest; with prepare, "
                                                    "data_dir is prepared packed. BERT packs its framed "
                                                    "records ([CLS] r1 [SEP] [CLS] r2 [SEP] ...); not for a "
                                                    "classifier (num_labels).")
    reading_frame: Literal["as_read", "longest_orf"] = Field(
        "as_read", description="Where codons start in each record: as_read (its first nucleotide) or longest_orf "
                               "(0-2 leading nucleotides dropped to put its longest stop-free run of codons in "
                               "frame: SARS-CoV-2 genomes, trimmed differently at the 5' end, then all read in "
                               "ORF1ab's frame). Must match the shards' manifest; with prepare, data_dir is "
                               "prepared so. Inference (GenomeLM, embed, score) reads sequences the same way.")
    document_attention: Optional[bool] = Field(None, description="Each record attends only to itself and its "
                                                                 "positions restart at 0, so a packed batch "
                                                                 "computes exactly the per-record losses of "
                                                                 "unpacked training (default: on when "
                                                                 "pack_sequences). false: records of a window see "
                                                                 "each other, positions run on.")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="BERT only: fraction of codons selected "
                                                                 "for masked-codon prediction.")
    labels_file: Optional[Path_] = Field(None, description="BERT classifier (model.num_labels): TSV with a header "
                                                         "row giving each record's class; every record of data_dir "
                                                         "needs a row. Classes are its label_column values, sorted.")
    label_column: Optional[str] = Field(None, description="BERT classifier: the labels_file column holding the class.")
    id_column: Optional[str] = Field(None, description="BERT classifier: the labels_file column holding the record "
                                                       "id (default: the first column).")


class LoraConfig(Section):
    rank: int = Field(8, gt=0, description="Rank r of each adapter: W x + (alpha / r) B A x, with A (r x in) and B "
                                           "(out x r).")
    alpha: float = Field(16.0, gt=0, description="Scale of the adapters' update: alpha / rank multiplies B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (the frozen path has none).")
    targets: list[str] = Field(["attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out"], min_length=1,
                               description="Linear layers that get adapters, by module name: a target selects a "
                                           "layer whose name is it or ends with '.' + it, or matches it as a "
                                           "shell-style pattern (e.g. 'blocks.1*.attn.qkv', 'head.lm_head'). Each "
                                           "target must select at least one Linear layer.")
    trainable: list[str] = Field([], description="Parameters trained in full beside the adapters, by shell-style "
                                                 "name pattern (e.g. 'head.*' for a classifier's new head, "
                                                 "'*.bias'); every other parameter is frozen.")


def _registered_model(name: str) -> str:
    """model.name names a spec in the registry (a new model is one file and one registry line)."""
    from modelzoo.models import MODELS  # the registry imports this module: asked at validation time
    if name not in MODELS:
        names = [repr(n) for n in MODELS]
        raise PydanticCustomError("literal_error", "Input should be {expected}",
                                  {"expected": f"{', '.join(names[:-1])} or {names[-1]}"})
    return name


class ModelConfig(Section):
    name: Annotated[str, AfterValidator(_registered_model)] = Field(
        description="Architecture: a name in the model registry (modelzoo.models.MODELS): gpt2, gptj, gpt_neox "
                    "(GenSLM's models) or bert.")
    vocab_size: int = Field(CODON_VOCAB_SIZE, gt=0, le=MAX_WIDTH, description="Vocabulary size: at least the codon tokenizer's 69 ids "
                                                                 "(69 = GenSLM's codon vocabulary).")
    hidden_size: int = Field(gt=0, le=MAX_WIDTH, description="Width of the residual stream.")
    num_hidden_layers: int = Field(gt=0, le=MAX_LAYERS, description="Number of transformer blocks.")
    num_heads: int = Field(gt=0, le=MAX_WIDTH, description="Attention heads; must divide hidden_size.")
    filter_size: Optional[int] = Field(None, gt=0, le=4 * MAX_WIDTH, description="MLP inner width (default 4 * "
                                                                                 "hidden_size).")
    max_position_embeddings: int = Field(gt=0, le=MAX_WIDTH * 16, description="Longest sequence the model "
                                                                             "accepts.")
    dropout_rate: float = Field(0.0, ge=0, lt=1, description="Dropout on embeddings, residual branches and MLP.")
    attention_dropout_rate: float = Field(0.0, ge=0, lt=1, description="Dropout on attention probabilities.")
    layer_norm_epsilon: float = Field(1e-5, gt=0, description="LayerNorm epsilon.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    mixed_precision: bool = Field(False, description="Compute in fp16_type (autocast) with fp32 master weights.")
    fp16_type: Literal["bfloat16", "float16"] = Field("bfloat16", description="Low-precision dtype used "
                                                                               "when mixed_precision is on.")
    attention_in_fp32: Literal[True, False, "auto"] = Field(
        "auto", description="With mixed_precision: compute attention (scores, softmax, weighted values) in fp32 "
                            "(true) or in fp16_type (false). auto: fp32 on CPUs that multiply matrices no faster "
                            "in fp16_type than in fp32 (measured once per process, about 0.1 s; e.g. Intel CPUs "
                            "with AVX-512 BF16 but no AMX, where it runs at about half the fp32 rate), whose "
                            "low-precision attention kernels are slower too; fp16_type on other CPUs (AMX, AMD "
                            "Zen 4) and GPUs. fp32 is also the more accurate.")
    mixed_precision_on_cpu: Literal[True, False, "auto"] = Field(
        "auto", description="With mixed_precision, where a run computes on the CPU (run.py CPU; CSX with "
                            "csx.wafer_device cpu): in fp16_type (true) or in fp32 (false). auto: in fp16_type "
                            "where this CPU multiplies matrices faster in it than in fp32 (measured once at the "
                            "start, about 0.1 s: AMX CPUs and AMD Zen 4 do; Intel CPUs with AVX-512 BF16 but no "
                            "AMX run it at about half the fp32 rate), else in fp32; the run log says which in one "
                            "line. GPUs always compute in fp16_type.")
    # Keys one architecture takes: its spec lists them (ModelSpec.keys); another architecture refuses them.
    rotary_dim: Optional[int] = Field(None, gt=0, description="GPT-J only: dimensions of each head that get "
                                                              "rotary embeddings (default head_dim / 4, as GenSLM).")
    rotary_pct: Optional[float] = Field(None, gt=0, le=1, description="gpt_neox only: fraction of each head that "
                                                                      "gets rotary embeddings (default 0.25, as "
                                                                      "GenSLM; int(head_dim * rotary_pct) dims).")
    rotary_emb_base: float = Field(10000.0, gt=0, description="gptj, gpt_neox: base of the rotary angles.")
    num_labels: Optional[int] = Field(None, gt=1, description="BERT only: number of classes; when set, the model "
                                                              "is a sequence classifier on the pooled [CLS].")
    lora: Optional[LoraConfig] = Field(None, description="LoRA fine-tuning: adapters on the target Linear layers "
                                                         "train, every other weight stays frozen (default: all "
                                                         "weights train).")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.filter_size or 4 * self.hidden_size

    @property
    def compute_dtype(self):
        import torch
        if not self.mixed_precision:
            return torch.float32
        return torch.bfloat16 if self.fp16_type == "bfloat16" else torch.float16

    @model_validator(mode="after")
    def _check_shapes(self):
        def wrong(key: str, message: str):  # names the key, so a translated file's error names the user's key
            raise _CrossFieldError(("model", key), message)
        if self.vocab_size < CODON_VOCAB_SIZE:
            wrong("vocab_size", f"{self.vocab_size} is below the codon tokenizer's {CODON_VOCAB_SIZE} ids")
        if self.hidden_size % self.num_heads:
            wrong("num_heads", f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        from modelzoo.models import MODELS  # the registry imports this module: asked at validation time
        owners = {key: [name for name, spec in MODELS.items() if key in spec.keys]
                  for spec in MODELS.values() for key in spec.keys}
        for key in (k for k in type(self).model_fields if k in owners):  # in field order: the first error named
            if getattr(self, key) != type(self).model_fields[key].default and self.name not in owners[key]:
                wrong(key, f"{key} applies to {' and '.join(owners[key])} only")
        if self.rotary_dim is not None and (self.rotary_dim > self.head_dim or self.rotary_dim % 2):
            wrong("rotary_dim", f"rotary_dim ({self.rotary_dim}) must be even and <= head_dim ({self.head_dim})")
        if self.rotary_pct is not None and int(self.head_dim * self.rotary_pct) % 2:
            wrong("rotary_pct", f"rotary_pct ({self.rotary_pct}) gives int(head_dim * rotary_pct) = "
                                f"{int(self.head_dim * self.rotary_pct)} rotary dims; it must be even")
        return self


class ConstantLR(Section):
    scheduler: Literal["Constant"]
    learning_rate: float = Field(ge=0, description="The learning rate.")
    total_iters: Optional[int] = Field(None, gt=0, description="Steps this phase lasts (last phase: forever).")


class RampLR(Section):
    scheduler: Literal["Linear", "CosineDecay"]
    initial_learning_rate: float = Field(ge=0, description="Learning rate at the first step of the phase.")
    end_learning_rate: float = Field(ge=0, description="Learning rate reached after total_iters steps (then held).")
    total_iters: int = Field(gt=0, description="Steps this phase lasts.")


class _DecayPhase(Section):
    initial_learning_rate: float = Field(ge=0, description="Learning rate at the first step of the phase.")
    total_iters: Optional[int] = Field(None, gt=0, description="Steps this phase lasts (last phase: forever).")


class ExponentialLR(_DecayPhase):
    scheduler: Literal["Exponential"]
    decay_rate: float = Field(gt=0, description="Factor the rate is multiplied by every decay_steps steps.")
    decay_steps: int = Field(gt=0, description="Steps over which the rate falls by one decay_rate.")
    staircase: bool = Field(False, description="Fall in whole steps of decay_rate (else continuously).")


class InverseSquareRootLR(_DecayPhase):
    """initial_learning_rate * scale / sqrt(max(step, warmup_steps)), step counted from the phase's start."""
    scheduler: Literal["InverseSquareRootDecay"]
    scale: float = Field(1.0, gt=0, description="Multiplier of the decay: the rate is initial_learning_rate * "
                                                "scale / sqrt(max(step, warmup_steps)).")
    warmup_steps: int = Field(1, gt=0, description="The rate is held for the first warmup_steps steps.")


class StepLR(_DecayPhase):
    scheduler: Literal["Step"]
    step_size: int = Field(gt=0, description="Steps between two multiplications by gamma.")
    gamma: float = Field(gt=0, description="Factor applied every step_size steps.")


class PolynomialLR(Section):
    scheduler: Literal["Polynomial"]
    initial_learning_rate: float = Field(ge=0, description="Learning rate at the first step of the phase.")
    end_learning_rate: float = Field(ge=0, description="Learning rate reached after total_iters steps (then held).")
    total_iters: int = Field(gt=0, description="Steps this phase lasts.")
    power: float = Field(1.0, gt=0, description="Exponent of the decay (1: linear).")


SCHEDULE_PHASES = {"Constant": ConstantLR, "Linear": RampLR, "CosineDecay": RampLR, "Exponential": ExponentialLR,
                   "InverseSquareRootDecay": InverseSquareRootLR, "Step": StepLR, "Polynomial": PolynomialLR}
Schedule = Annotated[Union[ConstantLR, RampLR, ExponentialLR, InverseSquareRootLR, StepLR, PolynomialLR],
                     Field(discriminator="scheduler")]


class OptimizerConfig(Section):
    optimizer_type: Literal["AdamW", "Adam", "SGD"] = Field("AdamW", description="AdamW, Adam or SGD.")
    learning_rate: Union[float, Schedule, list[Schedule]] = Field(
        description="A constant, or a schedule phase {scheduler: Constant|Linear|CosineDecay|Exponential|"
                    "InverseSquareRootDecay|Step|Polynomial, ...}, or a list of phases run one after another (e.g. "
                    "Linear warm-up then CosineDecay). Each phase counts its steps from its own start.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled (AdamW) or L2 (Adam, SGD) weight decay; "
                                                       "applied to weight matrices only: never to biases, norms or "
                                                       "embedding tables (token, position, token type; GPT-2's "
                                                       "and BERT's tied output head is the token table).")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    max_gradient_norm: Optional[float] = Field(None, gt=0, description="Clip the global gradient norm to this value.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step; must divide the "
                                                       "per-system batch size.")
    # Dynamic loss scaling: used only with model.mixed_precision and model.fp16_type float16.
    initial_loss_scale: float = Field(2.0 ** 15, gt=0, description="fp16: loss scale at the first step.")
    min_loss_scale: float = Field(1.0, gt=0, description="fp16: the scale never shrinks below this; an overflow "
                                                         "at this scale stops training with an error.")
    max_loss_scale: float = Field(2.0 ** 24, gt=0, description="fp16: the scale never grows above this.")
    steps_per_increase: int = Field(2000, gt=0, description="fp16: grow the scale after this many steps in a row "
                                                            "with finite gradients.")
    loss_scale_growth_factor: float = Field(2.0, gt=1, description="fp16: factor of each growth of the scale.")
    loss_scale_backoff_factor: float = Field(0.5, gt=0, lt=1, description="fp16: factor of the scale after a "
                                                                          "step with inf/NaN gradients (the step "
                                                                          "is skipped).")

    @model_validator(mode="after")
    def _check_schedule(self):
        phases = self.schedule_phases
        for phase in phases[:-1]:
            if phase.total_iters is None:
                raise ValueError("every learning_rate phase except the last needs total_iters")
        if not self.min_loss_scale <= self.initial_loss_scale <= self.max_loss_scale:
            raise ValueError(f"loss scales must satisfy min_loss_scale ({self.min_loss_scale:g}) <= "
                             f"initial_loss_scale ({self.initial_loss_scale:g}) <= max_loss_scale "
                             f"({self.max_loss_scale:g})")
        return self

    @property
    def schedule_phases(self) -> list:
        lr = self.learning_rate
        if isinstance(lr, (int, float)):
            return [ConstantLR(scheduler="Constant", learning_rate=float(lr))]
        return list(lr) if isinstance(lr, list) else [lr]


class SparsityGroup(Section):
    params: list[str] = Field(min_length=1, description="Parameter-name patterns, shell-style (e.g. "
                                                        "'blocks.*.mlp.*.weight'); a parameter joins the first "
                                                        "group with a matching pattern. Any parameter may be "
                                                        "selected, embeddings, norms and biases included.")
    density: float = Field(gt=0, le=1, description="Fraction of each selected tensor's weights kept, in (0, 1].")
    name: Optional[str] = Field(None, description="Label of the group in TensorBoard (default group<index>).")


class SparsityConfig(Section):
    algorithm: Literal["static", "rigl", "set", "gmp"] = Field(
        "static", description="static: masks fixed at the start; rigl: every update_frequency steps drop the "
                              "smallest-magnitude weights and regrow as many where the gradient is largest; set: "
                              "the same with random regrowth; gmp: gradual magnitude pruning from dense to the "
                              "target density on the cubic schedule of Zhu & Gupta (2017).")
    density: Optional[float] = Field(None, gt=0, le=1, description="Fraction of weights kept, in (0, 1], in every "
                                                                   "weight matrix no group selects (embeddings, "
                                                                   "norms and biases stay dense). Omit to make "
                                                                   "only the groups sparse.")
    groups: list[SparsityGroup] = Field([], description="Per-parameter-group densities (see sparsity.groups[]).")
    init_method: Literal["random", "magnitude"] = Field("random", description="static, rigl, set: the starting "
                                                                              "mask keeps random weights, or the "
                                                                              "largest-magnitude ones.")
    update_frequency: int = Field(100, gt=0, description="rigl, set, gmp: optimizer steps between mask updates.")
    drop_fraction: float = Field(0.3, gt=0, lt=1, description="rigl, set: fraction of each tensor's kept weights "
                                                              "moved at the first update; it decays to zero at "
                                                              "end_step on a cosine (as RigL).")
    start_step: int = Field(0, ge=0, description="gmp: the step pruning starts (the model is dense before).")
    end_step: Optional[int] = Field(None, gt=0, description="rigl, set: the step the drop fraction reaches zero "
                                                            "(masks are fixed after it); gmp: the step the "
                                                            "target density is reached. Required for both.")
    seed: int = Field(0, **SEED_RANGE, description="Seed of random initial masks and of set's random regrowth.")

    @model_validator(mode="after")
    def _check_schedule(self):
        if self.density is None and not self.groups:
            raise ValueError("give a density, groups, or both")
        dynamic = {"drop_fraction": ("rigl", "set"), "init_method": ("static", "rigl", "set"),
                   "update_frequency": ("rigl", "set", "gmp"), "end_step": ("rigl", "set", "gmp"),
                   "start_step": ("gmp",)}
        for key, algorithms in dynamic.items():
            # compared with the default, not model_fields_set: the resolved params written to
            # model_dir (every key, defaults included) must load again
            changed = getattr(self, key) != type(self).model_fields[key].default
            if changed and self.algorithm not in algorithms:
                raise _CrossFieldError(("sparsity", key), f"applies to algorithm {' or '.join(algorithms)}, "
                                                          f"not {self.algorithm}")
        if self.algorithm != "static" and self.end_step is None:
            raise _CrossFieldError(("sparsity", "end_step"), f"required for algorithm {self.algorithm}")
        if self.algorithm == "gmp" and self.start_step >= self.end_step:
            raise _CrossFieldError(("sparsity", "start_step"), f"{self.start_step} must be below end_step "
                                                               f"({self.end_step})")
        return self


class CSXConfig(Section):
    memoryx: Literal["ram", "disk"] = Field("ram", description="Where MemoryX keeps fp32 weights, gradients and "
                                                               "optimizer state: host RAM, or files on disk read "
                                                               "and written per stage with explicit I/O.")
    memoryx_dir: Optional[Path_] = Field(None, description="Directory of disk MemoryX files (default "
                                                         "model_dir/memoryx); each run and system gets a private "
                                                         "subdirectory (marked with its host and PID), removed at "
                                                         "exit, on error or SIGTERM/SIGINT, or at the next start on "
                                                         "the same host after a kill.")
    prefetch_depth: int = Field(1, ge=0, description="Stages whose weights stream in ahead of compute.")
    keep_activations: Union[Literal["auto"], bool] = Field(
        "auto", description="Keep each stage's activations on the wafer between its forward and backward pass (as "
        "Cerebras weight streaming does) instead of keeping only stage inputs and recomputing the stage in "
        "backward: about a third less compute, but activation memory of a resident run. auto: keep them when the "
        "plan that keeps them fits wafer_memory_gb, else recompute (the run log and --compile_only say which and "
        "why); true / false force either. Weights stream in again for backward either way.")
    wafer_device: Literal["cpu", "cuda"] = Field("cpu", description="Where the wafer's stages compute: the CPU, or "
                                                                    "this system's CUDA device (--num_csx N: N "
                                                                    "GPUs), MemoryX staying in host RAM or on "
                                                                    "disk; weights stream in and gradients out on "
                                                                    "a separate CUDA stream, overlapped with "
                                                                    "compute.")
    wafer_memory_gb: float = Field(40.0, gt=0, description="Memory of the emulated wafer; a stage that cannot "
                                                           "fit is refused at compile time.")


class RunConfig(Section):
    mode: Literal[MODES] = Field("train", description="train, eval, train_and_eval or eval_all.")  # type: ignore
    model_dir: Path_ = Field("model_dir", description="Where checkpoints, TensorBoard events and logs go.")
    max_steps: Optional[int] = Field(None, gt=0, description="Train until this global step.")
    num_steps: Optional[int] = Field(None, gt=0, description="Train this many steps in this invocation "
                                                             "(capped by max_steps).")
    log_steps: int = Field(10, gt=0, description="Log and write train scalars every this many steps.")
    checkpoint_steps: int = Field(0, ge=0, description="Checkpoint every this many steps (0: only at the end).")
    max_checkpoints: int = Field(5, gt=0, description="Keep this many newest checkpoints.")
    eval_steps: Optional[int] = Field(None, gt=0, description="Eval batches per evaluation (default: the whole "
                                                              "eval set once).")
    eval_frequency: int = Field(0, ge=0, description="train_and_eval: evaluate every this many steps "
                                                     "(0: only at the end).")
    seed: int = Field(1, **SEED_RANGE, description="Seed for weight initialisation, dropout and masking.")
    nonfinite_policy: Literal["stop", "skip"] = Field("stop", description="A NaN/Inf loss or gradient: stop the run "
                                                                          "naming the step, or skip that batch "
                                                                          "(never applied; logged and counted).")
    max_nonfinite_skips: int = Field(10, ge=0, description="skip: stop anyway once more than this many batches of "
                                                           "the run had a non-finite loss or gradient.")
    checkpoint_path: Optional[Path_] = Field(None, description="Start from this checkpoint when model_dir has none "
                                                             "of its own yet (a path inside model_dir always wins: "
                                                             "a roll-back); re-running resumes from model_dir.")
    load_checkpoint_states: str = Field("all", description="Which states to load from a checkpoint: 'all' or a "
                                                           "comma list of model, optimizer, scheduler, dataloader, "
                                                           "rng (e.g. 'model' to fine-tune from pretrained weights).")
    num_csx: int = Field(1, gt=0, description="CSX: number of systems (data-parallel ranks).")
    num_workers_per_node: Optional[int] = Field(None, gt=0, description="CPU/GPU: data-parallel processes on this "
                                                                        "machine; run.py starts them itself "
                                                                        "(default 1, or what an outer torchrun "
                                                                        "started).")
    activation_checkpointing: bool = Field(False, description="CPU/GPU: keep only each stage's input through the "
                                                              "forward pass and recompute the stage in backward "
                                                              "(dropout masks identical), so long sequences fit: "
                                                              "activation memory of one block instead of all, for "
                                                              "about a third more compute. CSX recomputes on its own "
                                                              "when activations do not fit its wafer "
                                                              "(csx.keep_activations).")
    sharding: Literal["none", "fsdp"] = Field("none", description="CPU/GPU with several ranks: none (DDP: every "
                                                                  "rank holds the whole model and optimizer "
                                                                  "state) or fsdp (PyTorch FSDP: parameters, "
                                                                  "gradients and optimizer state sharded across "
                                                                  "the ranks, each stage gathered only while it "
                                                                  "runs). Checkpoints are the same either way.")
    device_memory_gb: Optional[float] = Field(None, gt=0, description="CPU/GPU --compile_only: the memory per rank "
                                                                      "the plan checks against (default: the visible "
                                                                      "GPU's, or the RAM on CPU).")
    csx: CSXConfig = Field(default_factory=CSXConfig, description="CSX backend settings.")

    @model_validator(mode="after")
    def _check_states(self):
        allowed = {"all", *CHECKPOINT_STATES}
        bad = set(self.checkpoint_states) - allowed
        if bad:
            raise ValueError(f"load_checkpoint_states: unknown state {sorted(bad)[0]!r}; choose from {sorted(allowed)}")
        return self

    @property
    def checkpoint_states(self) -> set[str]:
        states = {s.strip() for s in self.load_checkpoint_states.split(",") if s.strip()}
        return set(CHECKPOINT_STATES) if "all" in states else states


class Params(Section):
    train_input: Optional[DataInput] = Field(None, description="Training data.")
    eval_input: Optional[DataInput] = Field(None, description="Evaluation data.")
    model: ModelConfig = Field(description="The model.")
    optimizer: Optional[OptimizerConfig] = Field(None, description="Optimizer and learning-rate schedule.")
    sparsity: Optional[SparsityConfig] = Field(None, description="Unstructured weight sparsity while training "
                                                                 "(default: dense).")
    runconfig: RunConfig = Field(default_factory=RunConfig, description="How the run is executed.")
    # What reading the file decided for the user to know (a Model Zoo file's ignored keys, ...):
    # logged by the run once its log is open.
    _notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return list(self._notes)

    @model_validator(mode="after")
    def _check_lengths(self):
        from modelzoo.models import CLASSIFY, spec_of  # the registry imports this module: asked at validation time
        wrong = []  # every cross-section problem at once, as the per-key ones are
        spec = spec_of(self.model)
        classifier = spec.objective_of(self.model) == CLASSIFY
        for name in ("train_input", "eval_input"):
            section = getattr(self, name)
            if section and section.max_seq_length > self.model.max_position_embeddings:
                wrong.append(_CrossFieldError((name, "max_seq_length"),
                                              f"{section.max_seq_length} is above model.max_position_embeddings "
                                              f"({self.model.max_position_embeddings})"))
            if section and section.pack_sequences and classifier:
                wrong.append(_CrossFieldError((name, "pack_sequences"), f"a classifier (model.{spec.classifier_key}) "
                                                                        "labels each window with one record's class; "
                                                                        "packed windows hold several records"))
            if section and classifier:
                wrong += [_CrossFieldError((name, key), f"required when model.{spec.classifier_key} is set (classifier)")
                          for key in ("labels_file", "label_column") if getattr(section, key) is None]
        if self.train_input and self.eval_input and self.train_input.reading_frame != self.eval_input.reading_frame:
            wrong.append(_CrossFieldError(("eval_input", "reading_frame"),
                                          f"{self.eval_input.reading_frame} differs from train_input.reading_frame "
                                          f"({self.train_input.reading_frame}): a model is evaluated on what it reads"))
        if wrong:
            raise _CrossFieldError(wrong[0].loc, str(wrong[0]), wrong[1:])
        return self

    @model_validator(mode="after")
    def _check_lora(self):
        if self.model.lora is not None and self.sparsity is not None:
            raise _CrossFieldError(("model", "lora"), "LoRA freezes the weights that sparsity would prune or regrow; "
                                                      "drop the sparsity section (or model.lora)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


class _CrossFieldError(ValueError):
    """A problem of one key seen from another (pydantic would name only the section); ``more``:
    further problems found by the same check."""

    def __init__(self, loc: tuple, message: str, more: list | None = None):
        super().__init__(message)
        self.loc, self.more = loc, more or []


# ---------------------------------------------------------------- loading and error messages

def load_params(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                check_paths: bool = True) -> Params:
    """Read (a Cerebras Model Zoo file is translated first), merge CLI overrides into runconfig,
    validate. Raises ConfigError: one line per problem of the file, in file order."""
    path = str(path)
    raw, lines = read_yaml(path)
    translation = None
    from modelzoo import modelzoo_params
    if modelzoo_params.is_modelzoo_file(raw):
        translation = modelzoo_params.translate(raw, path)
        raw = translation.params
    raw.setdefault("runconfig", {})
    if not isinstance(raw["runconfig"], dict):
        raise ConfigError(f"{path}: runconfig: expected a mapping")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    raw["runconfig"].update(given)
    for key in given if translation else ():
        translation.origin.pop(("runconfig", key), None)  # a flag's value is not the file's key
    return validate_params(raw, path, check_paths, lines=lines, translation=translation)


def read_yaml(path: str) -> tuple[dict, dict[tuple, int]]:
    """The file's mapping and the line of each key (by its path of keys and list indexes)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; --params takes a yaml file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                          f"a params file is yaml") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ConfigError(f"{path!r}: cannot read params ({getattr(e, 'strerror', None) or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        raise ConfigError(f"{path}:{where} invalid yaml: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {list(Params.model_fields)}")
    return raw, lines


def _key_lines(node, prefix: tuple = (), out: dict | None = None, seen: set | None = None) -> dict[tuple, int]:
    out, seen = ({} if out is None else out), (set() if seen is None else seen)
    if id(node) in seen:  # an alias: its keys have their lines already (and it may hold itself)
        return out
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (str(key.value),)
            out.setdefault(path, key.start_mark.line + 1)
            _key_lines(value, path, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(prefix + (str(i),), item.start_mark.line + 1)
            _key_lines(item, prefix + (str(i),), out, seen)
    return out


class Problem:
    """One thing wrong with a params file: where (our schema's key path) and what."""

    def __init__(self, loc: tuple, message: str):
        self.loc, self.message = tuple(str(p) for p in loc), message


def validate_params(raw: dict, source: str = "<params>", check_paths: bool = True,
                    lines: dict[tuple, int] | None = None, translation=None) -> Params:
    """check_paths=False skips the data checks (for tools that need only the model section).
    Every problem is reported at once, one line each, in the order of the file's lines."""
    problems: list = []
    params = None
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        problems += _problems_of(e)
    if check_paths:
        problems += _path_problems(params, raw)
    if translation:  # a key the translation refused is not also "missing"
        kept = [p for p in problems if p.loc not in translation.blocked]
        problems = translation.problems + (kept if kept or translation.problems else problems)
    if problems:
        raise ConfigError("\n".join(_ordered_lines(problems, source, lines or {}, translation)))
    if translation:
        params._notes = list(translation.notes)
    return params


def _ordered_lines(problems: list, source: str, lines: dict, translation) -> list[str]:
    origin = translation.origin if translation else {}

    def where(loc: tuple) -> tuple[str, tuple]:
        """The key as the file spells it (a Model Zoo key when translated) and its path there."""
        for n in range(len(loc), 0, -1):
            if loc[:n] in origin:
                file_path = origin[loc[:n]] + loc[n:]
                return ".".join(file_path), file_path
        return ".".join(loc) if loc else "(top level)", loc

    shown = []
    for i, p in enumerate(problems):
        name, file_path = where(p.loc)
        line = next((lines[file_path[:n]] for n in range(len(file_path), 0, -1) if file_path[:n] in lines), 0)
        shown.append((line, i, f"{source}: {name}: {p.message}"))
    unique = dict.fromkeys(text for _, _, text in sorted(shown))
    return list(unique)


def _path_problems(params: Params | None, raw: dict) -> list[Problem]:
    """The data a run needs must exist. With the schema broken, the data_dirs the file names are
    still checked, so one run reports them too."""
    if params is None:
        sections = {name: raw.get(name) for name in ("train_input", "eval_input")}
        mode = raw.get("runconfig", {}).get("mode") if isinstance(raw.get("runconfig"), dict) else None
        mode = mode if mode in MODES else "train"
    else:
        sections = {name: getattr(params, name) for name in ("train_input", "eval_input")}
        sections = {k: v.model_dump() if v is not None else None for k, v in sections.items()}
        mode = params.runconfig.mode
    needs = {"train": ["train_input"], "eval": ["eval_input"], "eval_all": ["eval_input"],
             "train_and_eval": ["train_input", "eval_input"]}[mode]
    problems = []
    for name in needs:
        if params is not None and sections[name] is None:
            problems.append(Problem((name,), f"section is required for mode {mode!r}"))
    if params is not None and "train_input" in needs and params.optimizer is None:
        problems.append(Problem(("optimizer",), f"section is required for mode {mode!r}"))
    for name in needs:
        section = sections[name]
        if not isinstance(section, dict) or not isinstance(section.get("data_dir"), str):
            continue
        data_dir, prepare = section["data_dir"], section.get("prepare")
        if "\0" in data_dir:
            continue  # the schema says so
        if isinstance(prepare, dict):
            if Path(data_dir).name not in ("train", "val", "test"):
                problems.append(Problem((name, "data_dir"), f"with prepare, the last part of data_dir must be "
                                                             f"train, val or test (got {Path(data_dir).name!r})"))
            for path in prepare.get("input") or []:
                if isinstance(path, str) and "\0" not in path and not Path(path).is_file():
                    problems.append(Problem((name, "prepare", "input"), f"file {path!r} does not exist"))
        elif not Path(data_dir).is_dir():
            problems.append(Problem((name, "data_dir"), f"directory {data_dir!r} does not exist (prepare it "
                                                         f"with python -m data_preparation.prepare_genomes)"))
        if Path(data_dir).is_dir():
            problems += _shard_problems(name, section, data_dir)
    return problems


def _shard_problems(name: str, section: dict, data_dir: str) -> list[Problem]:
    """The section's settings that its shards' manifest contradicts (max_seq_length, reading_frame,
    pack_sequences), found here once, before anything is built, from the manifest's top-level
    fields. A section the schema refuses is left to that complaint; a missing or unreadable
    manifest to opening the shards."""
    from modelzoo.data.datasets import shard_mismatches
    from modelzoo.data.shards import manifest_fields
    fields = manifest_fields(data_dir)
    if fields is None:
        return []
    try:
        values = DataInput.model_validate(section)
    except ValidationError:
        return []
    wrong = shard_mismatches(fields, data_dir, max_seq_length=values.max_seq_length,
                             reading_frame=values.reading_frame, pack_sequences=values.pack_sequences)
    return [Problem((name, key), message) for key, message in wrong.items()]


def describe_validation_error(error: ValidationError, source: str, prefix: tuple = ()) -> str:
    """A pydantic error as lines 'source: key.path: what is wrong' (one per problem), for any
    part of the schema validated on its own (e.g. a model section read from elsewhere)."""
    problems = [Problem(prefix + p.loc, p.message) for p in _problems_of(error)]
    return "\n".join(_ordered_lines(problems, source, {}, None))


def _problems_of(error: ValidationError) -> list[Problem]:
    """One problem per key the user wrote wrong. In a union (learning_rate: number | phase | list
    of phases) pydantic reports every member's complaint; the deepest is about what was written."""
    rank = {"extra_forbidden": 3, "union_tag_invalid": 2, "literal_error": 2, "missing": 1}
    groups: dict[tuple, list] = {}
    for err in error.errors():
        raw_loc = err["loc"]
        tag = next((i for i, part in enumerate(raw_loc) if _is_union_tag(part)), len(raw_loc))
        groups.setdefault(tuple(_clean_loc(raw_loc[:tag])), []).append(err)
    problems = []
    for errs in groups.values():
        err = max(errs, key=lambda e: (len(_clean_loc(e["loc"])), rank.get(e["type"], 0)))
        problems.append(_problem(err))
        ctx_error = err.get("ctx", {}).get("error")
        problems += [Problem(more.loc, str(more)) for more in getattr(ctx_error, "more", [])]
    return problems


def _problem(err: dict) -> Problem:
    loc = _clean_loc(err["loc"])
    ctx_error = err.get("ctx", {}).get("error")
    if isinstance(ctx_error, _CrossFieldError):
        return Problem(ctx_error.loc, str(ctx_error))
    if err["type"] == "extra_forbidden":
        return Problem(loc, "unknown key" + unknown_key_hint(loc, _valid_keys(loc[:-1], err["loc"])))
    if err["type"] == "missing":
        return Problem(loc, "required key is missing")
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {_short(value)})"
    return Problem(loc, f"{msg}{shown}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def unknown_key_hint(loc: list[str], valid: list[str]) -> str:
    """A Model Zoo key names the key it maps to (never a look-alike); else the closest spelling."""
    from modelzoo.modelzoo_params import hint_for
    known = hint_for(loc)
    if known:
        return f"; {known}"
    close = closest_key(loc[-1], valid)
    return f"; did you mean {close!r}?" if close else f"; valid keys: {', '.join(valid)}"


def closest_key(key: str, valid: list[str]) -> str | None:
    """Spelling similarity plus shared words, so 'num_layers' finds 'num_hidden_layers' rather
    than 'num_labels'; a key sharing little (num_wgt_servers vs num_steps) gets no guess."""
    def spelling(candidate: str) -> float:
        return difflib.SequenceMatcher(None, key.lower(), candidate).ratio()

    def score(candidate: str) -> float:
        words, other = set(key.lower().split("_")), set(candidate.split("_"))
        return spelling(candidate) + len(words & other) / len(words | other)
    best = max(valid, key=score, default=None)
    return best if best is not None and (score(best) >= 1.0 or spelling(best) >= 0.8) else None


def _clean_loc(loc) -> list[str]:
    return [str(p) for p in loc if not _is_union_tag(p)]


def _is_union_tag(part) -> bool:
    # pydantic puts union member names (e.g. 'RampLR', 'list[...]', 'float') into error locations
    return isinstance(part, int) is False and (str(part)[:1].isupper() or str(part) in ("float", "int")
                                               or "[" in str(part))


def _valid_keys(loc: list[str], raw_loc: tuple) -> list[str]:
    for tag, phase in SCHEDULE_PHASES.items():
        if tag in raw_loc:
            return list(phase.model_fields)
    model: Any = Params
    for part in loc:
        if part.isdigit():
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            break
        model = _section_class(field.annotation) or model
    return list(getattr(model, "model_fields", {}))


def _section_class(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------- the generated reference

def reference_markdown() -> str:
    lines = ["# Params reference", "",
             "Generated by `python -m modelzoo.config > docs/params.md` from the schema in "
             "`modelzoo/config.py`; a test fails when this file is stale.", ""]
    sections = [("train_input / eval_input", DataInput), ("model", ModelConfig),
                ("optimizer", OptimizerConfig),
                ("optimizer.learning_rate phase: Constant", ConstantLR),
                ("optimizer.learning_rate phase: Linear / CosineDecay", RampLR),
                ("optimizer.learning_rate phase: Exponential", ExponentialLR),
                ("optimizer.learning_rate phase: InverseSquareRootDecay", InverseSquareRootLR),
                ("optimizer.learning_rate phase: Step", StepLR),
                ("optimizer.learning_rate phase: Polynomial", PolynomialLR),
                ("train_input.prepare / eval_input.prepare", PrepareSpec),
                ("sparsity", SparsityConfig), ("sparsity.groups[]", SparsityGroup),
                ("runconfig", RunConfig), ("runconfig.csx", CSXConfig), ("model.lora", LoraConfig)]
    for title, cls in sections:
        lines += [f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
        for key, field in cls.model_fields.items():
            if key == "scheduler":
                continue
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = "(section)"
            else:
                default = f"`{field.default}`" if field.default is not None else "none"
            lines.append(f"| `{key}` | {default} | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
