"""GPT-NeoX, the architecture of every model GenSLM released: rotary positions on ``rotary_pct``
of each head (pairs dim i with i + d/2), a parallel residual with separate LayerNorms for
attention and MLP, one fused q/k/v projection with biases, an untied LM head without bias."""

from __future__ import annotations

from torch import nn

from modelzoo.config import ModelConfig
from modelzoo.models.base import StagedModel, init_weights
from modelzoo.models.gptj import GPTJEmbeddings, GPTJHead
from modelzoo.models.layers import MLP, Attention, Rotary
from modelzoo.models.spec import SAME, CAUSAL_LM, HEADWISE_QKV, HFTwin, ModelSpec, linear, network_keys, norm

DEFAULT_ROTARY_PCT = 0.25  # GenSLM's models


def rotary_dims_of(cfg: ModelConfig) -> int:
    """Rotated dims of each head, as transformers counts them: int(head_dim * rotary_pct)."""
    return int(cfg.head_dim * (cfg.rotary_pct or DEFAULT_ROTARY_PCT))


class NeoXBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        rotary = Rotary(rotary_dims_of(cfg), base=cfg.rotary_emb_base, interleaved=False)
        self.attn = Attention.from_config(cfg, bias=True, causal=True, rotary=rotary)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_size, dropout=cfg.dropout_rate, approximate_gelu=True)

    def forward(self, hidden, batch):
        return hidden + self.attn(self.ln_attn(hidden), batch) + self.mlp(self.ln_mlp(hidden))


class GPTNeoXLMModel(StagedModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = GPTJEmbeddings(cfg)  # token table and dropout, no positions: as GPT-J's stages
        self.blocks = nn.ModuleList(NeoXBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.head = GPTJHead(cfg, bias=False)
        init_weights(self, cfg.initializer_range)

    def stages(self) -> list[nn.Module]:
        return [self.embeddings, *self.blocks, self.head]


# ---------------------------------------------------------------- transformers twin: GPTNeoXForCausalLM
# (also what GenSLM's checkpoints hold: modelzoo.models.genslm reads those)

def _hf_table(cfg: ModelConfig):
    yield "embeddings.tokens.weight", "gpt_neox.embed_in.weight", SAME
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        yield from norm(ours + "ln_attn", theirs + "input_layernorm")
        yield from norm(ours + "ln_mlp", theirs + "post_attention_layernorm")
        yield from linear(ours + "attn.qkv", theirs + "attention.query_key_value", HEADWISE_QKV)
        yield from linear(ours + "attn.out", theirs + "attention.dense")
        yield from linear(ours + "mlp.fc_in", theirs + "mlp.dense_h_to_4h")
        yield from linear(ours + "mlp.fc_out", theirs + "mlp.dense_4h_to_h")
    yield from norm("head.ln_f", "gpt_neox.final_layer_norm")
    yield "head.lm_head.weight", "embed_out.weight", SAME


def _hf_config(tf, cfg: ModelConfig, common: dict, labels):
    return tf.GPTNeoXConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.ffn_size, hidden_act="gelu_fast", rotary_pct=rotary_dims_of(cfg) / cfg.head_dim,
        rotary_emb_base=cfg.rotary_emb_base, max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_epsilon, hidden_dropout=cfg.dropout_rate,
        attention_dropout=cfg.attention_dropout_rate, use_parallel_residual=True, tie_word_embeddings=False,
        **common)


def _hf_fields(hf: dict, get, need) -> dict:
    """transformers 4.x keys (GenSLM's files: rotary_pct, rotary_emb_base) or 5.x (rope_parameters)."""
    need("hidden_act", ("gelu_fast", "gelu_new", "gelu_pytorch_tanh"))
    need("use_parallel_residual", (True,))
    need("tie_word_embeddings", (False,))
    need("attention_bias", (True,))
    rope = hf.get("rope_parameters") or {}
    return dict(name="gpt_neox", vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                num_hidden_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                filter_size=get("intermediate_size"), max_position_embeddings=get("max_position_embeddings"),
                layer_norm_epsilon=get("layer_norm_eps"),
                rotary_pct=float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 1.0))),
                rotary_emb_base=float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))))


def _network_keys(cfg: ModelConfig) -> dict:
    keys = network_keys(cfg)
    del keys["max_position_embeddings"]  # rotary positions: no tensor depends on the length
    return dict(keys, rotary_dims=rotary_dims_of(cfg), rotary_emb_base=cfg.rotary_emb_base)


SPEC = ModelSpec("gpt_neox", GPTNeoXLMModel, CAUSAL_LM, keys=("rotary_pct", "rotary_emb_base"), hf=HFTwin(
    model_type="gpt_neox", architecture=lambda cfg: "GPTNeoXForCausalLM", table=_hf_table, config=_hf_config,
    fields=_hf_fields, keys=_network_keys,
    buffers=(".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")))
