"""GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, LM head tied to the token embedding."""

from __future__ import annotations

import math

import torch
from torch import nn

from modelzoo.config import ModelConfig
from modelzoo.models.base import StagedModel, init_weights, token_loss
from modelzoo.models.layers import MLP, Attention, token_positions
from modelzoo.models.spec import SAME, CAUSAL_LM, TRANSPOSED, HFTwin, ModelSpec, linear, norm


class GPT2Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, hidden, batch):
        ids = batch["input_ids"]
        positions = token_positions(batch, ids.shape[1], ids.device)  # per record in packed windows
        return self.dropout(self.tokens(ids) + self.positions(positions))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.attn = Attention.from_config(cfg, bias=True, causal=True)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_size, dropout=cfg.dropout_rate, approximate_gelu=True)

    def forward(self, hidden, batch):
        hidden = hidden + self.attn(self.ln_1(hidden), batch)
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


# ---------------------------------------------------------------- transformers twin: GPT2LMHeadModel

def gpt_style_config(cfg: ModelConfig) -> dict:
    """The config keys GPT-2 and GPT-J share in transformers."""
    return dict(n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size, n_layer=cfg.num_hidden_layers,
                n_head=cfg.num_heads, n_inner=cfg.ffn_size, activation_function="gelu_new",
                resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate, attn_pdrop=cfg.attention_dropout_rate,
                layer_norm_epsilon=cfg.layer_norm_epsilon)


def gpt_style_fields(hf: dict, get, need, tied: bool) -> dict:
    need("activation_function", ("gelu_new", "gelu_pytorch_tanh"))
    need("tie_word_embeddings", (tied,))
    hidden = get("n_embd")
    return dict(name=hf["model_type"], vocab_size=get("vocab_size"), hidden_size=hidden,
                num_hidden_layers=get("n_layer"), num_heads=get("n_head"), filter_size=hf.get("n_inner") or 4 * hidden,
                max_position_embeddings=get("n_positions"), layer_norm_epsilon=get("layer_norm_epsilon"))


def _hf_table(cfg: ModelConfig):
    yield "embeddings.tokens.weight", "transformer.wte.weight", SAME
    yield "embeddings.positions.weight", "transformer.wpe.weight", SAME
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        yield from norm(ours + "ln_1", theirs + "ln_1")
        yield from linear(ours + "attn.qkv", theirs + "attn.c_attn", TRANSPOSED)  # Conv1D: weights transposed
        yield from linear(ours + "attn.out", theirs + "attn.c_proj", TRANSPOSED)
        yield from norm(ours + "ln_2", theirs + "ln_2")
        yield from linear(ours + "mlp.fc_in", theirs + "mlp.c_fc", TRANSPOSED)
        yield from linear(ours + "mlp.fc_out", theirs + "mlp.c_proj", TRANSPOSED)
    yield from norm("head.ln_f", "transformer.ln_f")


def _hf_fields(hf: dict, get, need) -> dict:
    need("scale_attn_weights", (True,))
    need("scale_attn_by_inverse_layer_idx", (False,))
    return gpt_style_fields(hf, get, need, tied=True)


SPEC = ModelSpec("gpt2", GPT2LMModel, CAUSAL_LM, hf=HFTwin(
    model_type="gpt2", architecture=lambda cfg: "GPT2LMHeadModel", table=_hf_table,
    config=lambda tf, cfg, common, labels: tf.GPT2Config(tie_word_embeddings=True, **gpt_style_config(cfg), **common),
    fields=_hf_fields, tied={"head.tokens.weight": "embeddings.tokens.weight"},
    buffers=(".attn.bias", ".attn.masked_bias", "lm_head.weight")))
