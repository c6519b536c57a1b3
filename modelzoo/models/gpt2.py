"""GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, LM head tied to the token embedding."""

from __future__ import annotations

import math

import torch
from torch import nn

from modelzoo.config import ModelConfig
from modelzoo.models.base import StagedModel, init_weights, token_loss
from modelzoo.models.layers import MLP, Attention, position_offset


class GPT2Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, hidden, batch):
        ids = batch["input_ids"]
        start = position_offset(batch)  # > 0 when decoding with a KV cache
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        return self.dropout(self.tokens(ids) + self.positions(positions))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.attn = Attention.from_config(cfg, bias=True, causal=True)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_size, dropout=cfg.dropout_rate, approximate_gelu=True)

    def forward(self, hidden, batch):
        hidden = hidden + self.attn(self.ln_1(hidden), cache=batch.get("cache"))
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2Head(nn.Module):
    """Final LayerNorm and the LM head; the head's weight is the token embedding (tied)."""

    def __init__(self, cfg: ModelConfig, tokens: nn.Embedding):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.tokens = tokens

    def forward(self, hidden, batch):
        logits = self.ln_f(hidden) @ self.tokens.weight.t()
        return token_loss(logits, batch.get("labels"))


class GPT2LMModel(StagedModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = GPT2Embeddings(cfg)
        self.blocks = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.head = GPT2Head(cfg, self.embeddings.tokens)
        init_weights(self, cfg.initializer_range)
        # GPT-2 scales the residual projections so the residual stream's variance stays flat with depth
        for block in self.blocks:
            for proj in (block.attn.out, block.mlp.fc_out):
                nn.init.normal_(proj.weight, 0.0, cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def stages(self) -> list[nn.Module]:
        return [self.embeddings, *self.blocks, self.head]
