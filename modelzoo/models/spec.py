"""What each architecture declares once, and everything else reads: its model class, its
objective (which decides the dataset, the labels, generation and scoring) and its transformers
twin (class, config, and the table pairing our tensors with theirs). Adding a model is one file
that defines a ``SPEC`` plus one line in the registry (``modelzoo.models.MODELS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from modelzoo.config import ModelConfig

CAUSAL_LM, MASKED_LM = "causal_lm", "masked_lm"

# Tensor layouts between our state and a transformers state.
SAME, TRANSPOSED, SPLIT_QKV, HEADWISE_QKV = "same", "transposed", "split_qkv", "headwise_qkv"


def linear(ours: str, theirs, kind: str = SAME, bias: bool = True) -> Iterator[tuple]:
    """A Linear layer's rows of a tensor table: the weight (in the given layout) and its bias."""
    yield f"{ours}.weight", _suffixed(theirs, ".weight"), kind
    if bias:
        yield f"{ours}.bias", _suffixed(theirs, ".bias"), kind if kind in (SPLIT_QKV, HEADWISE_QKV) else SAME


def norm(ours: str, theirs: str) -> Iterator[tuple]:
    yield from linear(ours, theirs)


def _suffixed(theirs, suffix: str):
    return tuple(t + suffix for t in theirs) if isinstance(theirs, tuple) else theirs + suffix


def network_keys(cfg: ModelConfig) -> dict:
    """The model keys that decide the network's tensors and math, for comparing two configs."""
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_heads": cfg.num_heads, "filter_size": cfg.ffn_size, "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "max_position_embeddings": cfg.max_position_embeddings, "num_labels": cfg.num_labels}


@dataclass(frozen=True)
class HFTwin:
    """The transformers model a checkpoint converts to and from."""
    model_type: str  # config.json's model_type
    architecture: Callable[[ModelConfig], str]  # the transformers class name
    table: Callable[[ModelConfig], Iterator[tuple]]  # (our tensor, their name or names, layout)
    config: Callable[[Any, ModelConfig, dict, list | None], Any]  # (transformers, cfg, common keys, labels)
    fields: Callable[[dict, Callable, Callable], dict]  # (config.json, get, need) -> our model keys
    keys: Callable[[ModelConfig], dict] = network_keys  # what must agree between params and config.json
    tied: Mapping[str, str] = field(default_factory=dict)  # our second name of a tied Parameter -> stored name
    buffers: tuple[str, ...] = ()  # suffixes of their tensors that hold no weights of ours


@dataclass(frozen=True)
class ModelSpec:
    name: str  # model.name in the params
    model: type  # a StagedModel built from the ModelConfig
    objective: str  # CAUSAL_LM or MASKED_LM (a BERT with num_labels classifies)
    hf: HFTwin

    @property
    def generates(self) -> bool:
        """Predicts each codon from the ones before it: generation and left-to-right scores."""
        return self.objective == CAUSAL_LM
