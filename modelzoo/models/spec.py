"""What each architecture declares once, and everything else reads: its model class, its
objective (which decides the dataset, the labels, generation and scoring), the model keys only
it takes, a tiny debug config, and its transformers twin (class, config, and the table pairing
our tensors with theirs). Adding a model is one file that defines a ``SPEC`` plus one line in
the registry (``modelzoo.models.MODELS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from modelzoo.config import ModelConfig

# Objectives: what the model predicts, hence its dataset, labels and scores.
CAUSAL_LM, MASKED_LM, CLASSIFY = "causal_lm", "masked_lm", "classify"

# The tiny model every architecture's tests and debug runs start from (a spec may add to it).
DEBUG_CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 4, "max_position_embeddings": 64}

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
    objective: str  # CAUSAL_LM or MASKED_LM: what the model pretrains on
    hf: HFTwin
    keys: tuple[str, ...] = ()  # the ModelConfig keys only this model (and others declaring them) takes
    classifier_key: str | None = None  # the key that, when set, turns the head into a classifier (CLASSIFY)
    debug: Mapping[str, Any] = field(default_factory=lambda: dict(DEBUG_CONFIG))  # a tiny model's keys

    @property
    def generates(self) -> bool:
        """Predicts each codon from the ones before it: generation and left-to-right scores."""
        return self.objective == CAUSAL_LM

    def objective_of(self, cfg: ModelConfig) -> str:
        """This configuration's objective: the spec's own, or CLASSIFY when its classifier key is set."""
        if self.classifier_key is not None and getattr(cfg, self.classifier_key) is not None:
            return CLASSIFY
        return self.objective

    def debug_config(self, **overrides) -> dict:
        """The model section of a tiny model of this architecture (for tests and quick runs)."""
        return {"name": self.name, **self.debug, **overrides}
