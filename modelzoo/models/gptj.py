"""GPT-J: rotary positions on part of each head, attention and MLP in parallel from one
LayerNorm, no attention biases, an untied LM head with a bias.

GenSLM's models are GPT-NeoX with rotary embeddings on 25% of each head; the GenSLM presets use
this model with ``rotary_dim = head_dim / 4``.
"""

from __future__ import annotations

from torch import nn

from modelzoo.config import ModelConfig
from modelzoo.models.base import StagedModel, init_weights, token_loss
from modelzoo.models.layers import MLP, Attention, Rotary


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
        self.attn = Attention.from_config(cfg, bias=False, causal=True, rotary=Rotary(rotary_dim_of(cfg)))
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_size, dropout=cfg.dropout_rate, approximate_gelu=True)

    def forward(self, hidden, batch):
        normed = self.ln_1(hidden)
        return hidden + self.attn(normed, cache=batch.get("cache")) + self.mlp(normed)


class GPTJHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)

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
