"""GPT-J: rotary positions on part of each head, attention and MLP in parallel from one
LayerNorm, no attention biases, an untied LM head with a bias.

GenSLM's models are GPT-NeoX with rotary embeddings on 25% of each head; the GenSLM presets use
this model with ``rotary_dim = head_dim / 4``.
"""

from __future__ import annotations

from torch import nn

from modelzoo.config import ModelConfig
from modelzoo.models.base import StagedModel, init_weights, token_loss
from modelzoo.models.gpt2 import gpt_style_config, gpt_style_fields
from modelzoo.models.layers import MLP, Attention, Rotary
from modelzoo.models.spec import SAME, CAUSAL_LM, SPLIT_QKV, HFTwin, ModelSpec, linear, network_keys, norm


def rotary_dim_of(cfg: ModelConfig) -> int:
    """model.rotary_dim, or a quarter of each head rounded down to an even number (as GenSLM)."""
    return cfg.rotary_dim or max(2, cfg.head_dim // 4 // 2 * 2)


class GPTJEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, hidden, batch):
        return self.dropout(self.tokens(batch["input_ids"]))


class GPTJBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.attn = Attention.from_config(cfg, bias=False, causal=True, 
                                           rotary=Rotary(rotary_dim_of(cfg), base=cfg.rotary_emb_base))
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_size, dropout=cfg.dropout_rate, approximate_gelu=True)

    def forward(self, hidden, batch):
        normed = self.ln_1(hidden)
        return hidden + self.attn(normed, batch) + self.mlp(normed)


class GPTJHead(nn.Module):
    """Final LayerNorm and an untied LM head (GPT-J's has a bias; GPT-NeoX's, bias=False, not)."""

    def __init__(self, cfg: ModelConfig, bias: bool = True):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=bias)

    def forward(self, hidden, batch):
        return token_loss(self.lm_head(self.ln_f(hidden)), batch.get("labels"))


class GPTJLMModel(StagedModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = GPTJEmbeddings(cfg)
        self.blocks = nn.ModuleList(GPTJBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.head = GPTJHead(cfg)
        init_weights(self, cfg.initializer_range)

    def stages(self) -> list[nn.Module]:
        return [self.embeddings, *self.blocks, self.head]


# ---------------------------------------------------------------- transformers twin: GPTJForCausalLM

def _hf_table(cfg: ModelConfig):
    yield "embeddings.tokens.weight", "transformer.wte.weight", SAME
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        yield from norm(ours + "ln_1", theirs + "ln_1")
        qkv = tuple(theirs + f"attn.{x}_proj" for x in "qkv")
        yield from linear(ours + "attn.qkv", qkv, SPLIT_QKV, bias=False)
        yield from linear(ours + "attn.out", theirs + "attn.out_proj", bias=False)
        yield from linear(ours + "mlp.fc_in", theirs + "mlp.fc_in")
        yield from linear(ours + "mlp.fc_out", theirs + "mlp.fc_out")
    yield from norm("head.ln_f", "transformer.ln_f")
    yield from linear("head.lm_head", "lm_head")


def _hf_fields(hf: dict, get, need) -> dict:
    fields = gpt_style_fields(hf, get, need, tied=False)
    fields["rotary_dim"] = hf.get("rotary_dim") or fields["hidden_size"] // fields["num_heads"]
    return fields


def _network_keys(cfg: ModelConfig) -> dict:
    keys = network_keys(cfg)
    del keys["max_position_embeddings"]  # rotary positions: no tensor depends on the length
    return dict(keys, rotary_dim=rotary_dim_of(cfg), rotary_emb_base=cfg.rotary_emb_base)


SPEC = ModelSpec("gptj", GPTJLMModel, CAUSAL_LM, keys=("rotary_dim", "rotary_emb_base"), hf=HFTwin(
    model_type="gptj", architecture=lambda cfg: "GPTJForCausalLM", table=_hf_table,
    config=lambda tf, cfg, common, labels: tf.GPTJConfig(rotary_dim=rotary_dim_of(cfg), tie_word_embeddings=False,
                                                         **gpt_style_config(cfg), **common),
    fields=_hf_fields, keys=_network_keys, buffers=(".attn.bias", ".attn.masked_bias")))
